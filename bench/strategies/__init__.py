"""Strategy registry: --strategy name -> the class that owns everything that strategy does differently
(bench/strategies/base.py says what that is). Each plan makes its own instance (a strategy may keep per-run
state, such as Ulysses' mpu). Adding a strategy, or a dimension (bench/layout.py), is one module and one line
below. Importing the modules registers their model-parallel dimensions (bench/layout.py DIMENSIONS: tp, ep, pp,
sp), in this order: a Layout can be made once this package is imported."""
from __future__ import annotations

from bench.config import BenchError
from bench.layout import DIMENSIONS, Layout, layout_of  # noqa: F401 - re-exported
from bench.strategies.autoep import AutoEP, AutoTPxEP
from bench.strategies.autotp import AutoTP
from bench.strategies.base import Strategy
from bench.strategies.pipeline import Hybrid, Pipeline
from bench.strategies.torch_dp import DDP, FSDP2
from bench.strategies.ulysses import SequenceParallel
from bench.strategies.zero import ZeroDP

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (
    ZeroDP,
    AutoTP,
    AutoEP,
    AutoTPxEP,
    Pipeline,
    Hybrid,
    SequenceParallel,
    DDP,
    FSDP2,
)}


def strategy_of(layout: Layout, engine: str = "deepspeed") -> str:
    """The strategy a layout is (--strategy's name, derived when it is left out): of the strategies of the
    ds_config's engine ("engine", default DeepSpeed) made of every dimension the layout turns on and claiming it,
    the one made of the fewest (ZeRO data parallelism: of none)."""
    on = layout.on()
    made_of = [s for s in STRATEGIES.values()
               if s.engine == engine and on <= set(s.dimensions) and s.claims(layout)]
    if not made_of:
        raise BenchError(f"no strategy runs {' and '.join(sorted(on))} together ({layout.describe()}); each "
                         "strategy's dimensions: " + ", ".join(f"{s.name} ({'+'.join(s.dimensions) or 'dp'})"
                                                                 for s in STRATEGIES.values()))
    return min(made_of, key=lambda s: len(s.dimensions)).name
