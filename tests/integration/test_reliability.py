"""Reliability: exact resume after preemption, a killed rank recorded as a failure with its work kept and the lost
steps recomputed and counted, an injected OOM recorded as `oom`, and concurrent runs that never share a
directory."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from support import REPO, assert_no_negative_durations, assert_ok, finish, run_bench, start_bench, wait_for_steps

pytestmark = pytest.mark.multiproc

ARGS = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "none", "--lr", "1e-3",
        "--max_steps", "8", "--warmup_steps", "1", "--seq_len", "128", "--micro_batch_size", "2",
        "--global_batch_size", "4", "--eval_interval", "0")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    res = run_bench(tmp_path_factory.mktemp("ref"), *ARGS, nprocs=2, launcher="srun-env")
    assert_ok(res)
    return res.losses()


def test_preempted_run_resumes_exactly(tmp_path, reference):
    args = (*ARGS, "--run_name", "job", "--resume", "auto", "--save_interval", "100", "--wandb_mode", "offline")
    # steps slowed to 0.5 s: the five left after the third outlast the signal's way to the next step boundary
    # (unslowed, a loaded machine once ran them all first)
    procs = start_bench(tmp_path, *args, "--monitor_interval_s", "0.2", nprocs=2, launcher="srun-env",
                        env={"BENCH_FAULT_SLOW_STEP_S": "0.5"})
    wait_for_steps(tmp_path, procs, 3)
    procs[1].send_signal(signal.SIGUSR1)  # any rank; the ranks agree at the next step boundary
    first = finish(procs, tmp_path)
    assert first.returncode == 75, first.output[-3000:]  # the SLURM scripts requeue on 75
    s = before = first.summary()  # read now: the resumed run rewrites the same file
    assert s["status"] == "preempted" and 3 <= s["steps"] < 8
    stopped = s["steps"]
    assert (tmp_path / "job" / "checkpoints" / f"step{stopped:08d}" / "COMPLETE").exists()
    wandb_id = s["wandb_run_id"]

    second = run_bench(tmp_path, *args, nprocs=2, launcher="srun-env")  # the requeued job: same command
    assert_ok(second)
    assert len(second.run_dirs) == 1, "the resumed run continues in its own directory"
    s = second.summary()
    assert s["status"] == "completed" and s["steps"] == 8 and s["resumed_at"] == [stopped]
    assert s["lost_steps"] == 0, "preemption saved at the stop: nothing was lost"
    assert s["applied_updates"] == 8 and s["wandb_run_id"] == wandb_id
    recs = second.records()
    assert [r["step"] for r in recs] == list(range(1, 9)), "no duplicated or missing steps"
    # each process's first two steps are instrumented and warming up: never timed, after the resume too
    resumed_warmup = [step for step in (stopped + 1, stopped + 2) if step <= 8]  # one step left after a stop at 7
    assert [r["step"] for r in recs if r["warmup"]] == [1, 2, *resumed_warmup]
    assert s["measured_steps"] == 8 - 2 - len(resumed_warmup)
    assert [r["loss"] for r in recs] == pytest.approx(reference, rel=1e-6)
    assert "resuming after step" in second.output
    assert s["time_to_first_step_s"] == before["time_to_first_step_s"]  # the record keeps its start
    assert s["total_wall_time_s"] > before["total_wall_time_s"] + 1  # both launches
    assert_no_negative_durations(s)

    # The sweep submitted again: the completed run is left byte for byte as it was, W&B run included
    run_dir = second.run_dir
    kept = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and ".ranks" not in p.parts}
    third = run_bench(tmp_path, *args, nprocs=2, launcher="srun-env")
    assert third.returncode == 0, third.output[-3000:]
    assert f"already completed at step 8: nothing to do ({run_dir})" in third.output
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and ".ranks" not in p.parts} == kept

    # A larger --max_steps continues to the new end, from the last checkpoint, as a resume does
    fourth = run_bench(tmp_path, *args, "--max_steps", "10", nprocs=2, launcher="srun-env")
    assert_ok(fourth)
    s4 = fourth.summary()
    assert s4["status"] == "completed" and s4["steps"] == 10 and s4["resumed_at"] == [stopped]  # its checkpoint's
    assert s4["lost_steps"] == 8 - stopped  # the steps after that checkpoint, done again
    assert s4["time_to_first_step_s"] == s["time_to_first_step_s"]
    assert [r["step"] for r in fourth.records()] == list(range(1, 11))
    assert_no_negative_durations(s4)


def test_killed_rank_fails_cleanly_and_lost_work_is_counted(tmp_path, reference):
    args = (*ARGS, "--run_name", "job", "--resume", "auto", "--save_interval", "3", "--dist_timeout_s", "60")
    # rank 1 SIGKILLs itself as step 6 starts: steps 1-5 are recorded, the checkpoint of step 3 is the newest
    t0 = time.time()
    crashed = run_bench(tmp_path, *args, nprocs=2, launcher="srun-env",
                        env={"BENCH_FAULT_KILL_STEP": "6", "BENCH_FAULT_RANK": "1"}, timeout=120)
    assert time.time() - t0 < 90, "the surviving rank must not hang"
    assert crashed.returncode != 0
    s = crashed.summary()
    assert s["status"] == "failed" and s["error"].startswith("rank 1 stopped answering after step 5: its process"), \
        s["error"]
    done = len(crashed.records())
    assert done == 5 and s["steps"] == done, "everything recorded before the crash is kept"
    ckpts = sorted(p.name for p in (tmp_path / "job" / "checkpoints").iterdir() if p.name.startswith("step"))
    assert ckpts == ["step00000003"] and (tmp_path / "job" / "checkpoints" / ckpts[0] / "COMPLETE").exists()
    # a checkpoint cut short (no COMPLETE marker) must never be picked, even though it is the newest
    (tmp_path / "job" / "checkpoints" / "step99999999").mkdir()

    resumed = run_bench(tmp_path, *args, nprocs=2, launcher="srun-env")
    assert_ok(resumed)
    s = resumed.summary()
    assert s["status"] == "completed" and s["resumed_at"] == [3]
    assert s["lost_steps"] == 2 and s["lost_time_s"] > 0  # steps 4 and 5 were done, lost, and recomputed
    assert s["applied_updates"] == 8, "recomputed steps are not extra useful updates"
    assert s["goodput"]["updates_per_s"] == pytest.approx(8 / s["train_wall_time_s"])
    recs = resumed.records()
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["loss"] for r in recs] == pytest.approx(reference, rel=1e-6)


def test_the_launchers_sigterm_after_a_sibling_died_is_that_failure(tmp_path):
    """The deepspeed launcher answers a dead rank with SIGTERM to the others: recorded as the failure it follows
    from, not as a preemption."""
    res = run_bench(tmp_path, *ARGS, nprocs=2, launcher="deepspeed", timeout=120,
                    env={"BENCH_FAULT_KILL_STEP": "5", "BENCH_FAULT_RANK": "1"})
    s = res.summary()
    assert res.returncode != 0 and s["status"] == "failed", (s["status"], s["error"])
    assert s["error"].startswith("rank 1 stopped answering after step 4: its process"), s["error"]


def test_a_killed_rank_0_is_recorded_by_the_survivor(tmp_path):
    """Rank 0 writes the records; when it dies (SIGKILL, as the kernel's OOM killer sends), the lowest surviving
    rank records the failure, naming rank 0, and keeps what rank 0 wrote."""
    t0 = time.time()
    res = run_bench(tmp_path, *ARGS, "--dist_timeout_s", "60", "--wandb_mode", "offline", nprocs=2,
                    launcher="srun-env", env={"BENCH_FAULT_KILL_STEP": "5", "BENCH_FAULT_RANK": "0"}, timeout=120)
    assert time.time() - t0 < 90, "the survivor must not wait for the collective timeout"
    assert res.returncode != 0
    s = res.summary()
    assert s["status"] == "failed", s
    assert s["error"].startswith("rank 0 stopped answering after step 4: its process") and "rank 1 recorded" in \
        s["error"], s["error"]
    assert s["steps"] == 4 and len(res.records()) == 4, "rank 0's metrics.jsonl and the survivor agree"
    assert s["wandb_run_id"], "what rank 0 recorded at the start is kept"


def test_a_silent_rank_is_recorded_before_the_collective_timeout(tmp_path):
    """A rank that stops answering but does not exit (SIGSTOP: as a hung GPU or node looks) leaves its peers in a
    collective until the timeout, where NCCL's watchdog aborts them recording nothing. The heartbeat's watch
    records the failure first, naming the silent rank, and ends the process."""
    procs = start_bench(tmp_path, *ARGS, "--dist_timeout_s", "30", nprocs=2, launcher="srun-env",
                        env={"BENCH_FAULT_STOP_STEP": "5", "BENCH_FAULT_RANK": "1"})
    try:
        wait_for_steps(tmp_path, procs, 4)  # rank 1 stops as step 5 starts
        t0 = time.time()
        procs[0].wait(timeout=90)
    finally:
        procs[1].kill()  # the stopped rank: only SIGKILL reaches it
    res = finish(procs, tmp_path)
    took = time.time() - t0
    s = res.summary()
    assert s["status"] == "failed" and "rank 1 stopped answering after step 4: no heartbeat from it" in s["error"]
    assert "its collectives hung" in s["error"], "recorded by the watch, not by a collective's timeout"
    assert took < 30, f"recorded {took:.0f} s after the last step, not within --dist_timeout_s"
    assert procs[0].returncode == 1


def test_a_second_launch_on_a_live_run_directory_is_refused(tmp_path):
    """Two jobs never write one run directory: a second `--resume auto` launch (another port) while the first is
    training is refused in one line naming the holder; the first goes on untouched."""
    args = (*ARGS, "--run_name", "job", "--resume", "auto", "--save_interval", "100", "--max_steps", "2000")
    first = start_bench(tmp_path, *args, nprocs=2, launcher="srun-env")
    wait_for_steps(tmp_path, first, 3)
    second = run_bench(tmp_path, *args, nprocs=2, launcher="srun-env", timeout=120)
    assert second.returncode == 2, second.output[-3000:]
    errors = [ln for ln in second.output.splitlines() if ln.startswith("error:")]
    assert errors and all("is in use by another job: srun" in e and "last heartbeat" in e for e in errors), errors
    assert all(p.poll() is None for p in first), "the holder is still training"
    first[0].send_signal(signal.SIGUSR1)
    done = finish(first, tmp_path)
    assert done.returncode == 75, done.output[-3000:]
    s = done.summary()
    assert s["status"] == "preempted" and s["resumed_at"] == [] and s["steps"] == len(done.records())
    assert not (tmp_path / "job" / ".owner.json").exists(), "released at the end: a requeued job resumes"


def test_ranks_do_not_outlive_their_launcher(tmp_path):
    """The per-node launcher SIGKILLed (deepspeed.launcher.launch): its ranks stop at the next step boundary,
    saving a checkpoint, and record why, instead of running on as orphans."""
    args = (*ARGS, "--run_name", "job", "--resume", "auto", "--save_interval", "100", "--max_steps", "40")
    procs = start_bench(tmp_path, *args, nprocs=2, launcher="deepspeed")
    wait_for_steps(tmp_path, procs, 3)
    rank0 = json.loads((tmp_path / "job" / ".ranks" / "rank0.json").read_text())["pid"]
    with open(f"/proc/{rank0}/stat") as fh:
        launch = int(fh.read().rsplit(")", 1)[1].split()[1])  # the rank's parent: the per-node launcher
    os.kill(launch, signal.SIGKILL)
    summary = tmp_path / "job" / "summary.json"
    t0 = time.time()
    while json.loads(summary.read_text())["status"] == "running":
        assert time.time() - t0 < 60, "the ranks went on as orphans"
        time.sleep(0.5)
    s = json.loads(summary.read_text())
    assert s["status"] == "preempted" and f"its launcher (pid {launch}) exited" in s["error"], s["error"]
    assert s["steps"] < 40 and (tmp_path / "job" / "checkpoints" / f"step{s['steps']:08d}" / "COMPLETE").exists()
    finish(procs, tmp_path, timeout=60)
    t0 = time.time()
    while os.path.exists(f"/proc/{rank0}") and time.time() - t0 < 30:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{rank0}"), "rank 0 exited"


def test_a_run_killed_outright_is_shown_lost_and_resumed(tmp_path):
    """Every process of a run SIGKILLed at once (node loss): nothing can record the ending, summary.json keeps
    `running`. Once its heartbeats are old (aged here instead of waiting a minute) the report lists it as lost,
    apart from the results, and --resume auto takes the directory over, says so, and completes it exactly."""
    args = (*ARGS, "--run_name", "job", "--resume", "auto", "--save_interval", "2")
    procs = start_bench(tmp_path / "runs", *args, nprocs=2, launcher="srun-env", own_session=True,
                        env={"BENCH_FAULT_SLOW_STEP_S": "0.5"})  # slowed: killed before its last step
    wait_for_steps(tmp_path / "runs", procs, 5)
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # stopped first: no rank sees another die and records it
        for p in procs:
            os.killpg(p.pid, sig)
    for p in procs:
        p.wait()
    job = tmp_path / "runs" / "job"
    assert json.loads((job / "summary.json").read_text())["status"] == "running"
    old = time.time() - 300
    for f in (job / ".ranks").iterdir():
        os.utime(f, (old, old))
    out = subprocess.run([sys.executable, "-m", "analysis", "report", str(tmp_path / "runs"), "--out",
                          str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "report" / "report.md").read_text()
    lost = [ln for ln in report.splitlines() if ln.startswith("| job |")]
    assert lost and "| lost |" in lost[0] and "no heartbeat since" in lost[0], report[-2000:]
    # bench.sweep status over the same directory, as a local sweep that started it would list it
    (tmp_path / "sweep.json").write_text(json.dumps([{"name": "job", "job_id": None, "returncode": -9}]))
    from bench import sweep
    assert [r["status"] for r in sweep.status(str(tmp_path))] == ["lost"]
    # the newest complete checkpoint: step 4 at least (5 steps were recorded, one every 2 saved); 6 if the ranks
    # got through step 6 before the signal reached them
    saved = sorted(int(d.name[4:]) for d in (job / "checkpoints").iterdir() if (d / "COMPLETE").is_file())
    assert saved and saved[-1] >= 4, saved
    resumed = run_bench(tmp_path / "runs", *args, nprocs=2, launcher="srun-env")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "warning: took over" in resumed.output and "(lost)" in resumed.output
    s = resumed.summary()
    assert s["status"] == "completed" and s["resumed_at"] == [saved[-1]]


def test_out_of_memory_is_recorded_as_oom(tmp_path):
    res = run_bench(tmp_path, *ARGS, env={"BENCH_FAULT_OOM_STEP": "4"})
    assert res.returncode == 3
    s = res.summary()
    assert s["status"] == "oom" and "out of memory" in s["error"]
    assert s["steps"] == 3 and len(res.records()) == 3, "the steps before the OOM are kept"
    assert s["memory"]["per_rank"][0]["peak_rss_mib"] > 0, "with the memory figures so far"
    assert s["step_time_s"]["median"] is not None


def test_concurrent_runs_never_share_a_directory(tmp_path):
    procs = [start_bench(tmp_path, *ARGS, "--max_steps", "2", "--run_name", "same") for _ in range(2)]
    results = [finish(p, tmp_path) for p in procs]
    assert all(r.returncode == 0 for r in results), results[0].output[-2000:]
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["same", "same-2"]
    assert all(json.loads((tmp_path / d / "summary.json").read_text())["status"] == "completed" for d in dirs)


def test_resume_refuses_other_settings_and_skips_an_unreadable_checkpoint(tmp_path):
    args = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "none", "--seq_len", "64",
            "--warmup_steps", "1", "--eval_interval", "0", "--run_name", "job", "--resume", "auto",
            "--save_interval", "2")
    first = run_bench(tmp_path, *args, "--max_steps", "6")
    assert_ok(first)
    summary_before = (tmp_path / "job" / "summary.json").read_bytes()
    # another global batch (and seed): one line per difference, nothing recorded is touched
    refused = run_bench(tmp_path, *args, "--max_steps", "8", "--global_batch_size", "4", "--seed", "7")
    assert refused.returncode == 2
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert "would mix two experiments" in errors[0]
    assert any(e.startswith("error: --seed: 42 when the run started, 7 now") for e in errors), errors
    assert any(e.startswith("error: batch global: 2 when the run started, 4 now") for e in errors), errors
    assert (tmp_path / "job" / "summary.json").read_bytes() == summary_before
    # the newest checkpoint cut short: a warning, then the previous complete one (step 4); steps 5-6 are redone
    newest = tmp_path / "job" / "checkpoints" / "step00000006"
    for f in newest.glob("*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])
    resumed = run_bench(tmp_path, *args, "--max_steps", "8")  # max_steps may grow
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert any(line.startswith("warning: checkpoint") and "step00000006 is unreadable" in line
               for line in resumed.output.splitlines()), resumed.output[-3000:]
    s = resumed.summary()
    assert s["status"] == "completed" and s["steps"] == 8
    assert s["resumed_at"] == [4] and s["lost_steps"] == 2
    assert [r["step"] for r in resumed.records()] == list(range(1, 9))
    # no checkpoint readable at all: refused, never trained on from a half-loaded engine
    for f in (tmp_path / "job" / "checkpoints").glob("step*/*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])
    hopeless = run_bench(tmp_path, *args, "--max_steps", "10")
    assert hopeless.returncode == 2
    assert any("could be read on every rank; resume is impossible" in line for line in hopeless.output.splitlines()
               if line.startswith("error:")), hopeless.output[-3000:]


def test_a_hang_with_every_rank_alive_is_recorded(tmp_path):
    """Rank 1 waits forever as step 4 starts (alive, its heartbeat going, never entering the step's collectives);
    rank 0 waits for it in a collective. Within the hang bound (3 s here, the process group's timeout 120 s) every
    rank writes its stacks and exits non-zero, and summary.json says where it hung."""
    t0 = time.time()
    res = run_bench(tmp_path, *ARGS, "--hang_timeout_s", "3", "--dist_timeout_s", "120", nprocs=2,
                    launcher="srun-env", env={"BENCH_FAULT_HANG_STEP": "4", "BENCH_FAULT_RANK": "1"}, timeout=100)
    assert time.time() - t0 < 90, "recorded well before the collective timeout"
    assert res.returncode != 0
    s = res.summary()
    assert s["status"] == "failed" and s["error"].startswith("hung at step 4: no step completed for"), s["error"]
    assert "main thread waits in" in s["error"] and s["steps"] == 3
    stacks = {r: (res.run_dir / f"hang.rank{r}.txt").read_text() for r in (0, 1)}
    assert "faults.py" in stacks[1] and "at_step" in stacks[1]  # the hung rank, caught where it waits
    assert "train.py" in stacks[0]  # the waiting rank, inside its step
    assert len(res.records()) == 3


def test_a_slow_but_progressing_run_is_not_called_hung(tmp_path):
    res = run_bench(tmp_path, *ARGS, "--max_steps", "4", "--hang_timeout_s", "4", nprocs=2, launcher="srun-env",
                    env={"BENCH_FAULT_SLOW_STEP_S": "1.5"})
    assert_ok(res)
    assert res.summary()["status"] == "completed" and not list(res.run_dir.glob("hang.rank*.txt"))
