"""Every way a run ends is recorded truthfully: Ctrl-C (once: at the next step boundary; twice: at once), a
signal during start-up, a full disk. Real signals, a real full filesystem; nothing is left "running"."""
import glob
import os
import re
import signal
import subprocess
import time

import pytest

from bench.distributed import free_port
from support import finish, start_bench, wait_for_steps

TINY = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "none", "--eval_interval", "0",
        "--warmup_steps", "1")


@pytest.mark.multiproc
def test_ctrl_c_stops_every_rank_at_a_step_boundary(tmp_path):
    port = free_port()
    procs = start_bench(tmp_path, *TINY, "--seq_len", "64", "--max_steps", "100000", "--wandb_mode", "offline",
                        "--log_interval", "1", nprocs=2, launcher="deepspeed", port=port, own_session=True)
    wait_for_steps(tmp_path, procs, 3)
    os.killpg(procs[0].pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the launcher and every rank
    res = finish(procs, tmp_path, timeout=120)
    s = res.summary()
    # the ranks get the Ctrl-C from the terminal and, forwarded, from the deepspeed command: one signal
    assert s["status"] == "interrupted" and re.search(
        r"stopped by SIGINT( to the deepspeed command \(pid \d+\), forwarded to every rank)? after step",
        s["error"]), s["error"]
    assert 3 <= s["steps"] < 100000 and len(res.records()) == s["steps"], "every finished step is kept"
    # The W&B writer (a process of its own) is not cut short by the Ctrl-C: every step and the status reach it.
    wandb = res.wandb_records()
    assert [r["history"]["item"]["step"] for r in wandb if r["type"] == "history"] == list(range(1, s["steps"] + 1))
    assert res.wandb_summary()["status"] == "interrupted"
    assert [r["exit"]["exit_code"] for r in wandb if r["type"] == "exit"] == [130]
    assert s["step_time_s"]["median"] > 0 and s["total_wall_time_s"] > 0
    # (the deepspeed CLI itself prints a KeyboardInterrupt traceback of its own wait; the ranks print none)
    assert not re.search(r'File ".*/bench/', res.output), res.output[-3000:]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), "shared memory cleaned up"


@pytest.mark.multiproc
def test_a_second_ctrl_c_leaves_at_once_and_still_records(tmp_path):
    # steps of about a second on 2 cores, so the second Ctrl-C lands inside the step after the first
    procs = start_bench(tmp_path, *TINY, "--seq_len", "1024", "--packing", "off", "--micro_batch_size", "8",
                        "--global_batch_size", "32", "--max_steps", "100000", own_session=True)
    wait_for_steps(tmp_path, procs, 2)
    os.killpg(procs[0].pid, signal.SIGINT)
    # apart enough that Python runs its handler in between: two SIGINTs that arrive during one long native op
    # reach the handler once (CPython trips one flag per signal), which CI saw under load with 0.05 s
    time.sleep(0.3)
    os.killpg(procs[0].pid, signal.SIGINT)
    res = finish(procs, tmp_path, timeout=120)
    assert res.returncode == 130, res.output[-2000:]
    s = res.summary()
    assert s["status"] == "interrupted" and "(signalled twice)" in s["error"], s["error"]
    assert s["steps"] == len(res.records()) >= 2


@pytest.mark.multiproc
def test_a_signal_during_start_up_is_recorded(tmp_path):
    procs = start_bench(tmp_path, *TINY, "--max_steps", "5", env={"BENCH_FAULT_SLOW_LOAD_S": "30"})
    t0 = time.time()
    while not glob.glob(f"{tmp_path}/*/summary.json"):
        assert time.time() - t0 < 60 and procs[0].poll() is None, "the run directory never appeared"
        time.sleep(0.1)
    procs[0].send_signal(signal.SIGTERM)  # SLURM's preemption notice, while the model is still loading
    res = finish(procs, tmp_path, timeout=60)
    assert time.time() - t0 < 30, "left without waiting for the slow load"
    assert res.returncode == 75  # requeued by the SLURM scripts
    s = res.summary()
    assert s["status"] == "preempted" and s["error"] == "stopped by SIGTERM during start-up" and s["steps"] == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB filesystem (tmpfs), root only; the tests run as root in CI."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.fail("a full-disk test needs root to mount a small tmpfs (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.multiproc
def test_a_full_disk_gives_one_line_and_damages_nothing(small_disk):
    # a checkpoint of tiny-llama with Adam is 3.4 MB: the first fits, the second fills the disk
    res = finish(start_bench(small_disk, *TINY, "--max_steps", "12", "--save_interval", "2"), small_disk, 120)
    assert res.returncode != 0
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output[-3000:]
    assert "No space left on device" in errors[0] or "is the disk full" in errors[0], errors[0]
    assert "Traceback" not in res.output
    s = res.summary()
    assert s["status"] == "failed" and "could not write checkpoint" in s["error"]
    assert s["steps"] == len(res.records()) > 2
    ckpts = sorted((res.run_dir / "checkpoints").glob("step*"))
    assert ckpts and all((c / "COMPLETE").is_file() for c in ckpts), "only complete checkpoints remain"


STOP_ARGS = (*TINY, "--seq_len", "64", "--run_name", "job", "--resume", "auto", "--save_interval", "100",
             "--max_steps", "30")


def rank_pids(run_dir) -> list[int]:
    import json
    return [json.loads(p.read_text())["pid"] for p in sorted((run_dir / ".ranks").glob("rank*.json"))]


def all_exited(pids: list[int], timeout: float = 30) -> bool:
    from bench.liveness import process_gone
    t0 = time.time()
    while not all(process_gone(p) for p in pids):
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from support import assert_ok, run_bench
    res = run_bench(tmp_path_factory.mktemp("whole"), *STOP_ARGS, nprocs=2, launcher="srun-env")
    assert_ok(res)
    return res.losses()


@pytest.mark.multiproc
@pytest.mark.parametrize("launcher,sig,status", [
    ("deepspeed", signal.SIGTERM, "preempted"), ("deepspeed", signal.SIGINT, "interrupted"),
    ("torchrun", signal.SIGTERM, "preempted"), ("torchrun", signal.SIGINT, "interrupted")])
def test_a_signal_to_the_launch_command_stops_the_run_as_one_to_a_rank(tmp_path, uninterrupted, launcher, sig,
                                                                       status):
    """SIGTERM (kill PID, timeout, a container's stop) or SIGINT to the launch command alone, not its process
    group: every rank stops at the next step boundary with a checkpoint, the record names the signal (and, for
    the deepspeed command, who received it), every rank exits, and --resume auto continues exactly."""
    from support import assert_ok, run_bench
    procs = start_bench(tmp_path, *STOP_ARGS, nprocs=2, launcher=launcher, env={"BENCH_FAULT_SLOW_STEP_S": "0.3"})
    wait_for_steps(tmp_path, procs, 3)
    pids = rank_pids(tmp_path / "job")
    procs[0].send_signal(sig)
    res = finish(procs, tmp_path, timeout=120)
    s = res.summary()
    name = signal.Signals(sig).name
    assert s["status"] == status and f"stopped by {name}" in s["error"], s["error"]
    if launcher == "deepspeed":
        assert f"{name} to the deepspeed command (pid {procs[0].pid})" in s["error"], s["error"]
        assert res.returncode == {"preempted": 75, "interrupted": 130}[status]
    assert 3 <= s["steps"] < 30
    assert (tmp_path / "job" / "checkpoints" / f"step{s['steps']:08d}" / "COMPLETE").exists()
    assert all_exited(pids), "every rank exited"
    if (launcher, sig) == ("deepspeed", signal.SIGTERM):
        resumed = run_bench(tmp_path, *STOP_ARGS, nprocs=2, launcher="srun-env")
        assert_ok(resumed)
        assert resumed.summary()["resumed_at"] == [s["steps"]]
        assert resumed.losses() == pytest.approx(uninterrupted, rel=1e-6)


@pytest.mark.multiproc
def test_a_sigkilled_deepspeed_command_stops_its_ranks(tmp_path):
    """SIGKILL to the deepspeed command (nothing can forward it): its launcher is re-parented, the ranks see that
    within a few seconds and stop as preempted, with a checkpoint, naming it."""
    procs = start_bench(tmp_path, *STOP_ARGS, "--max_steps", "100000", nprocs=2, launcher="deepspeed",
                        env={"BENCH_FAULT_SLOW_STEP_S": "0.3"})
    wait_for_steps(tmp_path, procs, 3)
    pids = rank_pids(tmp_path / "job")
    procs[0].send_signal(signal.SIGKILL)
    t0 = time.time()
    summary = tmp_path / "job" / "summary.json"
    import json
    while json.loads(summary.read_text())["status"] == "running":
        assert time.time() - t0 < 60, "the ranks went on without their deepspeed command"
        time.sleep(0.3)
    s = json.loads(summary.read_text())
    assert s["status"] == "preempted", s
    assert f"the deepspeed command (pid {procs[0].pid}) above its launcher exited" in s["error"], s["error"]
    assert (tmp_path / "job" / "checkpoints" / f"step{s['steps']:08d}" / "COMPLETE").exists()
    assert all_exited(pids), "every rank exited"
    finish(procs, tmp_path, timeout=60)
