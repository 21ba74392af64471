"""Strategy registry. The parallelism itself lives in the ds_config; a strategy checks that the config has
its section (and no other strategy's) and prepares the model (LoRA wrap, sharding presets)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bench.strategies import zero


@dataclass(frozen=True)
class Strategy:
    name: str
    default_peft: str                      # what --peft auto means for this strategy
    check: Callable                        # (cfg, ds_config, layout, model_config) -> None, raises BenchError
    prepare: Callable                      # (model, cfg, ds_config) -> model


STRATEGIES = {
    "dp": Strategy("dp", "lora", zero.check, zero.prepare),
}
