"""Checkpoints that a preempted or crashed run resumes from exactly.

A checkpoint is DeepSpeed's own (model, optimizer, scheduler, per-rank shards) in <checkpoint_dir>/step<N>/,
plus the harness's state in DeepSpeed's client_state: the training result so far (step, losses, timings, goodput
counters), RNG states and the W&B run id. The data position needs no saving: the batch of step N is a pure
function of (seed, N). A checkpoint counts only once every rank has written its part and rank 0 has written the
COMPLETE marker after a barrier, so a checkpoint cut short by a kill is never picked.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import torch
import torch.distributed as dist

from bench.config import BenchError, recorded_flags

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: str) -> list[str]:
    """Checkpoint tags with their COMPLETE marker, newest first (rank 0 decides; every rank gets the same list)."""
    tags = [[]]
    if dist.get_rank() == 0 and os.path.isdir(ckpt_dir):
        tags[0] = sorted((t for t in os.listdir(ckpt_dir)
                          if t.startswith("step") and os.path.isfile(os.path.join(ckpt_dir, t, MARKER))), reverse=True)
    dist.broadcast_object_list(tags, src=0)
    return tags[0]


def load_newest_readable(engine, ckpt_dir: str, warn) -> tuple[str | None, dict | None]:
    """The newest complete checkpoint every rank can read, and its harness state; (None, None) if none. A
    checkpoint a rank cannot read (a truncated file) is skipped with a warning, and all ranks try the previous
    one together."""
    tried = False
    for tag in complete_tags(ckpt_dir):
        state, reason = None, None
        try:
            state = load(engine, ckpt_dir, tag)
        except Exception as e:  # noqa: BLE001 - any unreadable file; the reason goes into the warning
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        reasons = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, reason)
        bad = [r for r in reasons if r]
        if not bad:
            return tag, state
        warn(f"checkpoint {os.path.join(ckpt_dir, tag)} is unreadable ({bad[0]}); trying the previous one")
        tried = True
    if tried:  # a failed load may have changed part of the engine's state: never train on from that
        raise BenchError(f"no checkpoint in {ckpt_dir} could be read on every rank; resume is impossible without "
                         "one: start a new --run_name (or repair the newest checkpoint)")
    return None, None


# What defines an experiment: a resume whose settings differ from these would mix two experiments in one run.
RUN_DEFINING = ("model", "init", "strategy", "data", "seq_len", "seed", "peft", "lora_r", "lora_alpha",
                "lora_targets", "val_fraction", "activation_checkpointing", "compile")


def resume_differences(recorded: dict, now: dict) -> list[str]:
    """One line per setting that differs between a run's config.json and the resume's (max_steps may grow)."""
    lines = []
    old_flags, new_flags = recorded_flags(recorded["run"]), recorded_flags(now["run"])
    pairs = [(f"--{k}", old_flags.get(k), new_flags.get(k)) for k in RUN_DEFINING]
    pairs += [("world_size", recorded.get("world_size"), now.get("world_size")),
              ("layout", recorded.get("layout"), now.get("layout"))]
    pairs += [(f"batch {k}", recorded["batch"].get(k), now["batch"].get(k)) for k in ("global", "micro", "grad_accum")]
    ds_old, ds_new = recorded.get("ds_config", {}), now.get("ds_config", {})
    pairs += [(f"ds_config {k}", ds_old.get(k), ds_new.get(k)) for k in sorted(set(ds_old) | set(ds_new))]
    for name, old, new in pairs:
        if old != new:
            lines.append(f"{name}: {json.dumps(old)} when the run started, {json.dumps(new)} now")
    return lines


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str, step: int, harness_state: dict) -> str:
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    failed = [None]
    try:
        engine.save(ckpt_dir, tag, {"harness": {**harness_state, "rng": rng_state()}})
    except (OSError, RuntimeError) as e:
        failed[0] = io_error(e, path)
        if failed[0] is None:
            raise
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failed[0])  # every shard is on disk before the marker says so
    reasons = [r for r in everyone if r]
    if reasons:
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # never resumable; and its space lets the summary be written
        raise BenchError(f"could not write checkpoint {reasons[0]}; earlier checkpoints are intact")
    if dist.get_rank() == 0:
        with open(os.path.join(path, MARKER), "w") as fh:
            json.dump({"step": step}, fh)
    dist.barrier()
    return tag


WRITE_FAILURES = ("file write failed", "basic_ios::clear", "PytorchStreamWriter failed", "inline_container")


def io_error(e: BaseException, path: str) -> str | None:
    """'<path>: <reason>' when e (or what it was raised while handling) is a failed write (a full disk, a quota,
    a read-only filesystem), else None. torch's checkpoint writer reports a full disk as RuntimeErrors
    ("basic_ios::clear: iostream error", then "[enforce fail at inline_container.cc] unexpected pos")."""
    while e is not None:
        if isinstance(e, OSError):
            return f"{e.filename or path}: {e.strerror or e}"
        if any(s in str(e) for s in WRITE_FAILURES):
            return f"{path}: write failed (is the disk full?)"
        e = e.__context__
    return None


def load(engine, ckpt_dir: str, tag: str) -> dict:
    client = engine.load(ckpt_dir, tag)  # bench/engines: the engine's part, then the harness's state
    if client is None or "harness" not in client:
        raise RuntimeError(f"checkpoint {os.path.join(ckpt_dir, tag)} could not be loaded")
    state = client["harness"]
    set_rng_state(state.pop("rng"))
    return state
