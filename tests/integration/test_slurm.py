"""SLURM for real: the shipped scripts and the sweep run on a real one-node cluster (Debian's slurmctld/slurmd/
munge, started by tests/slurm/local_cluster.sh) with tiny-model overrides; the scripts' rules without a cluster:
tests/unit/test_slurm_scripts.py."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import REPO

TINY = ["--model", "tiny-llama", "--max_steps", "3", "--warmup_steps", "1", "--seq_len", "128",
        "--micro_batch_size", "2", "--global_batch_size", "4", "--eval_interval", "0", "--wandb_mode", "disabled"]
SMALL_NODE = ["--cpus-per-task=1", "--time=00:10:00"]  # the test node has 2 CPUs


# ---------------------------------------------------------------------------------------------------------
# A real cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(REPO / "tests/slurm/local_cluster.sh"), "start", str(d)],
                           capture_output=True, text=True)
    if start.returncode:
        reason = f"SLURM could not start: {start.stderr.strip()[-500:]}"
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail(reason)
        print(f"SKIPPED: {reason} (needs root; CI runs as root)")
        pytest.skip(reason)
    # The scripts keep their caches under the repository by default (BENCH_CACHE_BASE); tests write nothing
    # there: the caches go to the test's directory, the tiny models stay where every other test finds them.
    from bench.models import cache_dir
    # BENCH_DEVICE=cpu: this cluster's GPUs are plain files (gres.conf), and a run that sees SLURM's GPU variables
    # with a torch that has no CUDA is otherwise refused (bench/device.py)
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "BENCH_REQUEUE": "0", "BENCH_DEVICE": "cpu",
           "BENCH_CACHE_BASE": str(d / "cache"), "BENCH_CACHE": cache_dir(),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for k in list(env):
        if k.startswith("SLURM_") and k != "SLURM_CONF":
            env.pop(k)
    yield env
    subprocess.run(["bash", str(REPO / "tests/slurm/local_cluster.sh"), "stop", str(d)])


def wait_for(env, job_id, timeout=240, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")):
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
        state = re.search(r"JobState=(\w+)", out)
        if state and state.group(1) in until:
            return state.group(1)
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still not done after {timeout}s")


def sbatch(env, log_dir: Path, *args):
    """Submits from the repository root as the scripts expect; the job's log goes to log_dir, not the
    repository's logs/ (the command line's --output overrides the script's)."""
    log_dir.mkdir(exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *args], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.cluster
def test_real_script_runs_and_records(cluster, tmp_path):
    runs = tmp_path / "runs"
    job = sbatch(cluster, tmp_path / "logs", *SMALL_NODE, "slurm/data_parallel/llama31_8b/2_gpus.sh", *TINY,
                 "--output_dir", str(runs))
    assert wait_for(cluster, job) == "COMPLETED"
    log = next((tmp_path / "logs").glob(f"*-{job}.out")).read_text()
    assert "Start time    :" in log and "End time      :" in log
    assert re.search(r"Total time    : \d\d:\d\d:\d\d", log)
    assert "iteration 3/3" in log
    # each task keeps the CPUs the job asked for per task (srun of Slurm >= 22.05 does not take them from sbatch)
    assert "Task command  : srun --kill-on-bad-exit=1 --cpus-per-task=1 " in log
    (run_dir,) = list(runs.iterdir())
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["slurm_job_id"] == job
    assert s["model"] == "tiny-llama", "arguments after the script name override the script's"
    assert s["cpu_threads"]["slurm_cpus_per_task"] == 1


@pytest.mark.cluster
def test_sweep_lists_completed_and_failed(cluster, tmp_path):
    matrix = [{"model": "tiny-llama", "strategy": "dp", "ds_config": "ds_configs/dp_zero2.json", "gpus": 2,
               "args": TINY[2:], "sbatch": SMALL_NODE, "name": "good"},
              {"model": "tiny-llama", "strategy": "dp", "ds_config": "ds_configs/dp_zero2.json", "gpus": 2,
               "args": [*TINY[2:], "--global_batch_size", "6"], "sbatch": SMALL_NODE, "name": "bad"}]
    (tmp_path / "m.json").write_text(json.dumps(matrix))
    cmd = [sys.executable, "-m", "bench.sweep"]
    out = subprocess.run([*cmd, "submit", str(tmp_path / "m.json"), "--name", "t", "--sweeps_dir", str(tmp_path)],
                         cwd=REPO, env=cluster, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    jobs = json.loads((tmp_path / "t" / "sweep.json").read_text())
    listing = subprocess.run([*cmd, "status", "t", "--sweeps_dir", str(tmp_path)], cwd=REPO, env=cluster,
                             capture_output=True, text=True)
    assert listing.returncode == 0 and "good" in listing.stdout  # listable at any time, even while pending
    for j in jobs:
        wait_for(cluster, j["job_id"])
    listing = subprocess.run([*cmd, "status", "t", "--sweeps_dir", str(tmp_path)], cwd=REPO, env=cluster,
                             capture_output=True, text=True).stdout
    status = {r["name"]: r["status"] for r in json.loads((tmp_path / "t" / "status.json").read_text())}
    assert status == {"good": "completed", "bad": "failed"}, listing
    assert re.search(r"^good\s+\d+\s+completed", listing, re.M) and re.search(r"^bad\s+\d+\s+failed", listing, re.M)


@pytest.mark.cluster
def test_a_calibrating_sweep_queues_its_matrix_behind_the_calibration_and_ranks_it(cluster, tmp_path):
    """`submit --calibrate --gpu G`: a calibration job for each of the two layouts (they differ), the matrix's jobs
    waiting for both (SLURM's afterany dependency); `rank` then fits the cost model to the two and ranks the
    matrix (the fit's units are this CPU cluster's: the mechanics are what is checked here)."""
    good = {"model": "tiny-llama", "strategy": "dp", "ds_config": "ds_configs/dp_zero2.json", "gpus": 2,
            "args": TINY[2:], "sbatch": SMALL_NODE, "name": "good"}
    single = {**good, "ds_config": "ds_configs/dp_zero1.json", "gpus": 1, "name": "single"}
    (tmp_path / "m.json").write_text(json.dumps([good, single]))
    cmd = [sys.executable, "-m", "bench.sweep"]
    refused = subprocess.run([*cmd, "submit", str(tmp_path / "m.json"), "--name", "t", "--sweeps_dir",
                              str(tmp_path), "--calibrate"], cwd=REPO, env=cluster, capture_output=True, text=True)
    assert refused.returncode == 2 and "submit --calibrate needs --gpu" in refused.stderr, refused.stderr
    out = subprocess.run([*cmd, "submit", str(tmp_path / "m.json"), "--name", "t", "--sweeps_dir", str(tmp_path),
                          "--calibrate", "--calibration_steps", "5", "--gpu", "H100-80GB"], cwd=REPO, env=cluster,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    jobs = json.loads((tmp_path / "t" / "sweep.json").read_text())
    assert [j["name"] for j in jobs] == ["calibrate-good", "calibrate-single", "good", "single"]
    for j in jobs[2:]:
        queued = subprocess.run(["scontrol", "show", "job", j["job_id"]], env=cluster, capture_output=True,
                                text=True).stdout
        dependency = re.search(r"Dependency=(\S+)", queued)
        assert dependency and all(re.search(rf"afterany:({i}\b|\S*:{i}\b)", dependency.group(1))
                                  for i in (jobs[0]["job_id"], jobs[1]["job_id"])), queued
    assert "--max_steps 5" in (tmp_path / "t" / "jobs" / "calibrate-good.sh").read_text()
    for j in jobs:
        wait_for(cluster, j["job_id"])
    subprocess.run([*cmd, "status", "t", "--sweeps_dir", str(tmp_path)], cwd=REPO, env=cluster, check=True,
                   capture_output=True)
    status = {r["name"]: r["status"] for r in json.loads((tmp_path / "t" / "status.json").read_text())}
    assert set(status.values()) == {"completed"}, status
    ranked = subprocess.run([*cmd, "rank", "t", "--sweeps_dir", str(tmp_path)], cwd=REPO, env=cluster,
                            capture_output=True, text=True)
    assert ranked.returncode == 0, ranked.stderr
    cal = json.loads((tmp_path / "t" / "calibration.json").read_text())
    assert sorted(cal["runs"]) == ["calibrate-good", "calibrate-single"] and cal["gpu_defaults"] == "H100-80GB"
    ranking = json.loads((tmp_path / "t" / "ranking.json").read_text())
    assert sorted(r["name"] for r in ranking) == ["good", "single"] and all(r["predicted_step_s"] for r in ranking)


def submit_long_run(cluster, tmp_path: Path, runs: Path) -> str:
    """A run far longer than a test, submitted and waited for until its first step is recorded. -> the job id."""
    job = sbatch(cluster, tmp_path / "logs", *SMALL_NODE, "slurm/data_parallel/llama31_8b/2_gpus.sh", *TINY,
                 "--max_steps", "100000", "--output_dir", str(runs))
    t0 = time.time()
    while not list(runs.glob("*/metrics.jsonl")) or not list(runs.glob("*/metrics.jsonl"))[0].stat().st_size:
        assert time.time() - t0 < 120, "the run never started"
        time.sleep(1)
    return job


@pytest.mark.cluster
def test_preemption_signal_records_preempted(cluster, tmp_path):
    runs = tmp_path / "runs"
    job = submit_long_run(cluster, tmp_path, runs)
    # what --signal=B:USR1@300 does ahead of the time limit: signal the batch shell, which passes it on
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    wait_for(cluster, job)
    (run_dir,) = list(runs.iterdir())
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "preempted" and 0 < s["steps"] < 100000
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == s["steps"], "every finished step is kept"
    log = next((tmp_path / "logs").glob(f"*-{job}.out")).read_text()
    assert "Exit code     : 75" in log


@pytest.mark.cluster
@pytest.mark.parametrize("sig,status", [("TERM", "preempted"), ("INT", "interrupted")])
def test_a_signal_to_the_srun_step_stops_every_task(cluster, tmp_path, sig, status):
    """SIGTERM or SIGINT to the job's srun step (what scancel --signal does to a step): every task stops at the
    next step boundary and the run records the signal."""
    runs = tmp_path / "runs"
    job = submit_long_run(cluster, tmp_path, runs)
    subprocess.run(["scancel", f"--signal={sig}", f"{job}.0"], env=cluster, check=True)
    wait_for(cluster, job)
    (run_dir,) = list(runs.iterdir())
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == status and f"stopped by SIG{sig}" in s["error"], s["error"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == s["steps"] > 0


@pytest.mark.multiproc
def test_local_sweep_calibrates_ranks_and_runs_the_matrix_here_and_lists_statuses(tmp_path):
    """`bench.sweep local --calibrate`: the same matrix without SLURM, under the deepspeed launcher, one job after
    another; first a short calibration run of each layout the cost model's fit needs (here both that can be
    planned), then the matrix ranked by the fit, fastest predicted first, the one that cannot be planned last."""
    good = {"model": "tiny-llama", "strategy": "dp", "ds_config": "ds_configs/dp_zero2.json", "gpus": 2,
            "args": TINY[2:], "name": "good"}
    single = {**good, "ds_config": "ds_configs/dp_zero1.json", "gpus": 1, "name": "single"}
    bad = {**good, "gpus": 1, "args": [*TINY[2:], "--global_batch_size", "3"], "name": "bad"}  # 3 != micro 2 x k
    (tmp_path / "m.json").write_text(json.dumps([bad, good, single]))
    cmd = [sys.executable, "-m", "bench.sweep"]
    out = subprocess.run([*cmd, "local", str(tmp_path / "m.json"), "--name", "t", "--sweeps_dir", str(tmp_path),
                          "--calibrate", "--calibration_steps", "5", "--", "--max_steps", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    sweep = tmp_path / "t"
    cal = json.loads((sweep / "calibration.json").read_text())
    assert sorted(cal["runs"]) == ["calibrate-good", "calibrate-single"], cal["runs"]
    assert any(c["source"] == "fitted" for c in cal["constants"].values()), cal["constants"]
    ranking = json.loads((sweep / "ranking.json").read_text())
    assert [r["name"] for r in ranking][-1] == "bad" and "global batch 3" in ranking[-1]["not_planned"]
    first, second = ranking[0], ranking[1]
    assert 0 < first["predicted_step_s"] <= second["predicted_step_s"], ranking
    for job in ("calibrate-good", "calibrate-single"):  # the calibration's steps win over the sweep's --max_steps
        s = json.loads((sweep / "runs" / job / "summary.json").read_text())
        assert s["status"] == "completed" and s["steps"] == 5, (job, s["status"], s["steps"])
    # the matrix in the ranked order, bad last (it fails at once, refused)
    assert f"[1/3] {first['name']}: completed (exit 0" in out.stdout and "[3/3] bad: failed" in out.stdout, out.stdout
    assert re.search(rf"^\[1/3\] {first['name']}: (starting|running, step \d+/2)$", out.stdout, re.M), \
        "progress while it runs"
    assert re.search(r"^good\s+-\s+completed", out.stdout, re.M), out.stdout
    assert re.search(r"^bad\s+-\s+failed", out.stdout, re.M), out.stdout
    rows = json.loads((sweep / "status.json").read_text())
    assert {r["name"]: r["status"] for r in rows} == {"calibrate-good": "completed", "calibrate-single": "completed",
                                                       first["name"]: "completed", second["name"]: "completed",
                                                       "bad": "failed"}
    assert all(r["runner"] == "local" and r["slurm_state"] is None for r in rows), "no SLURM state for local jobs"
    assert {r["name"]: r["exit_code"] for r in rows}["good"] == 0 and rows[-1]["exit_code"] != 0
    s = json.loads((sweep / "runs" / "good" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 2  # the sweep-wide extra wins over the entry's --max_steps 3
    assert "global_batch_size" in (sweep / "logs" / "bad.log").read_text()  # the refusal is in the log
