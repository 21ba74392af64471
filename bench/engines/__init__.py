"""Training engines behind one seam (base.py `Engine`): what the harness creates from the model it built, steps,
checkpoints and asks for its gradient norm and learning rate. DeepSpeed's is the first (deepspeed.py); another
(PyTorch FSDP2 or DDP) is one module here, named in ENGINES, with the same records, launchers and tests.
"""
from __future__ import annotations

import importlib

from bench.engines.base import Engine

# name -> "module:class", imported when a run asks for it (importing an engine's library takes seconds)
ENGINES = {"deepspeed": "bench.engines.deepspeed:DeepSpeedEngine"}


def engine_class(name: str) -> type[Engine]:
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
