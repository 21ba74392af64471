"""The planner's and cost model's output over a fixed set of layouts, as one hash per layout: a restructuring that
must change no number is checked by running this before and after it.

    python measurements/planner_snapshot.py --check measurements/planner_snapshot.json   # after a change: exit 1 on any difference
    python measurements/planner_snapshot.py --write measurements/planner_snapshot.json   # after a deliberate change of a formula

The set: every shipped DeepSpeed ds_config x LLaMA 3.1 8B and Mixtral 8x7B (random init) x peft none/lora x packed/padded
rows x 2, 8 and 16 GPUs planned for an H100 (576 plans: bench/estimate.py estimate and bench/cost_model.py
step_breakdown), the sequence-parallel ones again with --tiled_mlp --tiled_loss on 32K rows (28), every ds_config
x the tiny presets x peft on 8 CPU processes (96), and --recommend for both models and both pefts on 8 H100s (4). A layout the harness refuses is part of the snapshot too: its one-line refusal.
--dump DIR writes each layout's full output as JSON, to see what changed.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GPU, GPU_NAME = "H100-80GB", "NVIDIA H100 80GB HBM3"


def combinations() -> list[tuple[str, list[str], int, str | None]]:
    """-> (key, bench/run.py flags, world size, GPU name or None for this machine's CPU)."""
    out = []
    configs = sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json")))
    for path in configs:
        name = os.path.basename(path)[:-5]
        for model in ("llama3.1-8b", "mixtral-8x7b"):
            for peft in ("none", "lora"):
                for packing in ("on", "off"):
                    for world in (2, 8, 16):
                        args = ["--model", model, "--init", "random", "--ds_config", path,
                                "--peft", peft, "--packing", packing]
                        out.append((f"{name}/{model}/{peft}/packing-{packing}/w{world}", args, world, GPU_NAME))
        if name.startswith("sp"):  # Ulysses' tiling terms, on long rows
            for model in ("llama3.1-8b", "mixtral-8x7b"):
                for peft in ("none", "lora"):
                    args = ["--model", model, "--init", "random", "--ds_config", path, "--peft", peft,
                            "--tiled_mlp", "--tiled_loss", "--seq_len", "32768", "--packing", "off"]
                    out.append((f"{name}/{model}/{peft}/tiled-32k/w8", args, 8, GPU_NAME))
        for model in ("tiny-llama", "tiny-mixtral"):
            for peft in ("none", "lora"):
                args = ["--model", model, "--ds_config", path, "--peft", peft]
                out.append((f"{name}/{model}/{peft}/cpu/w8", args, 8, None))
    return out


def plan_output(args: list[str], world: int, gpu: str | None) -> dict:
    from bench import config, cost_model, estimate, gpus
    from bench.plan import plan_layout
    try:
        plan = plan_layout(args, world, gpu)
        capacity = gpus.gpu_capacity(GPU, None) if gpu else None
        est = estimate.estimate(plan, capacity, device="cuda" if gpu else plan.device_type)
        out = {"estimate": est, "strategy": plan.cfg.parallelism.strategy}
        if gpu:
            out["step"] = cost_model.step_breakdown(plan, est, GPU)
        return out
    except config.BenchError as e:
        return {"refused": str(e)}


def recommend_output(model: str, peft: str) -> dict:
    from bench import config, gpus, recommend
    try:
        rows, notes = recommend.recommend(["--model", model, "--init", "random", "--peft", peft], 8, GPU,
                                          gpus.gpu_capacity(GPU, None))
        return {"rows": rows, "notes": notes}
    except config.BenchError as e:
        return {"refused": str(e)}


def digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def snapshot(dump: str | None) -> dict[str, str]:
    hashes = {}
    jobs = [(k, lambda a=a, w=w, g=g: plan_output(a, w, g)) for k, a, w, g in combinations()]
    jobs += [(f"recommend/{m}/{p}/w8", lambda m=m, p=p: recommend_output(m, p))
             for m in ("llama3.1-8b", "mixtral-8x7b") for p in ("none", "lora")]
    t0 = time.time()
    for i, (key, job) in enumerate(jobs, 1):
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger prints on import
            value = job()
        hashes[key] = digest(value)
        if dump:
            path = os.path.join(dump, key.replace("/", "__") + ".json")
            with open(path, "w") as fh:
                json.dump(value, fh, sort_keys=True, indent=1, default=str)
        if i % 50 == 0:
            print(f"{i}/{len(jobs)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return hashes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", metavar="FILE", help="compare with a snapshot written before; exit 1 on a difference")
    g.add_argument("--write", metavar="FILE", help="write this code's snapshot")
    p.add_argument("--dump", metavar="DIR", help="also write every layout's full output here")
    a = p.parse_args()
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
    hashes = snapshot(a.dump)
    if a.write:
        with open(a.write, "w") as fh:
            json.dump(hashes, fh, indent=0, sort_keys=True)
            fh.write("\n")
        print(f"{len(hashes)} layouts written to {a.write}")
        return 0
    with open(a.check) as fh:
        before = json.load(fh)
    changed = sorted(k for k in before.keys() | hashes.keys() if before.get(k) != hashes.get(k))
    for k in changed:
        print(f"differs: {k}")
    print(f"{len(hashes) - len(changed)} of {len(before.keys() | hashes.keys())} layouts identical")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
