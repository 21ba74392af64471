"""A hang with every rank alive: a collective that never completes, a deadlock, a stuck data loader.

The heartbeat (bench/liveness.py) sees a rank that died or stopped; it cannot see one that is alive and waiting.
Only the process group's timeout (--dist_timeout_s) would end such a run, and under NCCL its watchdog kills the
process before anything is written. This watchdog fires first: when no training step completes within its bound,
it writes every thread's Python stack to the run directory (hang.rank<N>.txt), and the session records the run
`failed` with "hung at step N" and the frame the main thread waits in, then the process exits non-zero. Every rank
runs one, so every rank leaves: the hung one and those waiting for it in a collective.

The bound is --hang_timeout_s, or by default max(10 x the median step so far, 300 s); the 300 s floor is kept
under 80 % of --dist_timeout_s, so that a hang in the first steps is recorded before a collective's timeout ends
the process (10 x a step longer than that stays the bound: a run of long steps is never called hung). Evaluation
and checkpoint saves are not steps: the watchdog waits while they run (suspended()).
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time

DEFAULT_FLOOR_S = 300.0
STEPS_PER_BOUND = 10


def bound(hang_timeout_s: float | None, step_times: list[float], dist_timeout_s: float) -> float:
    """Seconds without a completed step after which the run is hung."""
    if hang_timeout_s is not None:
        return hang_timeout_s
    typical = STEPS_PER_BOUND * statistics.median(step_times) if step_times else 0.0
    return max(typical, min(DEFAULT_FLOOR_S, 0.8 * dist_timeout_s))


def main_frame() -> str:
    """Where the main thread is now: its innermost Python frame as 'file:line in function'."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "an unknown frame"
    return f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


def dump_stacks(run_dir: str, rank: int) -> str:
    """Every thread's Python stack to <run dir>/hang.rank<N>.txt. -> its path."""
    path = os.path.join(run_dir, f"hang.rank{rank}.txt")
    with open(path, "w") as fh:
        fh.write(f"rank {rank}, pid {os.getpid()}: no training step completed in time; every thread's stack\n")
        fh.flush()
        faulthandler.dump_traceback(file=fh, all_threads=True)
    return path


class HangWatchdog:
    """Calls on_hang(step, seconds silent, bound, frame) once, from its own thread, when no progress() came within
    the bound; step is the step that did not complete."""

    def __init__(self, hang_timeout_s: float | None, dist_timeout_s: float, on_hang, poll_s: float = 1.0):
        self.hang_timeout_s, self.dist_timeout_s, self.on_hang, self.poll_s = hang_timeout_s, dist_timeout_s, \
            on_hang, poll_s
        self.step, self.step_times = 1, []
        self._last, self._paused = time.monotonic(), False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hang-watchdog", daemon=True)

    def start(self, step: int) -> "HangWatchdog":
        self.step, self._last = step, time.monotonic()
        self._thread.start()
        return self

    def progress(self, completed: int, step_time: float | None = None) -> None:
        """Step `completed` is done (and everything after it: records, evaluation, checkpoint)."""
        if step_time is not None:
            self.step_times.append(step_time)
        self.step, self._last = completed + 1, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def suspended(self):
        """Not a step (an evaluation, a checkpoint save): no verdict while it runs; the clock restarts after it."""
        self._paused = True
        try:
            yield
        finally:
            self._last, self._paused = time.monotonic(), False

    def _loop(self):
        while not self._stop.wait(self.poll_s):
            if self._paused:
                continue
            limit = bound(self.hang_timeout_s, self.step_times, self.dist_timeout_s)
            silent = time.monotonic() - self._last
            if silent > limit:
                self._stop.set()
                self.on_hang(self.step, silent, limit, main_frame())
