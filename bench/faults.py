"""Fault injection for the tests, and the only place the harness reads it: variables a user never sets.

    BENCH_FAULT_RANK=R         where the step faults below act (default: every rank)
    BENCH_FAULT_OOM_STEP=N     an out-of-memory error as step N starts (CUDA OOM cannot happen on the CPU)
    BENCH_FAULT_KILL_STEP=N    the process SIGKILLs itself as step N starts (the kernel's OOM killer)
    BENCH_FAULT_STOP_STEP=N    the process SIGSTOPs itself as step N starts (a rank that hangs: alive, silent)
    BENCH_FAULT_HANG_STEP=N    the process waits forever as step N starts, alive and beating, never entering the
                               step's collectives (a deadlock, a stuck data loader)
    BENCH_FAULT_SLOW_LOAD_S=S  the model load takes S seconds longer (signals during start-up)
    BENCH_FAULT_SLOW_STEP_S=S  every step takes S seconds longer, before its clock starts (a signal sent mid-run
                               lands before the last step on a machine where tiny steps take milliseconds; on one
                               rank: slow bookkeeping between steps, which the other ranks must not time)
"""
from __future__ import annotations

import os
import signal
import time


def _step(name: str, rank: int) -> int:
    target = os.environ.get("BENCH_FAULT_RANK")
    if target is not None and int(target) != rank:
        return 0
    return int(os.environ.get(name, 0))


class StepFaults:
    def __init__(self, rank: int):
        self.oom, self.kill, self.stop, self.hang = (_step(f"BENCH_FAULT_{k}_STEP", rank)
                                                     for k in ("OOM", "KILL", "STOP", "HANG"))
        target = os.environ.get("BENCH_FAULT_RANK")
        self.slow_s = float(os.environ.get("BENCH_FAULT_SLOW_STEP_S", 0)) if target in (None, str(rank)) else 0.0

    def at_step(self, step: int) -> None:
        """Called as each step starts."""
        if self.slow_s:  # no call at all on the hot path unless a test asks for it
            time.sleep(self.slow_s)
        if step == self.oom:
            import torch
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by BENCH_FAULT_OOM_STEP={step})")
        if step == self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        while step == self.hang:
            time.sleep(1)


def slow_load() -> None:
    time.sleep(float(os.environ.get("BENCH_FAULT_SLOW_LOAD_S", 0)))
