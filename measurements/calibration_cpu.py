"""The calibrated cost model checked on this machine: every strategy of the CPU matrix run a few times, then for
each layout a calibration fitted on the others' runs alone (leave one layout out) predicts its median step.

    python measurements/calibration_cpu.py [--repeats 3] [--steps 15] [--out docs/results/calibration_cpu.md]
    python measurements/calibration_cpu.py --from_json docs/results/calibration_cpu.json --out ...  (page only)

Every run does the same work per model (strategy_matrix.py's job, fewer steps). The page gives, per layout, the
measured median step (median over repeats of each run's median, slowest rank), the held-out prediction and its
error, the median and worst absolute error, and Spearman's rank correlation between predicted and measured
steps. The uncalibrated model has constants for GPUs only (bench/cost_model.py): on the CPU it predicts no absolute
time, so the table's uncalibrated column is its ranking on an H100 for the same layouts, for the ordering alone.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

from common import REPO, add_page_args, harness, host_line, publish_page  # measurements/common.py, next to this script

sys.path.insert(0, REPO)
from bench import calibrate  # noqa: E402

JOB = ["--peft", "none", "--warmup_steps", "3", "--seq_len", "128", "--micro_batch_size", "2",
       "--global_batch_size", "8", "--eval_interval", "0", "--eval_batches", "1", "--packing", "off",
       "--wandb_mode", "disabled"]
TARGETS = {"median": 0.20, "worst": 0.50, "spearman": 0.8}  # issue 39's bar


def label(entry: dict) -> str:
    return f"{entry['model']} {os.path.basename(entry['ds_config'])[:-5]} x{entry['gpus']}"


def measure(matrix: list[dict], repeats: int, steps: int) -> dict:
    """{label: [calibrate.read_runs rows, one per repeat]}, repeats in rotating order."""
    out = {label(e): [] for e in matrix}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            order = matrix[i % len(matrix):] + matrix[:i % len(matrix)]
            for e in order:
                where = os.path.join(tmp, f"{i}-{label(e).replace(' ', '_')}")
                args = [*JOB, "--model", e["model"], "--strategy", e["strategy"], "--ds_config", e["ds_config"],
                        "--max_steps", str(steps)]
                run_dir, _, _ = harness(e["gpus"], args, where)
                row = calibrate.read_run(run_dir)
                out[label(e)].append(row)
                print(f"repeat {i} {label(e)}: {row['step_s']:.4f} s", file=sys.stderr, flush=True)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def held_out(results: dict) -> list[dict]:
    rows = []
    for name, runs in results.items():
        others = [r for other, rs in results.items() if other != name for r in rs]
        cal = calibrate.fit(others)
        measured = statistics.median(r["step_s"] for r in runs)
        predicted = calibrate.predict(cal, runs[0]["features"])
        rows.append({"layout": name, "measured_s": measured, "predicted_s": predicted,
                     "error": abs(predicted - measured) / measured})
    return rows


def page(opts, results: dict) -> list[str]:
    rows = held_out(results)
    errors = [r["error"] for r in rows]
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    med, worst = statistics.median(errors), max(errors)
    met = med <= TARGETS["median"] and worst <= TARGETS["worst"] and rho >= TARGETS["spearman"]
    full = calibrate.fit([r for rs in results.values() for r in rs])
    lines = ["# The calibrated cost model on the CPU matrix (leave one layout out)", "",
             f"Rerun: `python measurements/calibration_cpu.py --repeats {opts.repeats} --steps {opts.steps} "
             f"--out {opts.out}`", "", host_line(), "",
             f"Every layout of {opts.matrix}, {opts.repeats} repeats of {opts.steps} steps (tiny "
             "models, fp32, padded rows of 128, micro-batch 2, global batch 8). For each layout the calibration is "
             "fitted on the other layouts' runs only (bench/calibrate.py) and predicts its median step.", "",
             f"**Median absolute error {med:.0%} (bar {TARGETS['median']:.0%}), worst {worst:.0%} (bar "
             f"{TARGETS['worst']:.0%}), Spearman {rho:.2f} (bar {TARGETS['spearman']}): "
             f"{'met' if met else 'not met'}.**", "",
             "| layout | measured step s | predicted (held out) s | error |", "|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['measured_s']:.4f} | {r['predicted_s']:.4f} | {r['error']:.0%} |" for r in rows]
    lines += ["", "The fit on every run (what `bench-plan --calibrate` writes from them):", "",
              *[f"- {line}" for line in calibrate.describe(full)], "",
              "The uncalibrated model has no CPU constants (its compute and links are a GPU's, bench/cost_model.py), "
              "so it predicts no CPU time to compare; its published-figure ratios stay within 0.7-1.3 "
              "(tests/unit/test_cost_model.py, docs/results/cost_model.md)."]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matrix", default="measurements/cpu_matrix.json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    add_page_args(p)
    opts = p.parse_args()

    def run_matrix():
        with open(opts.matrix) as fh:
            return measure(json.load(fh), opts.repeats, opts.steps)
    publish_page(opts, run_matrix, page)


if __name__ == "__main__":
    os.chdir(REPO)
    main()
