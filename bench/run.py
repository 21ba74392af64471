"""Entry point: parse -> resolve -> build -> train -> summarize.

    deepspeed --num_gpus 2 bench/run.py --strategy dp --ds_config ds_configs/dp_zero2.json
"""
import time

PROCESS_START = time.time()  # before the heavy imports, so time_to_first_step includes them

import faulthandler  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

# A rank that dies in native code (segfault, abort) prints where it was in Python, not just a signal number.
faulthandler.enable()

# torch.distributed deprecation notices raised inside DeepSpeed, once per rank per step: noise, not signal.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

if __package__ in (None, ""):  # run as a script (deepspeed bench/run.py): make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import signals  # noqa: E402
from bench.config import BenchError, parse_args  # noqa: E402
from bench.log import log, note, show  # noqa: E402


def main(argv=None) -> int:
    """-> the exit code of a refusal or dry run; a run that started leaves the process itself (os._exit)."""
    signals.install()  # from here on no signal ends the process without saying how
    try:
        cfg = parse_args(argv)
        from bench import distributed
        env = distributed.discover()
        from bench.log import configure
        configure(env.rank, cfg.logging.log_level, every_rank=cfg.logging.log_ranks == "all")
        from bench import device
        device.choose(cfg.training.device)  # before DeepSpeed picks its accelerator
        from bench.plan import resolve
        plan = resolve(cfg, env)  # every check, the memory plan's on a GPU included
    except BenchError as e:
        log.error(str(e))
        return 2
    except signals.Stopped as e:
        signals.closing()
        # Not an error line: this is also how a launcher stops the other ranks when one refused to start.
        note(f"{e} before the run started; nothing was recorded")
        return signals.EXIT_CODE[e.status]
    if env.rank == 0:
        from bench.plan_report import format_table
        show(plan.table())
        if cfg.training.dry_run and plan.memory_plan:
            show(format_table(plan.memory_plan))
    if cfg.training.dry_run:
        return 0
    from bench.session import Session
    code = Session(plan.cfg, env, plan, PROCESS_START).run()  # the configuration as resolved
    # Everything is recorded and the process group is torn down. Leave without the interpreter's teardown: there,
    # native backend threads destroyed in arbitrary order occasionally abort a rank that finished ("terminate
    # called without an active exception", seen once in a few hundred multi-rank CI runs), which the launcher then
    # reports as a failed job. Refusals above return normally: no process group exists yet.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
