"""A run's shape, typed and resolved from the ds_config and the command line alone, without a model or data: the
layout's degrees, ZeRO stage and offload, precision, peft, batch, sequence, checkpointing and packing. The strategy
is a label derived from the layout (strategy_of); a given --strategy is checked against it by that strategy's own
`check` (one line when it disagrees). bench/plan.py adds the model, the data and the device; --recommend
(bench/recommend.py) enumerates specs.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

from bench import config, ds_config
from bench.engines import ENGINES
from bench.layout import Layout, layout_of
from bench.strategies import STRATEGIES, strategy_of


@dataclass(frozen=True, eq=False)  # eq=False: it holds a dict, compared and hashed by identity
class RunSpec:
    layout: Layout
    strategy: str                  # --strategy as given, else the layout's (strategy_of)
    ds: dict                       # the ds_config with every "auto" resolved (before a strategy's model presets)
    batch: ds_config.Batch
    peft: str                      # lora | none ("auto": the strategy's default)
    seq_len: int
    activation_checkpointing: bool
    packing: str                   # --packing, --padding as given: the data's kind settles them (data.Collate)
    padding: str

    @property
    def zero_stage(self) -> int:
        return ds_config.zero_stage(self.ds)

    @property
    def offload(self) -> list[str]:
        """What ZeRO offloads to host memory: "optimizer" and/or "param"."""
        return ds_config.offloaded(self.ds)

    @property
    def precision(self) -> str:
        return ds_config.precision_of(self.ds)

    def varied(self, micro: int, activation_checkpointing: bool) -> "RunSpec":
        """This spec with another micro batch (the global batch kept) and checkpointing: --recommend's variants."""
        accum, rest = divmod(self.batch.global_, micro * self.layout.data_parallel)
        if rest or not accum:
            raise config.BenchError(f"micro batch {micro} x data-parallel {self.layout.data_parallel} does not divide "
                                    f"the global batch {self.batch.global_}")
        batch = ds_config.Batch(micro, accum, self.batch.global_)
        ds = copy.deepcopy(self.ds)
        ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
        return dataclasses.replace(self, batch=batch, ds=ds, activation_checkpointing=activation_checkpointing)


def spec_of(cfg: config.RunConfig, world: int, device: Callable[[], tuple[str, bool]]) -> RunSpec:
    """The spec of a run of `world` processes; one line for a ds_config, layout or batch that cannot run. device:
    -> (its type, whether it has bf16), asked only once the cheap checks have passed (it may start CUDA)."""
    asked = cfg.parallelism.strategy
    if asked is not None and asked not in STRATEGIES:
        raise config.BenchError(f"unknown strategy {asked!r}; choose one of {', '.join(STRATEGIES)} (or "
                                "leave --strategy out: the ds_config's layout says it)")
    ds_raw = ds_config.load_ds_config(cfg.parallelism.ds_config)
    engine = ds_raw.get("engine", "deepspeed")
    if engine not in ENGINES:
        raise config.BenchError(f"{cfg.parallelism.ds_config}: unknown engine {engine!r}; choose one of "
                                f"{', '.join(ENGINES)} (bench/engines)")
    layout = layout_of(ds_raw, world)
    strategy = asked or strategy_of(layout, engine)
    peft = STRATEGIES[strategy].default_peft if cfg.model.peft == "auto" else cfg.model.peft
    batch = ds_config.resolve_batch(cfg, ds_raw, layout.data_parallel)
    ds = ds_config.resolve_ds_config(cfg, ds_raw, batch, *device())
    return RunSpec(layout, strategy, ds, batch, peft, cfg.data.seq_len, cfg.model.activation_checkpointing,
                   cfg.data.packing, cfg.data.padding)
