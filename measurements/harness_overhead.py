"""How much the harness costs: its wall time per measured step against a bare DeepSpeed loop doing the same
work (measurements/bare_deepspeed.py), plus the harness's time to first step split by phase.

    python measurements/harness_overhead.py [--repeats 5] [--out docs/results/harness_overhead_cpu.md] [-- harness args]

The harness's per-step cost (all-gather of step stats, metrics.jsonl, the hand-off to the W&B writer, console
line, the device-monitor thread) is inside its wall time, since the wall clock runs from the end of the warm-up
step to the end of the last step. Runs alternate harness/bare, each way in a different position every repeat,
so drift in machine load hits all alike. Beside
the ratio, which machine noise blurs, the page gives the part measured within each run: the time between one
step's clock stopping and the next one's starting (the harness's bookkeeping, or the bare loop's nothing).
"""
import argparse
import os
import statistics
import tempfile

from common import harness, host_line, redo, write_page  # measurements/common.py, next to this script
import same_job

DEFAULT_ARGS = ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "none", "--max_steps", "80",
                "--warmup_steps", "5", "--micro_batch_size", "8", "--global_batch_size", "8", "--seq_len", "256",
                "--eval_interval", "0", "--eval_batches", "1"]


def per_step(m: dict, warmup: int) -> tuple[float, float]:
    """-> (wall seconds per measured step, median seconds between a step's end and the next step's start)."""
    e = m["elapsed_s"]
    gaps = [b - a - t for a, b, t in zip(e[warmup - 1:], e[warmup:], m["step_time_s"][warmup:])]
    return same_job.wall_per_step(m, warmup), statistics.median(gaps)


VARIANTS = {  # harness variants, each against the same bare loop
    "W&B disabled": ["--wandb_mode", "disabled"],
    "W&B offline, a record every step": ["--wandb_mode", "offline", "--log_interval", "1"],
    "W&B offline, a record every 10 steps": ["--wandb_mode", "offline", "--log_interval", "10"],
}


def sequential(opts, base, job, warmup, tmp) -> tuple[list, dict, list]:
    """Every way in turn within a repeat, in an order rotated every repeat. -> (bare's, each variant's
    (wall, gap) per repeat, the harness runs' summaries)."""
    per_variant = {name: [] for name in VARIANTS}
    bare, summaries = [], []
    ways = ["bare", *VARIANTS]
    for i in range(opts.repeats):
        for j, way in enumerate(ways[i % len(ways):] + ways[:i % len(ways)]):  # every way in every position
            if way == "bare":
                bare.append(per_step(redo("bare", job, 1, os.path.join(tmp, f"b{i}")), warmup))
                continue
            _, s, m = harness(1, base + VARIANTS[way], os.path.join(tmp, f"h{i}-{j}"))
            per_variant[way].append(per_step(m, warmup))
            summaries.append(s)
        print(f"repeat {i}: bare {bare[-1][0] * 1e3:.2f} ms/step; harness "
              + ", ".join(f"{v[-1][0] * 1e3:.2f}" for v in per_variant.values()), flush=True)
    return bare, per_variant, summaries


def concurrent(opts, base, job, warmup, tmp) -> tuple[dict, dict, list]:
    """Each variant paired with a bare loop at the same time, each pinned to its own core (one thread each), the
    cores swapped every pair: drift in machine load hits both alike, and neither competes with the other for a
    core. The harness's W&B writer and monitor thread share the harness's core, so their cost stays in. ->
    (bare's and each variant's (wall, gap) per repeat, the harness runs' summaries)."""
    from concurrent.futures import ThreadPoolExecutor
    bare = {name: [] for name in VARIANTS}
    per_variant = {name: [] for name in VARIANTS}
    summaries = []
    with ThreadPoolExecutor(2) as pool:
        for i in range(opts.repeats):
            for j, way in enumerate(VARIANTS):
                h_core, b_core = ("0", "1") if (i + j) % 2 == 0 else ("1", "0")
                h = pool.submit(harness, 1, base + VARIANTS[way], os.path.join(tmp, f"h{i}-{j}"), h_core)
                b = pool.submit(redo, "bare", job, 1, os.path.join(tmp, f"b{i}-{j}"), cores=b_core)
                _, s, m = h.result()
                per_variant[way].append(per_step(m, warmup))
                bare[way].append(per_step(b.result(), warmup))
                summaries.append(s)
            print(f"repeat {i}: " + ", ".join(f"{v[-1][0] * 1e3:.2f} vs bare {b[-1][0] * 1e3:.2f}"
                                              for v, b in zip(per_variant.values(), bare.values())), flush=True)
    return bare, per_variant, summaries


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--concurrent", action="store_true",
                   help="run each harness variant and a bare loop at the same time, each pinned to its own core")
    p.add_argument("--out", default=None)
    opts, extra = p.parse_known_args()
    base = DEFAULT_ARGS + [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        job, s, _ = harness(1, base + ["--wandb_mode", "disabled"], os.path.join(tmp, "job"))  # what bare redoes
        warmup = s["steps"] - s["measured_steps"]  # the harness's untimed steps (warm-up, instrumented)
        if opts.concurrent:
            bare, per_variant, summaries = concurrent(opts, base, job, warmup, tmp)
        else:
            b, per_variant, summaries = sequential(opts, base, job, warmup, tmp)
            bare = {name: b for name in VARIANTS}
    all_bare = list({id(x): x for xs in bare.values() for x in xs}.values())
    b, b_gap = (statistics.median(x[k] for x in all_bare) for k in (0, 1))
    st = {k: statistics.median({**x["startup_s"], "time_to_first_step_s": x["time_to_first_step_s"]}[k]
                               for x in summaries) for k in [*summaries[0]["startup_s"], "time_to_first_step_s"]}
    rows = [f"| bare DeepSpeed loop | {b * 1e3:.2f} | 1 | {b_gap * 1e3:.3f} | "
            f"{', '.join(f'{x[0] * 1e3:.2f}' for x in all_bare)} |"]
    for name, xs in per_variant.items():
        h, gap = (statistics.median(x[k] for x in xs) for k in (0, 1))
        ratios = [x[0] / y[0] for x, y in zip(xs, bare[name])]  # within a repeat: the same machine state
        r = statistics.median(ratios)
        rows.append(f"| harness, {name} | {h * 1e3:.2f} | **{r:.3f}** ({100 * (r - 1):+.1f} %; geometric mean "
                    f"{statistics.geometric_mean(ratios):.3f}; "
                    f"{', '.join(f'{x:.3f}' for x in ratios)}) | {gap * 1e3:.3f} ({100 * (gap - b_gap) / b:+.2f} % "
                    f"of a bare step) | {', '.join(f'{x[0] * 1e3:.2f}' for x in xs)} |")
    bare_walls = [x[0] for x in all_bare]
    how = ("each harness variant and a bare loop run at the same time, each pinned to its own core (taskset, one "
           "thread each), the cores swapped every pair; the ratio to bare is taken within each pair"
           if opts.concurrent else "the four ways run in turn within each repeat, in an order rotated every repeat, "
           "and the ratio to bare is taken within each repeat")
    lines = [
        "# Harness overhead vs a bare DeepSpeed loop" + (", run concurrently on pinned cores" if opts.concurrent
                                                         else ""), "",
        f"- command: `python measurements/harness_overhead.py --repeats {opts.repeats}"
        f"{' --concurrent' if opts.concurrent else ''} {' '.join(extra)}`".rstrip(),
        f"- common harness args: `{' '.join(base)}`",
        f"- {host_line()}; device: " + ("cuda" if s["memory"]["per_rank"][0]["peak_allocated_mib"] else "cpu"),
        f"- wall time per measured step (warm-up excluded); {how} (median, then every repeat's)", "",
        "| | median wall ms/step | ratio to bare | ms between steps (median) | all repeats (ms/step) |",
        "|---|---|---|---|---|", *rows, "",
        f"Noise: the bare loop's own repeats differ by {100 * (max(bare_walls) / min(bare_walls) - 1):.0f} % here "
        "(slowest over fastest). The time between steps is measured within each run, so machine drift does not "
        "blur it.", "",
        "Time to first step (median over all harness runs), from process start:", "", "| phase | s |", "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in st.items()], "",
        "The phases are consecutive and add up to time_to_first_step_s (docs/metrics.md: startup_s).",
    ]
    if opts.concurrent:
        lines += ["", "Pinned to one core, the harness's W&B writer (bench/wandb_writer.py, SCHED_IDLE) and W&B's own "
                  "service process can only use the core the rank trains on, so every millisecond W&B spends on a "
                  "record is taken from training: the difference between the W&B rows and the W&B-disabled row, "
                  "between steps, is W&B's own per-record cost (wandb.Run.log is about 0.7 ms of Python per record "
                  "here, plus its Go service), not the harness's. Unpinned, as the default job runs, the writer "
                  "takes whatever CPU the ranks leave idle (docs/results/harness_overhead_cpu.md)."]
    write_page(lines, opts.out)


if __name__ == "__main__":
    main()
