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
