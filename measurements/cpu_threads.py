"""CPU threads per rank: the README's default job (2 processes, ZeRO-2 + LoRA, tiny LLaMA) against the same job
without LoRA, and against the oversubscribed setting the deepspeed launcher used to leave (every rank one thread
per core), in one interleaved run.

    python measurements/cpu_threads.py [--repeats 3] [--out docs/results/cpu_threads.md] [-- extra bench/run.py args]

Each rank now runs cores // ranks-on-this-host threads (bench/distributed.py: set_cpu_threads) unless
OMP_NUM_THREADS is set, which is how the "oversubscribed" variant restores the old behaviour.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from common import host_line, run, write_page  # measurements/common.py, next to this script

from bench.distributed import free_port

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
VARIANTS = {  # name -> (extra args, extra environment)
    "LoRA (default job), cores // ranks threads": ([], {}),
    "--peft none, cores // ranks threads": (["--peft", "none"], {}),
    f"LoRA, OMP_NUM_THREADS={CORES} per rank (oversubscribed)": ([], {"OMP_NUM_THREADS": str(CORES)}),
}


def launch(args: list[str], env: dict, out_dir: str) -> tuple[dict, float]:
    """One 2-process run of bench/run.py under the deepspeed launcher. -> (summary, launcher wall seconds)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "bench/run.py", "--output_dir", out_dir, "--wandb_mode", "disabled", *args]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.time()
    try:
        run(cmd)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    wall = time.time() - t0
    (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir)]
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh), wall


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    opts, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    steps = {name: [] for name in VARIANTS}
    walls, first_steps, threads = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            for j, (name, (args, env)) in enumerate(VARIANTS.items()):
                s, wall = launch([*args, *extra], env, os.path.join(tmp, f"{i}-{j}"))
                steps[name].append(s["step_time_s"]["median"])
                threads[name] = s["cpu_threads"]
                if j == 0:
                    walls.append(wall)
                    first_steps.append(s["time_to_first_step_s"])
            print(f"repeat {i}: " + ", ".join(f"{v[-1] * 1e3:.1f} ms" for v in steps.values()), flush=True)
    med = {name: statistics.median(v) for name, v in steps.items()}
    lora, none, over = (med[n] for n in VARIANTS)
    rows = [f"| {name} | {threads[name]['per_rank']} ({threads[name]['source']}) | {med[name] * 1e3:.1f} | "
            f"{med[name] / none:.2f} | {', '.join(f'{x * 1e3:.1f}' for x in steps[name])} |" for name in VARIANTS]
    lines = [
        "# CPU threads per rank", "",
        f"- command: `python measurements/cpu_threads.py --repeats {opts.repeats} {' '.join(extra)}`".rstrip(),
        f"- {host_line()}",
        "- job: `deepspeed --num_gpus 2 bench/run.py` defaults (ZeRO-2, LoRA, tiny-llama, 20 steps, 2 warm-up); "
        "variants interleaved within each repeat", "",
        "| variant | threads per rank | median step ms | ratio to --peft none | all repeats (ms) |",
        "|---|---|---|---|---|", *rows, "",
        f"LoRA / no LoRA: **{lora / none:.2f}x** (required: at most 1.2x). "
        f"Oversubscribed / default: **{over / lora:.1f}x** slower.", "",
        f"The default job's whole launch (deepspeed launcher start to exit, after install): median "
        f"{statistics.median(walls):.1f} s over {len(walls)} runs ({', '.join(f'{w:.1f}' for w in walls)}); "
        f"its time to first step (process start to the end of step 1, rank 0): median "
        f"{statistics.median(first_steps):.1f} s ({', '.join(f'{t:.1f}' for t in first_steps)}).",
    ]
    write_page(lines, opts.out)


if __name__ == "__main__":
    main()
