"""How a signalled run ends: recorded, never left "running".

SIGTERM and SIGUSR1 (SLURM's warning ahead of preemption or the time limit) mean "preempted": a resumable run
saves and the job is requeued (exit 75). SIGINT (Ctrl-C) means "interrupted" (exit 130). During training the
ranks only note the signal and agree on it at the next step boundary, so they stop together after the same step
with every finished step recorded; a second Ctrl-C leaves at once. Before training starts there is nothing to
finish, so the signal stops the start-up where it is (raises Stopped), and the run records how it ended.
"""
from __future__ import annotations

import os
import signal
import time

from bench.launch_guard import forwarded, parent_of

STATUS = {signal.SIGINT: "interrupted", signal.SIGTERM: "preempted", signal.SIGUSR1: "preempted",
          signal.SIGHUP: "preempted"}
EXIT_CODE = {"interrupted": 130, "preempted": 75}  # 130 = 128 + SIGINT; 75 = EX_TEMPFAIL, requeued by slurm/
STOP_CODES = {None: 0, "preempted": 1, "interrupted": 2}  # what a rank tells the others at a step boundary

_requested: tuple[str, str] | None = None  # (status, signal name) of the first signal
_training = False
_closing = False  # recording how the run ended: nothing may interrupt that
_parent: int | None = None  # the launcher: this process's parent at start
_command: int | None = None  # under the deepspeed launcher: the `deepspeed` command, the launcher's parent
_told_orphan = False
_orphan_reason: str | None = None  # what orphaned() found, for the SIGHUP it sends
_first_at = 0.0  # when the first signal was handled (time.time())


class Stopped(BaseException):
    """A signal ended the run before (or, a second Ctrl-C, during) a step boundary. A BaseException, like
    KeyboardInterrupt, so that no library's `except Exception` swallows it."""

    def __init__(self, status: str, signame: str, twice: bool = False):
        super().__init__(f"stopped by {signame}")
        self.status, self.signame, self.twice = status, signame, twice


def _handler(signum, frame):
    global _requested, _closing, _first_at
    if _closing:
        return
    name = signal.Signals(signum).name
    if signum == signal.SIGHUP and _orphan_reason is None and os.getppid() == _parent:
        return  # the launcher is alive: a thread of it ended (PR_SET_PDEATHSIG follows threads), not the process
    # Claimed before anything that could let a second signal in (file reads): a nested handler sees this one
    first = _requested is None
    if first:
        _requested, _first_at = (STATUS[signum], name), time.time()
    if signum == signal.SIGHUP:
        name = f"SIGHUP: {_orphan_reason or f'its launcher (pid {_parent}) exited'}"
    else:
        note = forwarded(name)  # the deepspeed command forwarded this signal (bench/launch_guard.py)
        if note is not None:
            if not first and _requested[1].startswith(name) and abs(note["time"] - _first_at) < 1.0:
                return  # one Ctrl-C, twice: from the terminal to every process, and forwarded by the runner
            name = f"{name} to {note['to']} (pid {note['pid']}), forwarded to every rank"
    if first:
        _requested = (STATUS[signum], name)
    if not _training or (not first and signum == signal.SIGINT):
        # Leaving now: a signal that follows (the launcher's SIGTERM after a Ctrl-C, or after a peer failed) must
        # not interrupt the recording of how the run ended.
        _closing = True
        raise Stopped(*_requested, twice=_training)


def install() -> None:
    """From process start: every one of these signals is handled, whatever phase the run is in. A rank whose
    launcher goes away (the per-node launcher SIGKILLed, torchrun's agent gone) is told with SIGHUP by the kernel
    (PR_SET_PDEATHSIG) and stops at the next step boundary like a preempted one, saying why, instead of running
    on as an orphan; the heartbeat thread checks the parent too (orphaned() below) where prctl is missing."""
    global _parent, _command
    _parent = os.getppid()
    if "LOCAL_SIZE" in os.environ:  # a rank of deepspeed.launcher.launch
        _command = parent_of(_parent)
    for sig in STATUS:
        signal.signal(sig, _handler)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGHUP))  # 1 = PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def orphaned() -> bool:
    """This process's launcher has exited (it was re-parented), or, under the deepspeed launcher, the `deepspeed`
    command above it has (SIGKILLed, or SIGTERMed where bench/launch_guard.py is not installed: the launcher
    was re-parented). Tells this process with SIGHUP, once."""
    global _told_orphan, _orphan_reason
    if _parent is None or _told_orphan:
        return False
    if os.getppid() != _parent:
        reason = None  # the handler names the launcher
    elif _command is not None and parent_of(_parent) not in (_command, None):
        reason = f"the deepspeed command (pid {_command}) above its launcher exited"
    else:
        return False
    _told_orphan, _orphan_reason = True, reason
    os.kill(os.getpid(), signal.SIGHUP)
    return True


def training(active: bool) -> None:
    """Inside the training loop signals wait for the step boundary; outside they stop the run at once."""
    global _training, _closing
    _training = active
    if active and _requested is not None:  # signalled just before the loop began
        _closing = True
        raise Stopped(*_requested)


def closing() -> None:
    """From here on the run only records how it ended and leaves; later signals are ignored (the deepspeed
    launcher follows a Ctrl-C with SIGTERM to every rank, which must not cut the summary short)."""
    global _closing
    _closing = True


def requested() -> str | None:
    """The status a signal asked for ("preempted" / "interrupted"), or None."""
    return _requested[0] if _requested else None


def requested_signal() -> str | None:
    return _requested[1] if _requested else None
