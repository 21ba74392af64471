"""One fine-tune three ways in one invocation: the harness (bench/run.py), a bare DeepSpeed loop
(measurements/bare_deepspeed.py) and transformers' Trainer with the same ds_config (measurements/hf_trainer.py).

    python measurements/side_by_side.py [--repeats 3] [--steps 40] [--out docs/results/side_by_side_cpu.md]
    python measurements/side_by_side.py --from_json docs/results/side_by_side_cpu.json --out ...  (page only)

Configurations: ZeRO-2 and ZeRO-3, full fine-tune and LoRA, 1 and 2 processes (torchrun for all three ways).
Each configuration's three runs follow each other, in an order rotated every repeat, so machine noise hits all
three alike. The bare loop and the Trainer redo the harness run's job (measurements/same_job.py): same model,
initial weights and adapters, resolved ds_config, batches in the same order, learning rate, clipping and steps.

Reported per configuration: step time (median and mean of the measured steps, warm-up excluded,
device-synchronized), wall time per measured step (everything each way does between steps included) and the
tokens/s it gives, peak memory (allocator on GPUs, RSS on the CPU), and the loss and grad-norm trajectories with
their largest relative difference from the harness's. The trajectories go to a JSON file beside the page.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

from common import harness, host_line, redo, write_page  # measurements/common.py, next to this script
import same_job

WAYS = ("harness", "bare", "trainer")
CONFIGS = [(stage, peft, nprocs) for nprocs in (1, 2) for stage in (2, 3) for peft in ("none", "lora")]
MICRO, ACCUM, SEQ = 4, 2, 256


def job_args(stage: int, peft: str, nprocs: int, steps: int, warmup: int) -> list[str]:
    """The harness's arguments for one configuration. W&B is off (the Trainer reports nowhere either);
    docs/results/harness_overhead_cpu.md measures the harness with W&B logging every step."""
    return ["--strategy", "dp", "--ds_config", f"ds_configs/dp_zero{stage}.json", "--peft", peft, "--lr", "1e-3",
            "--max_steps", str(steps), "--warmup_steps", str(warmup), "--micro_batch_size", str(MICRO),
            "--global_batch_size", str(MICRO * ACCUM * nprocs), "--seq_len", str(SEQ), "--eval_interval", "0",
            "--eval_batches", "1", "--wandb_mode", "disabled"]


def timing(m: dict, warmup: int, tokens_per_step: int) -> dict:
    steps, wall = m["step_time_s"][warmup:], same_job.wall_per_step(m, warmup)
    return {"median_ms": 1e3 * statistics.median(steps), "mean_ms": 1e3 * statistics.fmean(steps),
            "wall_ms": 1e3 * wall, "tokens_per_s": tokens_per_step / wall, "peak_mib": m["peak_memory_mib"]}


def max_rel_diff(a: list, b: list) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--configs", default=None, help="e.g. 2-lora-2,3-none-1 (stage-peft-processes); default: all 8")
    p.add_argument("--out", default=None)
    p.add_argument("--from_json", default=None, help="rebuild the page from a recorded run's JSON, running nothing")
    opts = p.parse_args()
    if opts.from_json:
        with open(opts.from_json) as fh:
            recorded = json.load(fh)
        configs = [(r["zero_stage"], r["peft"], r["processes"]) for r in recorded]
        results = {c: r["runs"] for c, r in zip(configs, recorded)}
        token_weighted = {c: r["trainer_token_weighted"] for c, r in zip(configs, recorded)
                          if r["trainer_token_weighted"]}
        opts.repeats, opts.steps = len(recorded[0]["runs"]["harness"]), len(recorded[0]["runs"]["harness"][0]["loss"])
        return write_page(page(opts, configs, results, token_weighted), opts.out)
    configs = CONFIGS if not opts.configs else [
        (int(s), f, int(n)) for s, f, n in (c.split("-") for c in opts.configs.split(","))]
    results = {c: {w: [] for w in WAYS} for c in configs}  # per config, per way: one merged record per repeat
    token_weighted, jobs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            for c in configs:
                stage, peft, nprocs = c
                order = WAYS[i % 3:] + WAYS[:i % 3] if c in jobs else WAYS  # the first harness run defines the job
                for way in order:
                    out = os.path.join(tmp, f"{i}-{stage}-{peft}-{nprocs}-{way}")
                    if way == "harness":
                        run_dir, _, m = harness(nprocs, job_args(*c, opts.steps, opts.warmup), out)
                        jobs.setdefault(c, run_dir)
                    else:
                        m = redo(way, jobs[c], nprocs, out)
                    results[c][way].append(m)
                if i == 0 and nprocs > 1:  # the Trainer's own default loss, for the parity note
                    token_weighted[c] = redo("trainer", jobs[c], nprocs, os.path.join(tmp, f"tw-{c}"),
                                             "--token_weighted")
                print(f"repeat {i} {c}: " + ", ".join(
                    f"{w} {timing(results[c][w][-1], opts.warmup, 1)['wall_ms']:.1f} ms/step" for w in WAYS),
                    flush=True)
    write_page(page(opts, configs, results, token_weighted), opts.out)
    if opts.out:
        with open(os.path.splitext(opts.out)[0] + ".json", "w") as fh:
            json.dump([{"zero_stage": c[0], "peft": c[1], "processes": c[2], "runs": results[c],
                        "trainer_token_weighted": token_weighted.get(c)} for c in configs], fh, indent=1)


def page(opts, configs, results, token_weighted) -> list[str]:
    rows, ratios, agree, spreads = [], [], [], []
    for c in configs:
        stage, peft, nprocs = c
        name = f"ZeRO-{stage}, {peft}, {nprocs} proc"
        tokens_per_step = MICRO * ACCUM * nprocs * SEQ
        t = {w: [timing(m, opts.warmup, tokens_per_step) for m in results[c][w]] for w in WAYS}
        ref = results[c]["harness"][0]
        for w in WAYS:
            med = {k: statistics.median(x[k] for x in t[w]) for k in t[w][0]}
            walls = [x["wall_ms"] for x in t[w]]
            spreads.append(max(walls) / min(walls) - 1)
            first = results[c][w][0]
            rows.append(f"| {name} | {w} | {med['median_ms']:.1f} | {med['mean_ms']:.1f} | {med['wall_ms']:.1f} | "
                        f"{med['tokens_per_s']:.0f} | {med['peak_mib']:.0f} | "
                        f"{max_rel_diff(first['loss'], ref['loss']):.1e} | "
                        f"{max_rel_diff(first['grad_norm'], ref['grad_norm']):.1e} |")
        for other in ("bare", "trainer"):
            rs = [h["wall_ms"] / o["wall_ms"] for h, o in zip(t["harness"], t[other])]
            ratios.append(f"| {name} | harness / {other} | **{statistics.median(rs):.3f}** | "
                          f"{', '.join(f'{r:.3f}' for r in rs)} |")
        if c in token_weighted:
            agree.append(f"| {name} | {max_rel_diff(token_weighted[c]['loss'], ref['loss']):.1e} | "
                         f"{max_rel_diff(token_weighted[c]['grad_norm'], ref['grad_norm']):.1e} |")
    return [
        "# The harness beside a bare DeepSpeed loop and the Hugging Face Trainer", "",
        f"- command: `python measurements/side_by_side.py --repeats {opts.repeats} --steps {opts.steps} "
        f"--warmup {opts.warmup}`",
        f"- {host_line()}, transformers {_version('transformers')}, accelerate {_version('accelerate')}",
        f"- job: tiny LLaMA, ZeRO data parallelism, micro batch {MICRO} x grad accum {ACCUM} per process, "
        f"seq_len {SEQ}, lr 1e-3 constant, clipping 1.0, {opts.steps} steps of which {opts.warmup} warm-up; "
        "harness with W&B off; every way launched by torchrun",
        "- step: device-synchronized time of one optimizer step (forward, backward, step of every micro-batch), "
        "slowest rank; wall: time per measured step from the end of the warm-up to the end of the last step, "
        "everything between steps included; tokens/s from wall; medians over the repeats", "",
        "| configuration | way | step median ms | step mean ms | wall ms/step | tokens/s | peak MiB | "
        "max rel. loss diff vs harness | max rel. grad-norm diff |", "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Wall time per step, ratios measured in the same repeat (below 1: the harness is faster):", "",
        "| configuration | ratio | median | each repeat |", "|---|---|---|---|", *ratios, "",
        f"Noise: one way's own repeats of one configuration differ by up to {100 * max(spreads):.0f} % (median "
        f"{100 * statistics.median(spreads):.0f} %, slowest over fastest) on this shared 2-core virtual machine, "
        "whose speed drifts within seconds (step times of a single run range over tens of percent). A ratio "
        "closer to 1 than that spread is not a measured difference; docs/results/harness_overhead_cpu.md measures "
        "the harness's own cost within each run instead.", "",
        "The Trainer with its own default loss (`average_tokens_across_devices`, loss kwargs passed to the model: "
        "the loss summed over every target token of the accumulated micro-batches on all ranks, divided by their "
        "count) against the harness's per-micro-batch mean (docs/parity.md):", "",
        "| configuration | max rel. loss diff | max rel. grad-norm diff |", "|---|---|---|", *agree,
    ]


def _version(module: str) -> str:
    import importlib.metadata
    return importlib.metadata.version(module)


if __name__ == "__main__":
    sys.exit(main())
