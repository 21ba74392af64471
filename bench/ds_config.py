"""The ds_config: loading it (one line for a missing or malformed file), reading what it asks for (ZeRO stage,
offload, precision), and resolving its "auto" fields from the run's configuration (bench/config.py) and the device:
batch sizes, precision, optimizer. One resolved dict per run (bench/spec.py, Plan.ds) is what every engine gets.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

from bench.config import BenchError, RunConfig


def zero_stage(ds: dict) -> int:
    """The ZeRO stage a ds_config asks for (0 when it has no zero_optimization section)."""
    return (ds.get("zero_optimization") or {}).get("stage", 0)


def offloaded(ds: dict) -> list[str]:
    """What a ds_config's ZeRO offloads to host memory: "optimizer" and/or "param"."""
    zero = ds.get("zero_optimization") or {}
    for kind in ("optimizer", "param"):
        if not isinstance(zero.get(f"offload_{kind}") or {}, dict):
            raise BenchError(f"zero_optimization.offload_{kind} must be an object such as {{\"device\": \"cpu\"}}, "
                             f"got {zero[f'offload_{kind}']!r}")
    return [kind for kind in ("optimizer", "param")
            if (zero.get(f"offload_{kind}") or {}).get("device", "none") not in ("none", None)]


def load_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise BenchError(f"ds_config not found: {path} (see ds_configs/ for the shipped layouts)")
    with open(path) as fh:
        text = fh.read()
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(ds, dict):
        raise BenchError(f"{path}: top level must be a JSON object, got {type(ds).__name__}")
    return ds


@dataclass
class Batch:
    micro: int
    grad_accum: int
    global_: int


def resolve_batch(cfg: RunConfig, ds: dict, dp: int) -> Batch:
    """CLI > ds_config > defaults; returns sizes satisfying global = micro * grad_accum * dp, where dp is the
    number of data-parallel streams (Layout.data_parallel)."""
    def ds_int(key):
        v = ds.get(key, "auto")
        if v == "auto" or v is None:
            return None
        if not isinstance(v, int) or v <= 0:
            raise BenchError(f"ds_config {key} must be a positive integer or \"auto\", got {v!r}")
        return v

    micro = cfg.training.micro_batch_size or ds_int("train_micro_batch_size_per_gpu") or 2
    glob = cfg.training.global_batch_size or ds_int("train_batch_size")
    if glob is None:
        accum = ds_int("gradient_accumulation_steps") or 1
        glob = micro * accum * dp
    if glob % (micro * dp):
        raise BenchError(f"global batch {glob} is not divisible by micro batch {micro} x DP {dp} = {micro * dp}; "
                         f"pick a global batch that is a multiple of {micro * dp}")
    return Batch(micro=micro, grad_accum=glob // (micro * dp), global_=glob)


def resolve_ds_config(cfg: RunConfig, ds: dict, batch: Batch, device_type: str, bf16_ok: bool) -> dict:
    """Fill every "auto" and the CLI overrides; what this returns is what DeepSpeed gets and what is recorded."""
    ds = copy.deepcopy(ds)
    ds["train_micro_batch_size_per_gpu"] = batch.micro
    ds["gradient_accumulation_steps"] = batch.grad_accum
    # DeepSpeed derives train_batch_size as micro x accum x its world size, which under AutoTP is every rank,
    # not the data-parallel ones; left out, it cannot contradict the real global batch (config.json "batch").
    ds.pop("train_batch_size", None)
    for key, supported in (("bf16", bf16_ok), ("fp16", False)):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = supported
    _apply_precision(cfg.model.precision, ds, device_type, bf16_ok)
    if (ds.get("fp16") or {}).get("enabled") is True and device_type == "cpu":
        raise BenchError("fp16 is enabled in the ds_config but the CPU has no fp16 training path; "
                         "set \"fp16\": {\"enabled\": \"auto\"} or false")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    if cfg.optimizer.lr is not None or params.get("lr", "auto") == "auto":
        params["lr"] = cfg.optimizer.lr if cfg.optimizer.lr is not None else 3e-4
    resolve_optimizer(params, ds)
    # The harness logs to W&B itself; DeepSpeed's monitor would open a second run per rank.
    for monitor in ("wandb", "tensorboard", "csv_monitor", "comet"):
        if (ds.get(monitor) or {}).get("enabled"):
            ds[monitor]["enabled"] = False
    ds.setdefault("steps_per_print", 10 ** 9)  # silence DeepSpeed's own step log; the harness prints its own
    ds.setdefault("wall_clock_breakdown", False)
    remaining = _find_auto(ds)
    if remaining:
        raise BenchError(f"ds_config field {remaining} is \"auto\" but the harness cannot resolve it; set a value")
    return ds


def resolve_optimizer(params: dict, ds: dict) -> None:
    """torch_adam "auto": torch's AdamW with fused=True (one kernel per parameter group on GPUs and CPUs, nothing
    to compile; DeepSpeed passes the remaining params to it: engine.py, get_optimizer_configuration), except under
    ZeRO offload, whose optimizer is DeepSpeed's CPU Adam wherever it runs (built by install.sh)."""
    if params.get("torch_adam") != "auto":
        return
    params["torch_adam"] = not offloaded(ds)
    if params["torch_adam"] and "foreach" not in params:
        params.setdefault("fused", True)


def _apply_precision(precision: str, ds: dict, device_type: str, bf16_ok: bool) -> None:
    """--precision over the ds_config. bf16_ok says whether "auto" turns bf16 on (a GPU with bf16); asked for
    explicitly, bf16 also runs on the CPU (DeepSpeed's CPU accelerator supports it, is_bf16_supported)."""
    if precision == "auto":
        return
    if precision == "bf16" and device_type == "cuda" and not bf16_ok:
        raise BenchError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
    if ds.get("fp16"):  # one half precision at a time; fp32 has none
        ds["fp16"]["enabled"] = False
    if precision == "bf16" or ds.get("bf16"):
        ds.setdefault("bf16", {})["enabled"] = precision == "bf16"


def precision_of(ds: dict) -> str:
    """"bf16" | "fp16" | "fp32": what the resolved ds_config trains in (recorded as summary.precision)."""
    for key in ("bf16", "fp16"):
        if (ds.get(key) or {}).get("enabled"):
            return key
    return "fp32"


def element_bytes(ds: dict) -> int:
    """Bytes per element of what the resolved ds_config computes in: 4 in fp32, 2 in bf16 or fp16."""
    return 4 if precision_of(ds) == "fp32" else 2


def _find_auto(node, path=""):
    if node == "auto":
        return path or "<root>"
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        found = _find_auto(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None
