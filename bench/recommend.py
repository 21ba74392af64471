"""bench-plan --recommend: for one job (the --peft given), the shipped layouts (ds_configs/*.json, micro batches
1-8, with and without activation checkpointing) that fit the GPUs, ordered by the cost model's predicted step time
(bench/cost_model.py, its assumptions printed with the table), or by a calibration of it (bench/calibrate.py).
"""
from __future__ import annotations

import glob
import os

from bench import config, estimate
from bench.cost_model import assumptions, step_breakdown
from bench.plan import assemble, load_data, load_model, planning_config
from bench.spec import spec_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the shipped ds_configs/ live here

MICRO_BATCHES = (1, 2, 4, 8)


def candidates(args: list[str], world: int, gpu: str, reasons: list):
    """Plans for every shipped ds_config that suits the model and world size, for one job: the args' --peft (a
    full fine-tune and a LoRA run are different jobs, never ranked together; default none). Each ds_config is a
    run spec (bench/spec.py), planned with the one model config and data the job loads once; micro batch and
    checkpointing vary the spec (Plan.varied; the data's size is checked for micro 1 only). Without
    --global_batch_size every layout gets 8 samples per GPU per step, so micro batches 1-8 fit. Yields plans;
    reasons collects why the others were left out."""
    from bench.distributed import DistEnv
    if "--global_batch_size" not in args:
        args = [*args, "--global_batch_size", str(8 * world)]
    if "--peft" not in args:
        args = [*args, "--peft", "none"]
    job, env, device = planning_config(args, world), DistEnv(0, 0, 1), ("cuda", gpu, True)
    model, splits = None, []
    for path in sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))):
        path = os.path.relpath(path, REPO) if os.getcwd() == REPO else path
        cfg = job.with_flags(ds_config=path, micro_batch_size=1)  # the strategy is the ds_config's own
        try:
            spec = spec_of(cfg, world, lambda: (device[0], device[2]))
            model = model or load_model(cfg)

            def job_data(cfg=cfg, spec=spec, model=model):  # the same data for every spec: one global batch, micro 1
                if not splits:
                    splits.append(load_data(cfg, spec, model, env))
                return splits[0]
            base = assemble(cfg, spec, device, model, job_data)
        except config.BenchError as e:  # not a layout for this model or world: bench/run.py's own reason
            reasons.append(f"{path}: {e}")
            continue
        for micro in MICRO_BATCHES:
            accum, rest = divmod(base.batch.global_, micro * base.layout.data_parallel)
            if rest or not accum:
                continue
            plain = base.varied(micro, False)
            yield plain
            yield plain.varied(micro, True)  # its micro-batch shapes, planned once


def recommend(args: list[str], world: int, gpu: str, capacity: int, top: int = 20,
              calibration: dict | None = None) -> tuple[list[dict], list[str]]:
    """-> (the layouts that fit, fastest predicted first; the assumptions). With a calibration (bench/calibrate.py)
    the step times are the fitted model's, and the assumptions say which constants were fitted."""
    from bench import calibrate
    rows, reasons, planned = [], [], 0
    for plan in candidates(args, world, gpu, reasons):
        planned += 1
        est = estimate.estimate(plan, capacity)
        if not est["fits"]:
            continue
        parts = calibrate.breakdown(calibration, calibrate.features(plan, est)) if calibration \
            else step_breakdown(plan, est, gpu)
        rows.append({"strategy": plan.cfg.parallelism.strategy, "ds_config": plan.cfg.parallelism.ds_config,
                     "peft": plan.peft,
                     "micro_batch_size": plan.batch.micro,
                     "activation_checkpointing": plan.cfg.model.activation_checkpointing,
                     "peak_bytes": est["peak_bytes"], "comm_bytes_per_step": max(
                         sum(c.values()) for c in est["comm_bytes_per_step_per_rank"]),
                     "flops_per_rank_per_step": est["flops_per_rank_per_step"], **parts,
                     "computed_tokens_per_s_per_gpu": est["computed_tokens_per_step"] / parts["step_s"] / world})
    if not planned:  # nothing resolved: the user's own arguments are wrong, not the layouts
        raise config.BenchError("no layout could be planned; the first reason: " + (reasons[0] if reasons else
                                "no ds_configs/*.json found"))
    rows.sort(key=lambda r: r["step_s"])
    if calibration:  # the fitted model's constants, each said to be fitted or a default
        notes = [f"calibrated from {len(calibration['runs'])} runs on {', '.join(calibration['device'])} "
                 f"(bench-plan --calibrate); step s adds the overheads per micro-batch and per step; constants:",
                 *calibrate.describe(calibration)]
        return rows[:top], notes
    return rows[:top], assumptions(gpu, world)


def format_rows(rows: list[dict], notes: list[str]) -> str:
    job = f" (--peft {rows[0]['peft']})" if rows else ""
    head = f"{'strategy':<9}{'ds_config':<34}{'micro':>6}{'ckpt':>6}{'peak GiB':>10}{'compute':>9}{'recomp':>8}" \
           f"{'comm':>8}{'bubble':>8}{'offload':>8}{'step s':>9}{'tok/s/GPU':>11}"
    lines = [f"layouts that fit, fastest predicted first{job}; seconds per step in parts (bench/cost_model.py, "
             "docs/planner.md)", "-" * len(head), head]
    for r in rows:
        lines.append(f"{r['strategy']:<9}{r['ds_config']:<34}{r['micro_batch_size']:>6}"
                     f"{'on' if r['activation_checkpointing'] else 'off':>6}{r['peak_bytes'] / estimate.GIB:>10.1f}"
                     f"{r['compute_s']:>9.3f}{r['recompute_s']:>8.3f}{r['communication_s']:>8.3f}"
                     f"{r['bubble_s']:>8.3f}{r['offload_s']:>8.3f}{r['step_s']:>9.3f}"
                     f"{r['computed_tokens_per_s_per_gpu']:>11.0f}")
    if not rows:
        lines.append("(none fits: more GPUs, a shorter --seq_len, or a larger GPU)")
    return "\n".join(lines + ["assumptions:"] + [f"  - {n}" for n in notes])
