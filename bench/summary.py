"""summary.json, the metrics contract every consumer (analysis, W&B, tests) relies on, and its only writer.

KEYS lists every top-level key with a one-line meaning; docs/metrics.md explains each one (a test keeps the two
in step), and RunRecord refuses to write a key that is not listed. flatten/unflatten are the one mapping between
the nested record and the flat "a/b" keys of W&B and runs.csv.
"""
from __future__ import annotations

import json
import os
import platform
import socket

from bench import metrics
from bench.ds_config import precision_of

STATUSES = ("running", "completed", "failed", "oom", "preempted", "interrupted")

KEYS = {
    "status": "running | completed | failed | oom | preempted | interrupted",
    "error": "one line, or null",
    "strategy": "--strategy", "model": "--model", "peft": "lora | none, resolved",
    "world_size": "ranks", "layout": "{dp, tp, ep, pp, sp}",
    "zero_stage": "ZeRO stage of the resolved ds_config (null: another engine than DeepSpeed)",
    "engine": "what trained the model: deepspeed, ddp or fsdp2 (bench/engines)",
    "precision": "bf16 | fp16 | fp32: what the resolved ds_config trains in (--precision)",
    "dtypes": "{trainable, frozen, grad_accum[, compute]}: the dtypes the engine holds, and PyTorch's engines' compute "
              "dtype (bench/engines: Engine.describe)",
    "global_batch_size": "samples per optimizer step", "micro_batch_size": "samples per rank per forward",
    "grad_accum": "micro-batches per optimizer step", "seq_len": "the most tokens a sample keeps",
    "batching": "packed | longest | max: how a micro-batch's samples become rows (--packing, --padding)",
    "attention": "{implementation, kernel, mask}: the attention path that ran (mask: causal | documents | dense; "
                 "bench/attention.py)",
    "steps": "optimizer steps run", "max_steps": "--max_steps", "warmup_steps": "--warmup_steps",
    "measured_steps": "steps timed: this process's steps after max(--warmup_steps, the 2 instrumented ones)",
    "step_time_s": "{median, mean, p10, p90} slowest-rank step time over measured steps",
    "step_time_by_rank": "{per_rank[] {rank, min, median, max}, slowest_rank, slowest_over_fastest}: each rank's "
                         "own step times over measured steps",
    "tokens_per_s": "global real (non-padding) tokens per second", "tokens_per_s_per_gpu": "tokens_per_s / world_size",
    "computed_tokens_per_s": "global tokens per second the device processed, padding included",
    "computed_tokens_per_s_per_gpu": "computed_tokens_per_s / world_size",
    "hfu": "hardware FLOPs utilization: computed tokens, recomputation included, over peak_tflops",
    "samples_per_s": "global samples per second", "tflops_per_gpu": "model TFLOP/s per GPU",
    "mfu": "tflops_per_gpu / peak_tflops, null when the peak is unknown",
    "goodput": "{updates_per_s, tokens_per_s} of applied updates over the training phase",
    "applied_updates": "steps whose update every rank applied", "train_wall_time_s": "training phase wall time",
    "loss": "{first, last} reduced train loss", "val_loss": "last token-weighted validation loss",
    "target_loss": "--target_loss", "time_to_target_s": "training time until the loss reached the target",
    "steps_to_target": "first step at or below the target",
    "resumed_at": "checkpoint steps this run resumed from", "lost_steps": "steps recomputed after a resume",
    "lost_time_s": "wall time of the lost steps",
    "total_wall_time_s": "process start to end", "time_to_first_step_s": "process start to the end of step 1",
    "startup_s": "start-up phases in seconds", "flops_per_token": "training FLOPs per token",
    "peak_tflops": "device peak used for MFU", "peak_tflops_source": "where peak_tflops came from (bench/gpus.py)", "cpu_threads": "{per_rank, source, local_ranks}",
    "memory": "{per_rank[] (training peaks, every phase's, RSS before the model), device[], plan_check}",
    "optimizer": "{name, fused, wrapper}: the optimizer that ran (bench/engines: Engine.describe)", "params": "{total, trainable, before_peft, per_rank[]}",
    "accounting": "{per_rank[]}: bytes each rank holds by kind, counted from its tensors (bench/accounting.py)",
    "memory_plan": "the planner's prediction of the same per rank, made before launch (bench/estimate.py); "
                   "cost_features: what bench-plan --calibrate fits the step time with (bench/calibrate.py); on a "
                   "catalog GPU predicted_step: the uncalibrated cost model's step (bench/cost_model.py)",
    "compile": "{enabled, backend, deepcompile, compile_s, steps_compile_s, recompiled_steps, recompiled_s, graphs, "
               "graph_breaks, break_reasons, cache{dir, hits, misses, warm}, per_rank[]} (bench/compiling.py)",
    "sharding": "model-parallel runs: what deepspeed.initialize split or replaced",
    "experts_per_rank": "expert-parallel runs: experts each rank holds",
    "pipeline": "pipeline runs: stages, micro-batches, bubble, per-stage parameters",
    "versions": "python and library versions", "host": "hostname of rank 0", "slurm_job_id": "$SLURM_JOB_ID",
    "slurm_array_task_id": "$SLURM_ARRAY_TASK_ID", "run_dir": "the run directory",
    "wandb_run_id": "the W&B run's id, null when W&B is disabled",
}
# Written only by the strategies that have them (bench/strategies/*: after_initialize, after_training).
STRATEGY_SECTIONS = ("sharding", "experts_per_rank", "pipeline")


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


class RunRecord:
    """The summary of one run. Starts with every key known before training (a run that dies early still has a
    readable summary with its status) and is completed through the methods below, never by hand."""

    def __init__(self, plan, world_size: int):
        cfg, batch = plan.cfg, plan.batch
        self.data: dict = {}
        self.set(
            status="running", error=None, strategy=cfg.parallelism.strategy, engine=plan.strategy.engine,
            model=cfg.model.name, peft=plan.peft,
            world_size=world_size, layout=plan.layout.as_dict(),
            zero_stage=plan.zero_stage, precision=precision_of(plan.ds), dtypes=None, global_batch_size=batch.global_, micro_batch_size=batch.micro,
            grad_accum=batch.grad_accum, seq_len=cfg.data.seq_len,
            batching=plan.collate.mode, attention=plan.attention, steps=0, max_steps=cfg.training.max_steps,
            warmup_steps=cfg.training.warmup_steps, measured_steps=0, step_time_s=metrics.step_time_stats([]),
            step_time_by_rank=metrics.rank_step_time_stats([]), **plan.throughput([]),
            goodput={"updates_per_s": None, "tokens_per_s": None}, applied_updates=0, train_wall_time_s=None,
            loss={"first": None, "last": None}, val_loss=None, target_loss=cfg.training.target_loss,
            time_to_target_s=None, steps_to_target=None, resumed_at=[], lost_steps=0, lost_time_s=0.0,
            total_wall_time_s=None, time_to_first_step_s=None, startup_s={},
            flops_per_token=plan.flops_per_token, peak_tflops=plan.peak_tflops,
            peak_tflops_source=plan.peak_source, cpu_threads=None,
            memory={"per_rank": [], "device": [], "plan_check": None}, optimizer=None,
            params={"total": None, "trainable": None, "before_peft": None, "per_rank": []},
            memory_plan=plan.memory_plan, compile={"enabled": plan.cfg.compile.enable == "on"},
            **environment(), run_dir=None, wandb_run_id=None)

    def set(self, **values) -> None:
        unknown = [k for k in values if k not in KEYS]
        if unknown:  # a programming error: every key is documented before it is written
            raise KeyError(f"summary keys {unknown} are not in bench.summary.KEYS")
        self.data.update(values)

    def __getitem__(self, key: str):
        return self.data[key]

    def startup(self, **phases: float) -> None:
        self.data["startup_s"].update(phases)

    def memory(self, **parts: list) -> None:
        """memory.per_rank (rank-local figures, gathered) and memory.device (the device monitor's)."""
        self.data["memory"].update(parts)

    def end(self, status: str, error: str | None = None) -> None:
        assert status in STATUSES, status
        self.set(status=status, error=error)

    def fill_results(self, res, plan) -> None:
        """Everything the training loop measured, turned into the contract's numbers (formulas in metrics.py)."""
        ttt, stt = metrics.time_to_target(res.losses, plan.cfg.training.target_loss)
        self.set(
            steps=len(res.records), measured_steps=len(res.step_times), step_time_s=metrics.step_time_stats(res.step_times),
            step_time_by_rank=metrics.rank_step_time_stats(res.rank_step_times),
            **plan.throughput(res.step_times, res.measured_work),
            goodput=metrics.goodput(res.applied_updates, res.useful_tokens, res.train_wall_s),
            applied_updates=res.applied_updates, train_wall_time_s=res.train_wall_s,
            loss={"first": res.losses[0][1] if res.losses else None,
                  "last": res.losses[-1][1] if res.losses else None},
            val_loss=res.val_loss, time_to_target_s=ttt, steps_to_target=stt,
            resumed_at=res.resumed_at, lost_steps=res.lost_steps, lost_time_s=res.lost_s)

    @staticmethod
    def read_value(path: str, key: str):
        """One value of the summary at path (written by another rank), or None."""
        try:
            with open(path) as fh:
                return json.load(fh).get(key)
        except (OSError, ValueError):
            return None

    def adopt(self, path: str) -> None:
        """Take the values this record lacks from the summary already at path (written by a rank now gone)."""
        try:
            with open(path) as fh:
                earlier = json.load(fh)
        except (OSError, ValueError):
            return
        for key, value in earlier.items():
            if key in KEYS and self.data.get(key) is None:
                self.data[key] = value

    def write(self, path: str) -> None:
        from bench.loggers import write_json_atomic
        write_json_atomic(path, self.data)


def flatten(d: dict, prefix: str = "", lists_as_json: bool = False) -> dict:
    """Nested dicts -> "a/b" keys (W&B's summary, runs.csv). Lists stay as they are, or become JSON text for
    a CSV cell."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/", lists_as_json))
        else:
            out[key] = json.dumps(v) if lists_as_json and isinstance(v, list) else v
    return out


def unflatten(flat: dict) -> dict:
    """"a/b" keys back into the nested shape; W&B's own keys (leading underscore) are dropped."""
    out: dict = {}
    for key, value in flat.items():
        if key.startswith("_"):
            continue
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def result_table(s: dict) -> list[tuple[str, object]]:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    st = s["step_time_s"]
    c = s.get("compile") or {}  # runs recorded before compile was
    compiled = [("compile s | graphs | breaks | recompiled", f"{f(c['compile_s'], '.2f')} | {c['graphs']} | "
                 f"{c['graph_breaks']} | {len(c['recompiled_steps'])} step(s), untimed"
                 + (" | cache warm" if c["cache"]["warm"] else ""))] if c.get("compile_s") is not None else []
    return [
        ("status", s["status"]), ("run_dir", s["run_dir"]),
        ("steps (measured)", f"{s['steps']} ({len_measured(s)})"),
        ("step time s (median/mean/p90)", f"{f(st['median'], '.4f')} / {f(st['mean'], '.4f')} / {f(st['p90'], '.4f')}"),
        ("tokens/s real (per GPU)", f"{f(s['tokens_per_s'], '.1f')} ({f(s['tokens_per_s_per_gpu'], '.1f')})"),
        ("tokens/s computed (per GPU)", f"{f(s.get('computed_tokens_per_s'), '.1f')} "
                                        f"({f(s.get('computed_tokens_per_s_per_gpu'), '.1f')})"),
        ("samples/s", f(s["samples_per_s"], ".2f")),
        ("TFLOP/s per GPU | MFU | HFU", f"{f(s['tflops_per_gpu'], '.3f')} | {f(s['mfu'], '.2%')} | "
                                        f"{f(s.get('hfu'), '.2%')}"),
        ("goodput updates/s | tokens/s", f"{f(s['goodput']['updates_per_s'], '.3f')} | "
                                         f"{f(s['goodput']['tokens_per_s'], '.1f')}"),
        ("loss first -> last | val", f"{f(s['loss']['first'], '.4f')} -> {f(s['loss']['last'], '.4f')} | "
                                     f"{f(s['val_loss'], '.4f')}"),
        ("time to target loss s", f(s["time_to_target_s"], ".2f")),
        ("time to first step s", f(s["time_to_first_step_s"], ".2f")),
        ("total wall time s", f(s["total_wall_time_s"], ".2f")),
        ("peak memory MiB (rank 0)", _rank0_peak(s)),
        *compiled,
    ]


def len_measured(s: dict) -> int:
    return s.get("measured_steps", max(0, s["steps"] - s["warmup_steps"]))  # runs recorded before the key


def _rank0_peak(s: dict) -> str:
    ranks = s["memory"]["per_rank"]
    if not ranks:
        return "n/a"
    r, where = ranks[0], ""
    if r.get("peak_rss_mib") is None:  # no measured step: the peaks of the phase the run got to
        phase, r = next(reversed((ranks[0].get("phases") or {"?": {}}).items()))
        where = f" ({phase})"
    dev, rss = r.get("peak_allocated_mib"), r.get("peak_rss_mib")
    text = (f"allocated {dev:.0f}, " if dev is not None else "") + (f"rss {rss:.0f}" if rss is not None else "")
    return (text or "n/a") + where
