"""Tokenize once per node: the first local rank tokenizes what the run consumes (bench/data.py load_dataset) and
writes it to a cache file named by everything that determines it; the node's other ranks wait for that file, and
every rank maps it read-only (torch.load(mmap=True)), so a node holds one copy in the page cache, however many
ranks it runs. A later run with the same data, tokenizer and sampling reads the file instead of tokenizing.

If the first local rank fails (bad data), it leaves the error beside the file and the others raise the same line
instead of waiting: every rank exits with it."""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from bench import data
from bench.config import BenchError
from bench.sources import fingerprint

FIELDS = ("input_ids", "attention_mask", "labels", "index")


def cache_dir() -> str:
    """$BENCH_DATA_CACHE, else tokenized/ in the harness's cache ($BENCH_CACHE, which slurm/common.sh keeps away
    from $HOME)."""
    from bench.models import cache_dir as harness_cache
    return os.environ.get("BENCH_DATA_CACHE") or os.path.join(harness_cache(), "tokenized")


def cache_key(spec: str, tok, tokenizer_source: str, seq_len: int, val_fraction: float, seed: int,
              need: data.Need | None) -> str:
    """A hash of what determines the tokenized splits: the data's content (path, size and modification time; a
    hub name), the tokenizer, the sequence length, the split and the run's consumption."""
    parts = [fingerprint(spec), tokenizer_source, type(tok).__name__, len(tok), tok.pad_token_id,
             tok.bos_token_id, tok.eos_token_id, seq_len, val_fraction, seed,
             None if need is None else [need.global_batch, need.steps, need.val_samples], 1]  # 1: the file format
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def load(spec: str, tok, tokenizer_source: str, seq_len: int, val_fraction: float, seed: int,
         need: data.Need | None, local_rank: int, timeout_s: float) -> tuple[data.Tokenized, data.Tokenized]:
    path = os.path.join(cache_dir(), cache_key(spec, tok, tokenizer_source, seq_len, val_fraction, seed, need) + ".pt")
    started = time.time()
    if not os.path.exists(path):
        if local_rank == 0:
            _write(path, spec, tok, seq_len, val_fraction, seed, need)
        else:
            _wait(path, started, timeout_s)
    saved = torch.load(path, mmap=True, weights_only=True)
    return _tokenized(saved["train"]), _tokenized(saved["val"])


def _write(path: str, spec, tok, seq_len, val_fraction, seed, need) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    error = path + ".error"
    if os.path.exists(error):
        os.remove(error)
    try:
        train, val = data.load_dataset(spec, tok, seq_len, val_fraction, seed, need)
    except BenchError as e:
        with open(error, "w") as fh:
            fh.write(str(e))
        raise
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"train": _fields(train), "val": _fields(val)}, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none (concurrent writers write the same)


def _wait(path: str, started: float, timeout_s: float) -> None:
    error = path + ".error"
    while not os.path.exists(path):
        if os.path.exists(error) and os.path.getmtime(error) >= started - 1:
            with open(error) as fh:
                raise BenchError(fh.read().strip())
        if time.time() - started > timeout_s:
            raise BenchError(f"waited {timeout_s:.0f} s for local rank 0 to tokenize the data into {path}; is it "
                             "running? (a slow tokenization: raise --dist_timeout_s)")
        time.sleep(0.2)


def _fields(t: data.Tokenized) -> dict:
    return {**{k: getattr(t, k) for k in FIELDS if getattr(t, k) is not None},
            "pad_id": t.pad_id, "kind": t.kind, "split_size": t.split_size}


def _tokenized(d: dict) -> data.Tokenized:
    return data.Tokenized(d["input_ids"], d["attention_mask"], d["labels"], d["pad_id"], d["kind"], d.get("index"),
                          d["split_size"])
