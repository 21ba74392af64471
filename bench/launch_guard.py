"""SIGTERM or SIGINT to the `deepspeed` command reaches the ranks, as it does under torchrun and srun.

DeepSpeed's single-node runner (deepspeed/launcher/runner.py `main`) installs no signal handler: SIGTERM (what
`timeout`, a container runtime's stop and `kill PID` send) ends it and leaves its per-node launcher
(deepspeed/launcher/launch.py) and the ranks running to the end; SIGINT raises KeyboardInterrupt in it alone.
scripts/install.sh puts a one-line .pth file (PTH) into the environment's site-packages that calls install() in
every Python process of the environment; it returns at once unless the process is the deepspeed runner, where it
installs a handler that forwards the signal to the ranks (the runner's grandchildren) and keeps the runner
waiting for them, so the run ends as SIGTERM to a rank ends it: a checkpoint at the next step boundary and
`preempted` (SIGINT: `interrupted`). Before forwarding it leaves a note (note_path) that the ranks read
(bench/signals.py) to say who received the signal, and to take a terminal's Ctrl-C, which reaches the ranks
themselves too, for the one signal it is. A SIGKILLed runner forwards nothing: the ranks see it gone
(bench/signals.py orphaned) and stop the same way.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time

PTH = "zz_bench_launch_guard.pth"  # after the editable install's own .pth, which makes `bench` importable
PTH_LINE = ("import sys, os; (os.path.basename((sys.argv or [''])[0]) in ('deepspeed', 'ds', 'deepspeed.pt') or "
            "'deepspeed.launcher.runner' in getattr(sys, 'orig_argv', ())) and "
            "__import__('bench.launch_guard').launch_guard.install()\n")
FORWARDED = (signal.SIGTERM, signal.SIGINT)
COMMANDS = ("deepspeed", "ds", "deepspeed.pt")  # the scripts DeepSpeed installs for its runner


def is_runner() -> bool:
    """This process is DeepSpeed's runner: the `deepspeed` command, or `python -m deepspeed.launcher.runner`."""
    argv = getattr(sys, "orig_argv", None) or sys.argv
    return bool(sys.argv[:1] and os.path.basename(sys.argv[0]) in COMMANDS) or "deepspeed.launcher.runner" in argv


def install() -> None:
    if is_runner():
        for sig in FORWARDED:
            signal.signal(sig, _forward)


def parent_of(pid: int) -> int | None:
    """A process's parent pid (from /proc), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and parent_of(int(name)) == pid]


def note_path(launcher_pid: int) -> str:
    """Where the runner notes a forwarded signal for the ranks whose parent (the per-node launcher) is this pid."""
    return os.path.join(tempfile.gettempdir(), f"bench-forwarded-signal-{launcher_pid}.json")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _forward(signum, frame):
    """Forward to the ranks of the per-node launcher(s) this runner started. Where there is none (the signal came
    during the runner's start-up, or a multi-node launcher such as mpirun or srun is its child), the signal does
    what it did without this handler: it ends the runner."""
    name = signal.Signals(signum).name
    launchers = [pid for pid in children(os.getpid()) if "deepspeed.launcher.launch" in _cmdline(pid)]
    ranks = {launcher: children(launcher) for launcher in launchers}
    if not any(ranks.values()):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for launcher in launchers:  # deepspeed.launcher.launch, whose children are the ranks
        try:
            with open(note_path(launcher), "w") as fh:
                json.dump({"signal": name, "to": "the deepspeed command", "pid": os.getpid(), "time": time.time()},
                          fh)
        except OSError:
            pass
        for rank in ranks[launcher]:
            try:
                os.kill(rank, signum)
            except ProcessLookupError:
                pass
    # the runner goes on waiting for its launcher, which exits with the ranks' code (75 preempted, 130 interrupted)


def forwarded(signame: str, within_s: float = 5.0) -> dict | None:
    """In a rank: the runner's note that it forwarded this signal to this rank's launcher's ranks, if recent."""
    try:
        with open(note_path(os.getppid())) as fh:
            note = json.load(fh)
    except (OSError, ValueError):
        return None
    return note if note.get("signal") == signame and time.time() - note.get("time", 0) < within_s else None
