"""The W&B writer: a process of its own, at the lowest CPU priority, that turns JSON lines on its stdin into one
W&B run. Rank 0 starts it (bench/loggers.py: WandbLogger) and writes a line per record.

Why a process of its own: inside the rank, wandb.log costs about a millisecond of Python per record, taken from
the training loop, and W&B's service process competed with the ranks for the cores. Here it uses cores the ranks
leave idle, and what it has not written yet waits in the pipe; the run directory's metrics.jsonl stays the source
of truth. docs/results/harness_overhead_cpu.md measures what W&B still costs between steps.

Lines: {"init": wandb.init kwargs}, then any of {"log": record}, {"summary": dict}, and {"finish": exit code};
records and summaries nested as in metrics.jsonl and summary.json, flattened here ("a/b" keys). No torch imports:
it starts in a fraction of a second.
"""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.summary import flatten  # noqa: E402 - the one nested -> "a/b" mapping (light: no torch)
from bench.log import log


def lowest_priority() -> None:
    """SCHED_IDLE: run only on a core nothing else wants (W&B's own service process, started from here, inherits
    it). Where that policy does not exist, the lowest nice value."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main(done_fd: int) -> int:
    # Leave the rank's process tree at once (the rank's child exits; this grandchild lives on): the deepspeed
    # launcher terminates each rank's whole tree on Ctrl-C, W&B's service process included, and the rank, which
    # finishes its steps in order, would then lose the W&B run's tail. The rank waits for done_fd to close instead
    # of waiting for this process.
    if os.fork() > 0:
        os._exit(0)
    lowest_priority()
    # The rank decides when the run ends (a finish line, or end of input if it died): a signal meant for the job
    # does not end this process while the rank is still recording.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    del done_fd  # held open until this process exits: that is the rank's "done"
    first = sys.stdin.readline()
    if not first:
        return 0
    import wandb
    init = json.loads(first)["init"]
    try:
        # System stats off: the harness samples devices itself (device_monitor.csv). The summary is the harness's
        # own (summary.json, sent at the end), so W&B need not derive one from history after every record, which
        # doubled the records it writes per step.
        run = wandb.init(**init, settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                         x_server_side_derived_summary=True))
    except Exception as e:  # noqa: BLE001 - W&B trouble must not stop the run; the run directory has it all
        log.warning(f"W&B init failed, this run is not in W&B: {e}")
        for _ in sys.stdin:  # keep reading so the rank's writes never block on a full pipe
            pass
        return 1
    run.define_metric("step")  # every metric plotted against the optimizer step, not W&B's call counter
    run.define_metric("*", step_metric="step")
    exit_code = 1  # end of input without a finish line: the rank died
    for line in sys.stdin:
        kind, payload = next(iter(json.loads(line).items()))
        if kind == "finish":
            exit_code = payload
            break
        try:
            run.log(flatten(payload)) if kind == "log" else run.summary.update(flatten(payload))
        except Exception as e:  # noqa: BLE001
            log.warning(f"W&B {kind} failed: {e}")
    run.finish(exit_code=exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
