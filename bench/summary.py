"""summary.json: the metrics contract every consumer (analysis, W&B, tests) relies on. See docs/metrics.md."""
from __future__ import annotations

import os
import platform
import socket

from bench import metrics

STATUSES = ("running", "completed", "failed", "oom", "preempted")


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers", "peft", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def environment() -> dict:
    return {"versions": versions(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}


def skeleton(cfg, layout, batch, ds: dict, world_size: int, peft: str) -> dict:
    """The keys known before training; a run that dies early still has a readable summary with its status."""
    return {
        "status": "running", "error": None, "strategy": cfg.strategy, "model": cfg.model, "peft": peft,
        "world_size": world_size,
        "layout": {"dp": layout.dp, "tp": layout.tp, "ep": layout.ep, "pp": layout.pp},
        "zero_stage": (ds.get("zero_optimization") or {}).get("stage", 0),
        "global_batch_size": batch.global_, "micro_batch_size": batch.micro, "grad_accum": batch.grad_accum,
        "seq_len": cfg.seq_len, "steps": 0, "max_steps": cfg.max_steps, "warmup_steps": cfg.warmup_steps,
        "step_time_s": metrics.step_time_stats([]), **metrics.throughput([], 0, 0, 1, 0, None),
        "goodput": {"updates_per_s": None, "tokens_per_s": None},
        "loss": {"first": None, "last": None}, "val_loss": None, "target_loss": cfg.target_loss,
        "time_to_target_s": None, "steps_to_target": None,
        "total_wall_time_s": None, "time_to_first_step_s": None, "startup_s": {},
        "flops_per_token": None, "peak_tflops": None,
        "memory": {"per_rank": [], "device": []}, "params": {"total": None, "trainable": None, "per_rank": []},
        **environment(), "run_dir": None, "wandb_run_id": None,
    }


def fill_results(summary: dict, res, *, global_batch: int, seq_len: int, world_size: int,
                 flops_per_token: float, peak_tflops: float | None, target_loss: float | None) -> None:
    """Everything the training loop measured, turned into the contract's numbers (formulas in metrics.py)."""
    ttt, stt = metrics.time_to_target(res.losses, target_loss)
    summary.update({
        "steps": len(res.records), "step_time_s": metrics.step_time_stats(res.step_times),
        **metrics.throughput(res.step_times, global_batch, seq_len, world_size, flops_per_token, peak_tflops),
        "goodput": metrics.goodput(res.applied_updates, res.useful_tokens, res.train_wall_s),
        "applied_updates": res.applied_updates, "train_wall_time_s": res.train_wall_s,
        "loss": {"first": res.losses[0][1] if res.losses else None,
                 "last": res.losses[-1][1] if res.losses else None},
        "val_loss": res.val_loss, "time_to_target_s": ttt, "steps_to_target": stt,
        "resumed_at": res.resumed_at, "lost_steps": res.lost_steps, "lost_time_s": res.lost_s,
        "flops_per_token": flops_per_token, "peak_tflops": peak_tflops,
    })


def result_table(s: dict) -> list[tuple[str, object]]:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    st = s["step_time_s"]
    return [
        ("status", s["status"]), ("run_dir", s["run_dir"]),
        ("steps (measured)", f"{s['steps']} ({len_measured(s)})"),
        ("step time s (median/mean/p90)", f"{f(st['median'], '.4f')} / {f(st['mean'], '.4f')} / {f(st['p90'], '.4f')}"),
        ("tokens/s (per GPU)", f"{f(s['tokens_per_s'], '.1f')} ({f(s['tokens_per_s_per_gpu'], '.1f')})"),
        ("samples/s", f(s["samples_per_s"], ".2f")),
        ("TFLOP/s per GPU | MFU", f"{f(s['tflops_per_gpu'], '.3f')} | {f(s['mfu'], '.2%')}"),
        ("goodput updates/s | tokens/s", f"{f(s['goodput']['updates_per_s'], '.3f')} | "
                                         f"{f(s['goodput']['tokens_per_s'], '.1f')}"),
        ("loss first -> last | val", f"{f(s['loss']['first'], '.4f')} -> {f(s['loss']['last'], '.4f')} | "
                                     f"{f(s['val_loss'], '.4f')}"),
        ("time to target loss s", f(s["time_to_target_s"], ".2f")),
        ("time to first step s", f(s["time_to_first_step_s"], ".2f")),
        ("total wall time s", f(s["total_wall_time_s"], ".2f")),
        ("peak memory MiB (rank 0)", _rank0_peak(s)),
    ]


def len_measured(s: dict) -> int:
    return max(0, s["steps"] - s["warmup_steps"])


def _rank0_peak(s: dict) -> str:
    ranks = s["memory"]["per_rank"]
    if not ranks:
        return "n/a"
    r = ranks[0]
    dev = r["peak_allocated_mib"]
    return (f"allocated {dev:.0f}, " if dev is not None else "") + f"rss {r['peak_rss_mib']:.0f}"
