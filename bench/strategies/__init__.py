"""Strategy registry. The parallelism itself lives in the ds_config; a strategy checks that the config has
its section (and no other strategy's) and prepares the model (LoRA wrap, sharding presets)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bench.strategies import autoep, autotp, pipeline, zero


def _same(ds, model_config):
    return ds


@dataclass(frozen=True)
class Strategy:
    name: str
    default_peft: str                      # what --peft auto means for this strategy
    check: Callable                        # (cfg, ds_config, layout, model_config) -> None, raises BenchError
    prepare: Callable                      # (model, LoRA-wrapped if --peft lora, cfg, ds_config) -> model
    resolve_ds: Callable = _same           # (resolved ds_config, model_config) -> ds_config with presets filled


STRATEGIES = {
    "dp": Strategy("dp", "lora", zero.check, zero.prepare),
    "tp": Strategy("tp", "none", autotp.check, autotp.prepare, autotp.with_moe_partition),
    "ep": Strategy("ep", "none", autoep.check, autoep.prepare),
    "tp_ep": Strategy("tp_ep", "none", autoep.check_tp_ep, autoep.prepare, autotp.with_moe_partition),
    "pp": Strategy("pp", "lora", pipeline.check, pipeline.prepare),
    "hybrid": Strategy("hybrid", "lora", pipeline.check_hybrid, pipeline.prepare),
}
