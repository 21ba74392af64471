"""Strategy registry: --strategy name -> the class that owns everything that strategy does differently
(bench/strategies/base.py says what that is). Each plan makes its own instance (a strategy may keep per-run
state, such as Ulysses' mpu). Adding a strategy is one module and one line below. Importing the modules registers
their model-parallel dimensions (base.py DIMENSIONS: tp, ep, pp, sp)."""
from __future__ import annotations

from bench.strategies.autoep import AutoEP, AutoTPxEP
from bench.strategies.autotp import AutoTP
from bench.strategies.base import DIMENSIONS, Strategy, layout_of  # noqa: F401 - DIMENSIONS, layout_of: re-exported
from bench.strategies.pipeline import Hybrid, Pipeline
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
)}
