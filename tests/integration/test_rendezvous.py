"""Rendezvous never hangs: a port another job holds is refused at once without disturbing that job, and a rank
that never arrives (or a rank 0 that cannot be reached) ends the wait after --dist_timeout_s with one line."""
import time

import pytest

from bench.distributed import free_port
from support import finish, start_bench, wait_for_steps

pytestmark = pytest.mark.multiproc
TINY = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "none", "--seq_len", "64",
        "--eval_interval", "0", "--warmup_steps", "1")


def error_lines(res) -> list[str]:
    return [line for line in res.output.splitlines() if line.startswith("error:")]


def test_a_taken_port_is_refused_and_the_running_job_goes_on(tmp_path):
    port = free_port()
    first = start_bench(tmp_path / "first", *TINY, "--max_steps", "300", nprocs=2, launcher="deepspeed", port=port)
    wait_for_steps(tmp_path / "first", first, 1)
    t1 = time.time()
    second = finish(start_bench(tmp_path / "second", *TINY, "--max_steps", "3", nprocs=2, launcher="deepspeed",
                                port=port), tmp_path / "second", timeout=120)
    # Its rank 1 reaches the first job's server and waits there for its own rank 0, in polls that the launcher's
    # SIGTERM interrupts at once (a blocking C++ wait held it until the launcher's SIGKILL, 30 s later).
    assert time.time() - t1 < 25, "the second job must give up at once"
    assert second.returncode != 0
    assert "TCPStore" not in second.output, second.output[-3000:]
    errors = error_lines(second)
    assert errors and f"rendezvous port {port}" in errors[0] and "--master_port" in errors[0], second.output[-3000:]
    assert first[0].poll() is None, "the first job is still running, undisturbed"
    res = finish(first, tmp_path / "first", timeout=300)
    assert res.returncode == 0, res.output[-3000:]
    s = res.summary()
    assert s["status"] == "completed" and s["steps"] == 300


@pytest.mark.parametrize("present,expected", [
    (0, "rank 0 waited 4 s for the other 1 rank(s) of a world of 2"),
    (1, "rank 1 could not reach rank 0 at 127.0.0.1:"),
])
def test_a_missing_rank_ends_the_wait_after_the_timeout(tmp_path, present, expected):
    t0 = time.time()
    res = finish(start_bench(tmp_path, *TINY, "--max_steps", "3", "--dist_timeout_s", "4", nprocs=2,
                             launcher="srun-env", only_ranks=[present]), tmp_path, timeout=120)
    assert time.time() - t0 < 4 + 30
    assert res.returncode == 2
    errors = error_lines(res)
    assert len(errors) == 1 and expected in errors[0], res.output[-3000:]
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "no run directory for a run that never started"
