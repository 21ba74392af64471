"""Fixtures and collection rules. Tests live in tests/unit/ (in-process: formulas, parsers, refusals, records;
marked unit) and tests/integration/ (real launches, SLURM, the browser); what they share is tests/support/."""
from __future__ import annotations

import signal

import pytest

from bench.distributed import free_port
from support import PARITY_ARGS, LaunchGuard, run_many
from support.bad_input import write_bad_files

KINDS = ("unit", "multiproc", "cluster", "browser")  # registered in setup.cfg


def pytest_collection_modifyitems(config, items):
    """Every test says what it needs, so `-m unit` is the whole fast suite and nothing else."""
    unmarked = [f"{item.nodeid} {sorted(kinds)}" for item in items
                if len(kinds := {m.name for m in item.iter_markers()} & set(KINDS)) != 1]
    if unmarked:
        raise pytest.UsageError(f"tests need exactly one of the markers {KINDS}: " + "; ".join(unmarked))
    # the folder is the tier: tests/unit/ holds the unit tests and nothing else
    misplaced = [item.nodeid for item in items
                 if ("/unit/" in f"/{item.nodeid}") != (item.get_closest_marker("unit") is not None)]
    if misplaced:
        raise pytest.UsageError("unit tests live in tests/unit/ and nothing else does: " + "; ".join(misplaced))


@pytest.fixture(autouse=True)
def _unit_tests_launch_nothing(request):
    LaunchGuard.in_unit_test = request.node.get_closest_marker("unit") is not None
    yield
    LaunchGuard.in_unit_test = False


# What a launcher or bench.distributed.discover() sets in the environment.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
               "OMP_NUM_THREADS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
               "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


@pytest.fixture
def launch_env(monkeypatch):
    """A clean launcher environment for in-process tests: every variable a launcher or discover() sets is
    cleared now and restored afterwards, and so are the signal handlers. -> set(**vars)."""
    for k in LAUNCH_VARS:
        monkeypatch.setenv(k, "")  # registers the variable, so monkeypatch restores what discover() writes
        monkeypatch.delenv(k)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}

    def set_vars(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))
    yield set_vars
    for s, h in handlers.items():  # bench.run.main() installs the run's own handlers in this process
        signal.signal(s, h)


@pytest.fixture
def refuse(launch_env, capfd, tmp_path):
    """Runs bench/run.py's main() in this process as rank 0 of a world of `ranks` (as a launcher would start
    it, without any process group: refusals happen before one exists). -> (exit code, error lines)."""
    from bench.run import main

    def run(*args: str, ranks: int = 1) -> tuple[int, list[str]]:
        launch_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
        code = main(["--output_dir", str(tmp_path / "runs"), "--wandb_mode", "disabled", *args])
        err = capfd.readouterr().err
        assert not (tmp_path / "runs").exists(), "a refused run leaves no run directory"
        return code, [line for line in err.splitlines() if line.startswith("error:")]
    return run


@pytest.fixture(scope="session")
def zero_runs(tmp_path_factory):
    """The same model, data and global batch of 4: one process (grad_accum 2) and two processes under
    plain data parallelism (ZeRO stage 0, srun-style), ZeRO-1 (torchrun), ZeRO-2 (deepspeed launcher, W&B offline; and accelerate launch) and ZeRO-3 (srun-style
    environment)."""
    root = tmp_path_factory.mktemp("zero")
    zero = lambda stage: (*PARITY_ARGS, "--ds_config", f"ds_configs/dp_zero{stage}.json")  # noqa: E731
    runs = run_many({
        "w1": (root / "w1", zero(2), {}),
        "zero0": (root / "zero0", zero(0), {"nprocs": 2, "launcher": "srun-env"}),  # plain DP: the baseline
        "zero1": (root / "zero1", zero(1), {"nprocs": 2, "launcher": "torchrun"}),
        "zero2": (root / "zero2", (*zero(2), "--wandb_mode", "offline", "--target_loss", "100"),
                  {"nprocs": 2, "launcher": "deepspeed"}),
        "zero3": (root / "zero3", zero(3), {"nprocs": 2, "launcher": "srun-env"}),
        "zero2-accelerate": (root / "acc", zero(2), {"nprocs": 2, "launcher": "accelerate"}),
    })
    return runs


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """The files tests/support/bad_input.py's cases name as {d}/...: written once per test module."""
    d = tmp_path_factory.mktemp("bad")
    write_bad_files(d)
    return d
