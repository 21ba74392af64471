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

from bench.config import BenchError

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_complete(ckpt_dir: str) -> str | None:
    """The newest checkpoint tag with its COMPLETE marker (rank 0 decides; every rank gets the same answer)."""
    tag = [None]
    if dist.get_rank() == 0 and os.path.isdir(ckpt_dir):
        done = [t for t in os.listdir(ckpt_dir)
                if t.startswith("step") and os.path.isfile(os.path.join(ckpt_dir, t, MARKER))]
        tag[0] = max(done) if done else None
    dist.broadcast_object_list(tag, src=0)
    return tag[0]


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
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"harness": {**harness_state, "rng": rng_state()}})
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
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None or "harness" not in (client or {}):
        raise RuntimeError(f"checkpoint {os.path.join(ckpt_dir, tag)} could not be loaded")
    state = client["harness"]
    set_rng_state(state.pop("rng"))
    return state
