"""The first run on a GPU machine: does every launch start, measure what it says, and compute the same model?

    python measurements/gpu_check.py            # writes docs/results/gpu_<device>.md
    python measurements/gpu_check.py --out PAGE

In order, each a real harness launch (torchrun on a free port, as measurements/common.py launches everything):
1. the default job (LoRA, ZeRO-2) on up to 2 devices;
2. a LLaMA-3.2-1B-shaped model, --init random, seq 2048, full fine-tune on one device: MFU, the allocator's
   training peak against the planner, the load peak, NVML's peak against the allocator's;
3. the bare DeepSpeed loop (measurements/bare_deepspeed.py) redoing job 2: the harness's step-time overhead;
   then job 2 compiled (--compile on, inductor; aot_eager on the CPU): the steady step against eager's, the
   compile time, graphs and breaks, and the loss against eager's;
4. ZeRO-2 offload with DeepSpeed's CPU Adam;
5. the same model on the bundled QA data, packed (the document path: varlen_attn on CUDA) and padded (causal, no
   mask), the same samples: the same loss, the kernel each ran, and what packing saves;
6. with 2 or more devices: TP2, EP2 (tiny Mixtral), PP2 and SP2 against one process, loss and gradient norm
   (--layouts picks some: the CPU test runs one, the others' parity having suites of their own);
7. with 2 or more devices: job 2 under DeepSpeed's ZeRO-3 and PyTorch's FSDP2, step time, memory and loss.
The result line names every check that ran and every one that was skipped, with why (one device: no layout
parity); it never reads "every check passed" over a skipped one.
Under 10 minutes on one 8-GPU node. On a machine without GPUs the same sequence runs on the CPU with small
settings (the 1B shape becomes the tiny LLaMA at seq 256), which is how the tests run it; its page says so.
Exit 1 when a check failed (the page says which).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import common  # measurements/common.py, next to this script

sys.path.insert(0, common.REPO)

FAST = ["--max_steps", "4", "--warmup_steps", "1", "--eval_interval", "0", "--wandb_mode", "disabled"]
# One process and each layout compute the same global batch of 4 micro-batches of 1 sample, in the same order.
PARITY = [*FAST, "--peft", "none", "--lr", "1e-3", "--seq_len", "128", "--micro_batch_size", "1",
          "--global_batch_size", "4"]
LAYOUTS = [("TP2", "tiny-llama", "tp", "ds_configs/tp2.json"), ("EP2", "tiny-mixtral", "ep", "ds_configs/ep2.json"),
           ("PP2", "tiny-llama", "pp", "ds_configs/pp2.json"), ("SP2", "tiny-llama", "sp", "ds_configs/sp2.json")]
# Parity tolerance per precision (docs/parity.md derives the CPU's fp32 one): bf16 keeps 8 bits of mantissa, so
# two reduction orders may differ by a few units of 2^-8 after a few steps.
RTOL = {"fp32": 1e-4, "bf16": 3e-2}


def settings(gpus: int) -> dict:
    if gpus:
        return {"device": "cuda", "procs": min(2, gpus), "model": "llama3.2-1b", "seq": 2048, "micro": 2,
                "steps": 12, "compile_backend": "auto"}
    # aot_eager on the CPU: the same graphs without inductor's minute of cold C++ compilation in the tests
    return {"device": "cpu", "procs": 2, "model": "tiny-llama", "seq": 256, "micro": 2, "steps": 6,
            "compile_backend": "aot_eager"}


def launch(nprocs: int, args: list[str], out_dir: str, timeout: int = 600) -> tuple[dict | None, list, str]:
    """One harness run. -> (summary or None, its metrics.jsonl records, the output's tail when it failed)."""
    from bench.loggers import read_records
    cmd = common.launch(nprocs, "bench/run.py", "--output_dir", out_dir, *args)
    try:
        out = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, timeout=timeout)
        tail = "" if out.returncode == 0 else (out.stdout + out.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        tail = f"timed out after {timeout} s"
    dirs = [os.path.join(out_dir, d) for d in os.listdir(out_dir)] if os.path.isdir(out_dir) else []
    if len(dirs) != 1 or not os.path.isfile(os.path.join(dirs[0], "summary.json")):
        return None, [], tail or "no run directory"
    with open(os.path.join(dirs[0], "summary.json")) as fh:
        summary = json.load(fh)
    return summary, read_records(os.path.join(dirs[0], "metrics.jsonl")), tail


def text_data(path: str, repeat: int = 40) -> str:
    """A plain-text corpus (full rows, no padding) from the bundled sample, repeated to fill long rows."""
    with open(os.path.join(common.REPO, "data", "squad_sample.json")) as fh:
        squad = json.load(fh)
    contexts = [p["context"] for art in squad["data"] for p in art["paragraphs"]]
    with open(path, "w") as fh:
        fh.write("\n\n".join(contexts * repeat))
    return path


def mib(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def fmt(x, spec=".3g") -> str:
    return "n/a" if x is None else format(x, spec)


class Check:
    def __init__(self, tmp: str):
        self.tmp, self.rows, self.failed = tmp, [], []
        self.ran, self.skipped = [], []  # launch names; (check, why)

    def skip(self, check: str, why: str) -> None:
        self.skipped.append((check, why))
        print(f"{check}: skipped ({why})", flush=True)

    def result(self) -> list[str]:
        """The result section: what failed, what ran, what was skipped and why."""
        lines = [f"- FAILED {f}" for f in self.failed]
        verdict = "FAILED" if self.failed else "passed"
        lines.append(f"- {len(self.ran)} launches ran ({', '.join(self.ran)}): {verdict}"
                     + ("" if self.failed else ", every one"))
        lines += [f"- SKIPPED {check}: {why}" for check, why in self.skipped]
        if not self.failed:
            lines.append("Every check that ran passed" + (f"; {len(self.skipped)} skipped (above)." if self.skipped
                                                          else "; none was skipped."))
        return lines

    def run(self, name: str, nprocs: int, args: list[str]) -> tuple[dict | None, list]:
        summary, records, tail = launch(nprocs, args, os.path.join(self.tmp, name))
        self.ran.append(name)
        ok = summary is not None and summary["status"] == "completed"
        if not ok:
            self.failed.append(f"{name}: {summary['status'] + ': ' + str(summary['error']) if summary else tail}")
        print(f"{name}: {'ok' if ok else 'FAILED'}", flush=True)
        return (summary if ok else None), records


def max_rel(a: list, b: list) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results page (default docs/results/gpu_<device>.md)")
    p.add_argument("--layouts", default=",".join(label for label, *_ in LAYOUTS),
                   help="section 6's layouts, comma-separated (default: all)")
    opts = p.parse_args()
    unknown = set(opts.layouts.split(",")) - {label for label, *_ in LAYOUTS}
    if unknown:
        p.error(f"--layouts: no layout {', '.join(sorted(unknown))}; choose from "
                f"{', '.join(label for label, *_ in LAYOUTS)}")
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    s = settings(gpus)
    name = torch.cuda.get_device_name(0) if gpus else "cpu"
    out = opts.out or os.path.join(common.REPO, "docs", "results",
                                   f"gpu_{name.replace('NVIDIA ', '').replace(' ', '_').lower()}.md")
    lines = [f"# GPU check: {name}" + ("" if gpus else " (no GPU: the sequence on the CPU, small settings)"), "",
             f"- {common.host_line()}; devices: {gpus or 'none'} x {name}",
             f"- rerun: `python measurements/gpu_check.py` (each row is one harness launch; numbers from one run)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        c = Check(tmp)
        dflt, _ = c.run("default", s["procs"], ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json",
                                                "--wandb_mode", "disabled"])
        if dflt:
            v = dflt["versions"]
            lines += [f"- versions: CUDA {v.get('cuda')}, NCCL {v.get('nccl')}, driver {v.get('cuda_driver')}, "
                      f"{v.get('gpu_count')} x {v.get('gpu_name')}; optimizer {dflt['optimizer']}", "",
                      "## 1. The default job", "",
                      f"{dflt['world_size']} processes, {dflt['steps']} steps ({dflt['measured_steps']} timed), "
                      f"median step {fmt(dflt['step_time_s']['median'])} s, val loss {fmt(dflt['val_loss'], '.4f')}.",
                      ""]
        job = ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--model", s["model"], "--init",
               "random", "--peft", "none", "--data", text_data(os.path.join(tmp, "text.txt")), "--seq_len",
               str(s["seq"]), "--micro_batch_size", str(s["micro"]), "--max_steps", str(s["steps"]),
               "--warmup_steps", "2", "--eval_interval", "0", "--wandb_mode", "disabled", "--monitor_interval_s",
               "0.2"]
        big, big_records = c.run("shape-1b", 1, job)
        lines += section_1b(big, s)
        if big:
            lines += section_bare(c, big, big_records)
            lines += section_compiled(c, s, job, big, big_records)
        off, _ = c.run("offload", 1, ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero2_offload.json",
                                      *FAST])
        if off:
            lines += ["## 4. ZeRO-2 offload", "", f"Completed with {off['optimizer']['name']} (offloaded optimizer "
                      f"states), median step {fmt(off['step_time_s']['median'])} s.", ""]
        lines += section_packing(c, s)
        if s["procs"] >= 2:
            lines += section_parity(c, s, opts.layouts.split(","))
            lines += section_engines(c, job)
        else:
            c.skip("6. layout parity (TP2, EP2, PP2, SP2)", f"{gpus} device: a layout needs 2 or more")
            c.skip("7. ZeRO-3 vs FSDP2", f"{gpus} device: a sharded engine needs 2 or more")
        lines += ["## Result", "", *c.result()]
    common.write_page(lines, out)
    return 1 if c.failed else 0


def section_1b(big: dict | None, s: dict) -> list[str]:
    if big is None:
        return []
    r0 = big["memory"]["per_rank"][0]
    load, train = r0["phases"].get("load", {}), r0["phases"].get("training", {})
    dev = (big["memory"]["device"] or [{}])[0]
    reserved = max((ph.get("peak_reserved_mib") or 0) for ph in r0["phases"].values()) or None
    plan = big["memory"].get("plan_check") or {}
    return ["## 2. One device, LLaMA-3.2-1B shape" if s["device"] == "cuda" else "## 2. One device (CPU: tiny LLaMA)",
            "", f"`{s['model']} --init random --seq_len {s['seq']} --micro_batch_size {s['micro']} --peft none`, "
            f"ZeRO-2, {big['measured_steps']} timed steps.", "",
            "| figure | value |", "|---|---|",
            f"| tokens/s real / computed | {fmt(big['tokens_per_s'], ',.0f')} / "
            f"{fmt(big.get('computed_tokens_per_s'), ',.0f')} |",
            f"| TFLOP/s per GPU, MFU, HFU | {fmt(big['tflops_per_gpu'])}, {fmt(big['mfu'], '.1%')}, "
            f"{fmt(big.get('hfu'), '.1%')} |",
            f"| MFU peak | {big['peak_tflops_source']} |",
            f"| load peak allocated / RSS (MiB) | {mib(load.get('peak_allocated_mib'))} / "
            f"{mib(load.get('peak_rss_mib'))} |",
            f"| training peak allocated / reserved / RSS (MiB) | {mib(train.get('peak_allocated_mib'))} / "
            f"{mib(train.get('peak_reserved_mib'))} / {mib(train.get('peak_rss_mib'))} |",
            f"| planner's device total (MiB), training peak / plan | {mib(plan.get('planned_mib'))}, "
            f"{fmt(plan.get('ratio'))} |",
            f"| device monitor's peak (MiB: NVML's used on GPUs, the process's RSS on the CPU) against the "
            f"allocator's peak reserved | {mib(dev.get('peak_mib'))} against "
            f"{mib(reserved)} |", ""]


def section_bare(c: Check, big: dict, records: list) -> list[str]:
    out = os.path.join(c.tmp, "bare")
    done = subprocess.run(common.launch(1, common.REDO["bare"], big["run_dir"], out), cwd=common.REPO,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        c.failed.append(f"bare loop: {(done.stdout + done.stderr)[-800:]}")
        return []
    import same_job
    bare = same_job.merge(out, "bare")["step_time_s"]
    untimed = big["steps"] - big["measured_steps"]
    harness = [r["step_time_s"] for r in records][untimed:]
    ratio = statistics.median(harness) / statistics.median(bare[untimed:])
    return ["## 3. The bare DeepSpeed loop on the same job", "",
            f"Median step time, harness / bare loop, over the same {len(harness)} steps: **{ratio:.3f}** "
            f"({statistics.median(harness):.4f} s / {statistics.median(bare[untimed:]):.4f} s).", ""]


def section_compiled(c: Check, s: dict, job: list[str], big: dict, records: list) -> list[str]:
    got, recs = c.run("shape-1b-compiled", 1, [*job, "--compile", "on", "--compile_backend", s["compile_backend"]])
    if not got:
        return []
    precision = "bf16" if s["device"] == "cuda" else "fp32"
    dl = max_rel([r["loss"] for r in recs], [r["loss"] for r in records])
    if dl > RTOL[precision]:
        c.failed.append(f"compiled: loss {dl:.2e} from eager's ({precision} tolerance {RTOL[precision]:g})")
    comp = got["compile"]
    ratio = big["step_time_s"]["median"] / got["step_time_s"]["median"]
    return [f"## 3b. Job 2 compiled ({comp['backend']})", "",
            f"Median step eager / compiled: **{ratio:.2f}** ({fmt(big['step_time_s']['median'])} s / "
            f"{fmt(got['step_time_s']['median'])} s); first step {fmt(big['time_to_first_step_s'])} s / "
            f"{fmt(got['time_to_first_step_s'])} s; compile {fmt(comp['compile_s'])} s (cache "
            f"{'warm' if comp['cache']['warm'] else 'cold'}), {comp['graphs']} graphs, {comp['graph_breaks']} "
            f"breaks, {len(comp['recompiled_steps'])} recompiled steps; loss max rel. diff from eager {dl:.2e}.", ""]


def section_packing(c: Check, s: dict) -> list[str]:
    """The same samples packed (document path) and padded (causal): both complete with the kernels they name and
    compute the same loss; what packing saves in computed tokens and time."""
    job = ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--model", s["model"], "--init", "random",
           "--peft", "none", "--seq_len", str(s["seq"] // 2), "--micro_batch_size", "8", "--global_batch_size",
           str(8 * s["procs"]), "--max_steps", str(s["steps"]), "--warmup_steps", "2", "--eval_interval", "0",
           "--wandb_mode", "disabled", "--lr", "1e-4"]
    runs = {way: c.run(f"qa-{way}", s["procs"], [*job, "--packing", "on" if way == "packed" else "off"])
            for way in ("packed", "padded")}
    if not all(summary for summary, _ in runs.values()):
        return []
    rtol = RTOL["bf16" if s["device"] == "cuda" else "fp32"]
    (packed, p_recs), (padded, d_recs) = runs["packed"], runs["padded"]
    dl = max_rel([r["loss"] for r in p_recs], [r["loss"] for r in d_recs])
    if dl > rtol:
        c.failed.append(f"packed vs padded: loss {dl:.2e} apart (tolerance {rtol:g})")
    rows = ["## 5. Packed and padded rows of the same samples", "",
            f"`{s['model']}`, bundled QA data, `--seq_len {s['seq'] // 2} --micro_batch_size 8`, {s['procs']} "
            f"process(es); loss max rel. diff packed vs padded **{dl:.2e}** (tolerance {rtol:g}).", "",
            "| batching | attention (kernel, mask) | median step s | tokens/s real | tokens/s computed |",
            "|---|---|---|---|---|"]
    for way, summary in (("packed", packed), ("padded", padded)):
        a = summary["attention"]
        rows.append(f"| {way} | {a['kernel']}, {a['mask']} | {fmt(summary['step_time_s']['median'])} | "
                    f"{fmt(summary['tokens_per_s'], ',.0f')} | {fmt(summary['computed_tokens_per_s'], ',.0f')} |")
    return rows + [""]


def section_parity(c: Check, s: dict, chosen: list[str]) -> list[str]:
    precision = "bf16" if s["device"] == "cuda" else "fp32"
    rtol = RTOL[precision]
    layouts = [row for row in LAYOUTS if row[0] in chosen]
    left = [row[0] for row in LAYOUTS if row[0] not in chosen]
    if left:
        c.skip(f"6. layout parity ({', '.join(left)})", "not chosen by --layouts")
    refs = {m: c.run(f"ref-{m}", 1, ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json", "--model", m,
                                     *PARITY]) for m in sorted({row[1] for row in layouts})}
    rows = [f"## 6. Layouts on {s['procs']} devices against one process ({precision}, tolerance {rtol:g} relative)",
            "", "| layout | loss, max rel. diff | grad norm, max rel. diff | within |", "|---|---|---|---|"]
    for label, model, strategy, ds in layouts:
        got, recs = c.run(label, 2, ["--strategy", strategy, "--ds_config", ds, "--model", model, *PARITY])
        ref = refs[model][1]
        if not got or not refs[model][0]:
            rows.append(f"| {label} | n/a | n/a | no |")
            continue
        dl = max_rel([r["loss"] for r in recs], [r["loss"] for r in ref])
        dg = max_rel([r["grad_norm"] for r in recs], [r["grad_norm"] for r in ref])
        ok = dl <= rtol and dg <= rtol
        if not ok:
            c.failed.append(f"{label}: loss {dl:.2e}, grad norm {dg:.2e} against one process")
        rows.append(f"| {label} | {dl:.2e} | {dg:.2e} | {'yes' if ok else 'no'} |")
    return rows + [""]


def section_engines(c: Check, job: list[str]) -> list[str]:
    """Job 2 on 2 devices, DeepSpeed's ZeRO-3 and PyTorch's FSDP2 (the same ds_config keys, data and seed)."""
    runs = {}
    for label, ds in (("ZeRO-3", "ds_configs/dp_zero3.json"), ("FSDP2", "ds_configs/fsdp2.json")):
        args = list(job)
        args[args.index("--strategy") + 1] = "fsdp2" if label == "FSDP2" else "dp"
        args[args.index("--ds_config") + 1] = ds
        runs[label] = c.run(f"engine-{label}", 2, args)
    rows = ["## 7. ZeRO-3 vs FSDP2 on job 2, 2 devices", "",
            "| engine | median step s | tokens/s | peak memory MiB (rank 0) | last loss |", "|---|---|---|---|---|"]
    for label, (summary, _) in runs.items():
        if not summary:
            rows.append(f"| {label} | n/a | n/a | n/a | n/a |")
            continue
        mem = summary["memory"]["per_rank"][0]
        peak = mem.get("peak_allocated_mib") or mem.get("peak_rss_mib")
        rows.append(f"| {label} | {fmt(summary['step_time_s']['median'])} | {fmt(summary['tokens_per_s'], ',.0f')} "
                    f"| {mib(peak)} | {summary['loss']['last']:.4f} |")
    (a, ra), (b, rb) = runs.values()
    if a and b:
        dl = max_rel([r["loss"] for r in rb], [r["loss"] for r in ra])
        rows += ["", f"Largest relative loss difference, FSDP2 against ZeRO-3: {dl:.2e}."]
    return rows + [""]


if __name__ == "__main__":
    sys.exit(main())
