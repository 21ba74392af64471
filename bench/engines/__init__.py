"""Training engines behind one seam (base.py `Engine`): what the harness creates from the model it built, steps,
checkpoints and asks for its gradient norm and learning rate. DeepSpeed's is the first (deepspeed.py); PyTorch's
DDP (ddp.py) and FSDP2 (fsdp2.py) share torch_base.py; each is one module here, named in ENGINES, with the same
records, launchers and tests (a strategy names its engine: bench/strategies/torch_dp.py).
"""
from __future__ import annotations

import importlib

from bench.engines.base import Engine

# name -> "module:class", imported when a run asks for it (importing an engine's library takes seconds)
ENGINES = {"deepspeed": "bench.engines.deepspeed:DeepSpeedEngine", "ddp": "bench.engines.ddp:DDPEngine",
           "fsdp2": "bench.engines.fsdp2:FSDP2Engine"}


def engine_class(name: str) -> type[Engine]:
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
