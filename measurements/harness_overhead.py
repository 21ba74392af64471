"""How much the harness costs: its wall time per measured step against a bare DeepSpeed loop doing the same
work (measurements/bare_deepspeed.py), plus the harness's time to first step split by phase.

    python measurements/harness_overhead.py [--repeats 5] [--out docs/results/harness_overhead_cpu.md] [-- harness args]

The harness's per-step cost (all-gather of step stats, metrics.jsonl, W&B offline log, console line, the
device-monitor thread) is inside its wall time, since the wall clock runs from the end of the warm-up step to
the end of the last step. Runs alternate harness/bare so drift in machine load hits both alike.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

from common import run, write_page  # measurements/common.py, next to this script

DEFAULT_ARGS = ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "none", "--max_steps", "80",
                "--warmup_steps", "5", "--micro_batch_size", "8", "--global_batch_size", "8", "--seq_len", "256",
                "--eval_interval", "0", "--eval_batches", "1"]


def harness_once(args, out_dir):
    run([sys.executable, "bench/run.py", "--output_dir", out_dir, *args])
    (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir)]
    with open(os.path.join(run_dir, "summary.json")) as fh:
        s = json.load(fh)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    w = s["warmup_steps"]
    # wall clock from the end of the last warm-up step to the end of the last step (elapsed_s is wall time)
    wall = recs[-1]["elapsed_s"] - recs[w - 1]["elapsed_s"]
    return run_dir, wall / (len(recs) - w), s


VARIANTS = {  # harness variants, each against the same bare loop
    "W&B disabled": ["--wandb_mode", "disabled"],
    "W&B offline, a record every step": ["--wandb_mode", "offline", "--log_interval", "1"],
    "W&B offline, a record every 10 steps": ["--wandb_mode", "offline", "--log_interval", "10"],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    opts, extra = p.parse_known_args()
    base = DEFAULT_ARGS + [a for a in extra if a != "--"]
    per_variant = {name: [] for name in VARIANTS}
    bare, startups = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            for j, (name, args) in enumerate(VARIANTS.items()):
                run_dir, per_step, s = harness_once(base + args, os.path.join(tmp, f"h{i}-{j}"))
                per_variant[name].append(per_step)
                startups.append({**s["startup_s"], "time_to_first_step_s": s["time_to_first_step_s"]})
            b = json.loads(run([sys.executable, "measurements/bare_deepspeed.py", run_dir]).strip().splitlines()[-1])
            bare.append(b["wall_s"] / b["measured_steps"])
            print(f"repeat {i}: bare {bare[-1] * 1e3:.2f} ms/step; harness "
                  + ", ".join(f"{v[-1] * 1e3:.2f}" for v in per_variant.values()), flush=True)
    b = statistics.median(bare)
    st = {k: statistics.median(x[k] for x in startups) for k in startups[0]}
    import torch
    import deepspeed
    rows = [f"| bare DeepSpeed loop | {b * 1e3:.2f} | 1 | {', '.join(f'{x * 1e3:.2f}' for x in bare)} |"]
    for name, xs in per_variant.items():
        h = statistics.median(xs)
        rows.append(f"| harness, {name} | {h * 1e3:.2f} | **{h / b:.3f}** ({100 * (h / b - 1):+.1f} %, "
                    f"{(h - b) * 1e3:+.2f} ms/step) | {', '.join(f'{x * 1e3:.2f}' for x in xs)} |")
    lines = [
        "# Harness overhead vs a bare DeepSpeed loop", "",
        f"- command: `python measurements/harness_overhead.py --repeats {opts.repeats} {' '.join(extra)}`".rstrip(),
        f"- common harness args: `{' '.join(base)}`",
        f"- host: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}; python {platform.python_version()}, "
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}; device: "
        + ("cuda" if s["memory"]["per_rank"][0]["peak_allocated_mib"] else "cpu"),
        "- wall time per measured step (warm-up excluded); harness and bare runs alternate within each repeat", "",
        "| | median ms/step | ratio to bare | all repeats (ms) |", "|---|---|---|---|", *rows, "",
        f"Noise: the bare loop's own repeats differ by {100 * (max(bare) / min(bare) - 1):.0f} % here (slowest over "
        "fastest); a ratio closer to 1 than that is not a measured difference.", "",
        "Time to first step (median over all harness runs), from process start:", "", "| phase | s |", "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in st.items()], "",
        "The phases are consecutive and add up to time_to_first_step_s (docs/metrics.md: startup_s).",
    ]
    write_page(lines, opts.out)


if __name__ == "__main__":
    main()
