"""The planner's prediction (summary.json memory_plan, made before launch) beside what each run counted
(summary.json accounting) for every layout of the CPU matrix, LoRA included, and activations at other micro-batch
sizes and sequence lengths.

    python measurements/planner_vs_measured.py [--out docs/results/planner_cpu.md]

Each run is two steps (what is counted comes from the first two); the page gives, per layout, the largest
relative error over ranks of each quantity, and for activations and communication the error of the mean over
ranks (expert routing differs between ranks; the planner assumes balanced routing).
"""
import argparse
import os
import tempfile

from common import harness, host_line, write_page  # measurements/common.py, next to this script

BASE = ["--max_steps", "2", "--warmup_steps", "1", "--global_batch_size", "8", "--eval_interval", "0",
        "--eval_batches", "1", "--wandb_mode", "disabled"]
SHAPES = ["--micro_batch_size", "2", "--seq_len", "128"]
LAYOUTS = [  # (label, processes, args)
    ("dp ZeRO-1, 1 rank", 1, ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json", "--peft", "none"]),
    *[(f"dp ZeRO-{z}{', LoRA' if peft == 'lora' else ''}", 2,
       ["--strategy", "dp", "--ds_config", f"ds_configs/dp_zero{z}.json", "--peft", peft])
      for z in (1, 2, 3) for peft in ("none", "lora")],
    ("tp2 (LLaMA)", 2, ["--strategy", "tp", "--ds_config", "ds_configs/tp2.json"]),
    ("tp2 (Mixtral)", 2, ["--strategy", "tp", "--ds_config", "ds_configs/tp2.json", "--model", "tiny-mixtral"]),
    ("ep2", 2, ["--strategy", "ep", "--ds_config", "ds_configs/ep2.json", "--model", "tiny-mixtral"]),
    ("ep4", 4, ["--strategy", "ep", "--ds_config", "ds_configs/ep4.json", "--model", "tiny-mixtral"]),
    ("ep2, LoRA", 2, ["--strategy", "ep", "--ds_config", "ds_configs/ep2.json", "--model", "tiny-mixtral",
                      "--peft", "lora"]),
    ("dp ZeRO-2 offload", 2, ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero2_offload.json", "--peft", "none"]),
    ("dp ZeRO-3 offload", 2, ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero3_offload.json", "--peft", "none"]),
    ("tp2 x ep2", 4, ["--strategy", "tp_ep", "--ds_config", "ds_configs/tp2_ep2.json", "--model", "tiny-mixtral"]),
    ("pp2", 2, ["--strategy", "pp", "--ds_config", "ds_configs/pp2.json", "--peft", "none"]),
    ("pp4", 4, ["--strategy", "pp", "--ds_config", "ds_configs/pp4.json", "--peft", "none"]),
    ("pp2 x dp2", 4, ["--strategy", "hybrid", "--ds_config", "ds_configs/pp2_dp2.json", "--peft", "none"]),
    ("tp2 (LLaMA), LoRA", 2, ["--strategy", "tp", "--ds_config", "ds_configs/tp2.json", "--peft", "lora"]),
    ("tp2 x ep2, LoRA", 4, ["--strategy", "tp_ep", "--ds_config", "ds_configs/tp2_ep2.json", "--model",
                            "tiny-mixtral", "--peft", "lora"]),
    *[(f"sp2 ZeRO-{z}", 2, ["--strategy", "sp", "--ds_config", cfg, "--peft", "none"])
      for z, cfg in ((1, "ds_configs/sp2_zero1.json"), (3, "ds_configs/sp2.json"))],
    ("sp2 ZeRO-3, LoRA", 2, ["--strategy", "sp", "--ds_config", "ds_configs/sp2.json", "--peft", "lora"]),
    ("sp2 ZeRO-3, tiled MLP and loss", 2, ["--strategy", "sp", "--ds_config", "ds_configs/sp2.json", "--peft",
                                           "none", "--tiled_mlp", "--tiled_loss"]),
    ("sp4 ZeRO-3", 4, ["--strategy", "sp", "--ds_config", "ds_configs/sp4.json", "--peft", "none"]),
    ("sp2 x ep2 (Mixtral)", 2, ["--strategy", "sp", "--ds_config", "ds_configs/sp2_ep2.json", "--model",
                                "tiny-mixtral", "--peft", "none"]),
]
ACTIVATION_SHAPES = [("1", "64"), ("4", "64"), ("1", "256"), ("4", "256")]  # (micro, seq) beside 2 x 128
STATES = ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes")


def errors(summary: dict) -> dict:
    """Relative error of the prediction per quantity: the worst rank for model states, the mean over ranks for
    activations and communication; None where the run does not count it."""
    plan, got = summary["memory_plan"], summary["accounting"]["per_rank"]
    out = {}
    for key in STATES:
        pairs = [(p[key], m[key]) for p, m in zip(plan["per_rank"], got) if m[key] is not None]
        out[key] = max((abs(p - m) / m if m else float(p != m) for p, m in pairs), default=None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    if got[0]["activation_bytes"] is not None:  # one micro-batch's (a pipeline stage holds several)
        m = mean([r["activation_bytes"] for r in got])
        p = mean([r["activation_bytes"] / r["micro_batches_in_flight"] for r in plan["per_rank"]])
        out["activation_bytes"] = abs(p - m) / m
    if got[0]["comm_bytes_per_step"] is not None:
        m = mean([sum(r["comm_bytes_per_step"].values()) for r in got])
        p = mean([sum(c.values()) for c in plan["comm_bytes_per_step_per_rank"]])
        out["comm"] = abs(p - m) / m if m else float(p != m)
    return out


def cell(x) -> str:
    return "n/c" if x is None else f"{100 * x:.2f} %"


def mib(b) -> str:
    return "n/c" if b is None else f"{b / 2**20:.2f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    opts = p.parse_args()
    rows, act_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, n, args) in enumerate(LAYOUTS):
            _, s, _ = harness(n, BASE + SHAPES + args, os.path.join(tmp, f"l{i}"))
            e, r0, m0 = errors(s), dict(s["memory_plan"]["per_rank"][0]), s["accounting"]["per_rank"][0]
            r0["activation_bytes"] //= r0["micro_batches_in_flight"]  # one micro-batch's, as counted
            rows.append(f"| {label} | {n} | " + " | ".join(
                f"{mib(r0[k])} / {mib(m0[k])} ({cell(e.get(k))})" for k in (*STATES, "activation_bytes"))
                + f" | {cell(e.get('comm'))} |")
            print(rows[-1], flush=True)
        for micro, seq in ACTIVATION_SHAPES:
            for label, args in (("full", ["--peft", "none"]), ("LoRA", ["--peft", "lora"])):
                _, s, _ = harness(1, BASE + ["--micro_batch_size", micro, "--seq_len", seq, "--strategy", "dp",
                                             "--ds_config", "ds_configs/dp_zero2.json", *args],
                                  os.path.join(tmp, f"a{micro}-{seq}-{label}"))
                pr, me = s["memory_plan"]["per_rank"][0], s["accounting"]["per_rank"][0]
                act_rows.append(f"| {micro} | {seq} | {label} | {mib(pr['activation_bytes'])} | "
                                f"{mib(me['activation_bytes'])} | {cell(errors(s)['activation_bytes'])} |")
                print(act_rows[-1], flush=True)
    lines = [
        "# The planner against what runs counted (CPU)", "",
        "- command: `python measurements/planner_vs_measured.py`",
        f"- {host_line()}; fp32, tiny models, two steps per run: `{' '.join(BASE + SHAPES)}`",
        "- each cell: predicted / counted MiB on rank 0, and the relative error (model states: the worst rank; "
        "activations (one micro-batch's) and communication: the mean over ranks). Formulas: docs/planner.md", "",
        "| layout | ranks | params | grads | optimizer | buffers | activations | communication / step |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "Activations at other shapes (dp ZeRO-2, 1 rank, tiny-llama):", "",
        "| micro batch | seq | fine-tune | predicted MiB | counted MiB | error |", "|---|---|---|---|---|---|",
        *act_rows, "",
        "Not shown: anything on a GPU (bf16 on the GPU, the allocator's peak, the CUDA allowance). The bf16 "
        "activation formula is checked on the CPU against autograd's saved bytes (tests/unit/test_planner.py).",
    ]
    write_page(lines, opts.out)


if __name__ == "__main__":
    main()
