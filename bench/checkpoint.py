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

import torch
import torch.distributed as dist

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
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"harness": {**harness_state, "rng": rng_state()}})
    dist.barrier()  # every rank's shard is on disk before the marker says so
    if dist.get_rank() == 0:
        with open(os.path.join(ckpt_dir, tag, MARKER), "w") as fh:
            json.dump({"step": step}, fh)
    dist.barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> dict:
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None or "harness" not in (client or {}):
        raise RuntimeError(f"checkpoint {os.path.join(ckpt_dir, tag)} could not be loaded")
    state = client["harness"]
    set_rng_state(state.pop("rng"))
    return state
