"""Load runs: run directories on disk (config.json, summary.json, metrics.jsonl) or the same records from W&B."""
from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field

from bench.config import recorded_flags
from bench.ds_config import precision_of
from bench.liveness import run_state
from bench.loggers import read_records
from bench.summary import unflatten


@dataclass
class Run:
    name: str
    summary: dict
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # metrics.jsonl records (step, loss, ...)
    path: str | None = None

    @property
    def status(self) -> str:
        return self.summary.get("status") or "unknown"

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def model(self) -> str:
        return self.summary.get("model") or "?"

    @property
    def gpus(self) -> int:
        return int(self.summary.get("world_size") or 0)

    @property
    def flags(self) -> dict:
        """The run's flags from config.json (flag name -> value), as recorded by section or, before, flat."""
        return recorded_flags(self.config.get("run") or {})

    @property
    def job(self) -> tuple:
        """What the run computes, apart from how it is laid out: model, sequence length, global batch, data,
        precision and packing. Runs of different jobs are never put in one table, ratio or plot."""
        s, run = self.summary, self.flags
        precision = s.get("precision") or precision_of(self.config.get("ds_config") or {})
        return (s.get("model"), s.get("seq_len"), s.get("global_batch_size"), run.get("data"), precision,
                s.get("batching"))  # packed | longest | max (bench/data.py Collate); None before it was recorded

    @property
    def job_title(self) -> str:
        """The job in words, e.g. 'tiny-llama, seq 128, global batch 4, squad-sample, fp32, packed'."""
        model, seq, batch, data, precision, batching = self.job
        data = os.path.basename(str(data).rstrip("/")) if data else data  # the file's name: a path says nothing more
        parts = [model or "?", f"seq {seq}", f"global batch {batch}", data, precision,
                 {"packed": "packed", "longest": "padded to the longest", "max": "padded"}.get(batching)]
        return ", ".join(str(p) for p in parts if p is not None)

    @property
    def strategy(self) -> str:
        """The strategy as compared, without the layout: strategy, ZeRO stage, what the engine keeps elsewhere
        (FSDP2 without resharding, offload), peft, activation checkpointing ("ckpt"), tiling, compiled, e.g.
        'dp zero2 lora', 'dp zero3 offload lora', 'fsdp2 no-reshard lora', 'dp zero2 lora compiled'."""
        s, run = self.summary, self.flags
        zero = f" zero{s['zero_stage']}" if s.get("zero_stage") is not None else ""  # every DeepSpeed strategy has one
        ds = self.config.get("ds_config") or {}
        fsdp2, zero_section = ds.get("fsdp2") or {}, ds.get("zero_optimization") or {}
        zero += " no-reshard" if fsdp2.get("reshard_after_forward") is False else ""
        offloaded = fsdp2.get("cpu_offload") or any((zero_section.get(f"offload_{k}") or {}).get("device", "none")
                                                    not in ("none", None) for k in ("optimizer", "param"))
        zero += " offload" if offloaded else ""
        recompute = " ckpt" if run.get("activation_checkpointing") else ""
        tiled = " tiled" if run.get("tiled_mlp") or run.get("tiled_loss") else ""
        compiled = " compiled" if run.get("compile") == "on" else ""
        return f"{s.get('strategy')}{zero} {s.get('peft')}{recompute}{tiled}{compiled}"

    @property
    def label(self) -> str:
        """The strategy and its layout, e.g. 'dp zero2 lora (dp2)'."""
        parts = [f"{k}{v}" for k, v in (self.summary.get("layout") or {}).items() if v and v > 1]
        return f"{self.strategy} ({'x'.join(parts) or 'single'})"


def _read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def load_dir(path: str) -> Run:
    summary = _read_json(os.path.join(path, "summary.json"))
    status, silent = run_state(path, summary.get("status"))
    if status == "lost":  # said `running`, but no rank has beaten for a while: it died without a word
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - silent))
        summary = {**summary, "status": "lost", "error": f"no heartbeat since {since} ({silent:.0f} s ago); the run "
                   "died without recording an ending (resume it with --resume auto)"}
    config = _read_json(os.path.join(path, "config.json")) if os.path.isfile(os.path.join(path, "config.json")) else {}
    history = []
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(metrics):
        history = read_records(metrics)
    return Run(os.path.basename(os.path.normpath(path)), summary, config, history, path)


def from_dirs(patterns: list[str]) -> list[Run]:
    """Each pattern is a run directory, a directory of run directories, or a glob of either."""
    found = []
    for pattern in patterns:
        for p in sorted(glob.glob(pattern)) or [pattern]:
            if os.path.isfile(os.path.join(p, "summary.json")):
                found.append(p)
            elif os.path.isdir(p):
                found += sorted(os.path.dirname(s) for s in glob.glob(os.path.join(p, "*", "summary.json")))
    if not found:
        raise FileNotFoundError(f"no run directory (with a summary.json) in {' '.join(patterns)}")
    return [load_dir(p) for p in dict.fromkeys(found)]


def from_wandb(path: str, group: str | None = None) -> list[Run]:
    """The same records from W&B (entity/project, optionally one group). Needs the W&B service; not exercised
    by the tests, which have no server."""
    import wandb
    api = wandb.Api()
    runs = api.runs(path, filters={"group": group} if group else None)
    out = []
    for r in runs:
        summary = unflatten(dict(r.summary))
        history = [row for row in r.scan_history(keys=["step", "loss"])]
        out.append(Run(r.name, summary, dict(r.config), history, None))
    if not out:
        raise FileNotFoundError(f"no W&B runs in {path}" + (f" group {group}" if group else ""))
    return out
