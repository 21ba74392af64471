"""The hang watchdog's bound and verdict (bench/watchdog.py), in-process: a run of long steps is never called hung,
evaluations and checkpoint saves are not steps, and a silence past the bound is reported once, with the step."""
import threading
import time

import pytest

from bench import watchdog

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("given,steps,dist,expected", [
    (7.0, [1.0], 600, 7.0),  # --hang_timeout_s wins
    (None, [], 600, 300.0), (None, [0.1] * 5, 600, 300.0),  # the floor
    (None, [0.1], 60, 48.0),  # the floor under 0.8 x --dist_timeout_s
    (None, [100.0, 120.0, 110.0], 600, 1100.0)])  # ten long steps: never capped below them
def test_the_bound(given, steps, dist, expected):
    assert watchdog.bound(given, steps, dist) == pytest.approx(expected)


def test_a_silence_past_the_bound_is_reported_once_and_a_suspended_one_is_not():
    fired = []
    dog = watchdog.HangWatchdog(0.3, 600, lambda *a: fired.append(a), poll_s=0.05).start(1)
    for step in range(1, 4):
        time.sleep(0.1)
        dog.progress(step, 0.1)
    with dog.suspended():  # an evaluation or a checkpoint save longer than the bound
        time.sleep(0.6)
    assert fired == []
    time.sleep(0.8)
    dog.stop()
    assert len(fired) == 1
    step, silent, limit, frame = fired[0]
    assert step == 4 and silent > 0.3 and limit == 0.3
    assert "test_watchdog.py" in frame and "in test_a_silence" in frame  # where the main thread was


def test_the_stacks_of_every_thread_are_written(tmp_path):
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="waiter")
    t.start()
    try:
        text = open(watchdog.dump_stacks(str(tmp_path), 3)).read()
    finally:
        stop.set()
        t.join()
    assert text.startswith("rank 3, pid") and "test_the_stacks_of_every_thread_are_written" in text
    assert text.lower().count("thread 0x") >= 2  # this one ("Current thread") and the waiter
