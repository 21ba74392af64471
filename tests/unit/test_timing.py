"""What the timed steps contain: no synchronization added by the harness's own measurements."""
import time

import pytest

pytestmark = pytest.mark.unit


def test_pipeline_busy_time_adds_no_synchronization(monkeypatch):
    """The per-stage busy time brackets each instruction without synchronizing the device (CUDA events on GPUs,
    the wall clock on the CPU): a synchronize there would serialize a stage's sends with its compute."""
    from deepspeed.accelerator import get_accelerator

    from bench.strategies.pipeline import BusyTimer

    def no_sync(*a, **k):
        raise AssertionError("the busy timer synchronized the device")
    monkeypatch.setattr(get_accelerator(), "synchronize", no_sync)
    timer = BusyTimer()
    for _ in range(3):
        mark = timer.start()
        time.sleep(0.02)
        timer.stop(mark)
    time.sleep(0.05)  # idle: not busy
    assert 0.06 <= timer.total() < 0.1
    timer.reset()
    assert timer.total() == 0.0


# What the runners run inside the timed window (bench/train.py Trainer.train_step: from the clock's start to the
# synchronize before it stops); the pipeline engine's own schedule is DeepSpeed's.
TIMED = {"bench/strategies/base.py": ("train_step", "_step", "forward", "backward"),
         "bench/strategies/ulysses.py": ("_slice", "_loss_sum", "_hidden_states", "_tiled_loss", "forward",
                                         "backward"),
         "bench/strategies/pipeline.py": ("train_step",)}


def test_the_timed_step_reads_nothing_back_and_adds_no_collective():
    """No host read of a device value (`.item()`, `.tolist()`, `int()` / `float()` of a tensor: each a device
    synchronization on a GPU) and no collective of the harness's own (`dist.*`) in the methods a timed step runs:
    the counts come from the collator's host-side lengths (bench/data.py MicroBatch) and Ulysses' loss parts are
    added by the per-step gather after the clock stops. (Ulysses once read its target-token count with int(...) and
    all-reduced each micro-batch's loss inside the step.)"""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    found = []
    for path, names in TIMED.items():
        tree = ast.parse((root / path).read_text())
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in names):
                for node in ast.walk(fn):
                    if not isinstance(node, ast.Call):
                        continue
                    f = node.func
                    if isinstance(f, ast.Attribute) and f.attr in ("item", "tolist", "cpu", "numpy"):
                        found.append(f"{path} {cls.name}.{fn.name}: .{f.attr}()")
                    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "dist":
                        found.append(f"{path} {cls.name}.{fn.name}: dist.{f.attr}")
                    if isinstance(f, ast.Name) and f.id in ("int", "float", "bool") and node.args and not \
                            isinstance(node.args[0], ast.Constant):
                        found.append(f"{path} {cls.name}.{fn.name}: {f.id}(...)")
    assert not found, found
