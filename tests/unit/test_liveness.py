"""Heartbeats and claims (bench/liveness.py): a run that died without a word is told from a live one, and one job
writes a run directory at a time. In-process, on real files and real processes."""
import json
import os
import subprocess
import time

import pytest

from bench import liveness
from bench.config import BenchError

pytestmark = pytest.mark.unit


def beat(run_dir, rank: int, launch_id: str, age_s: float, pid: int | None = None, host: str | None = None):
    ranks = run_dir / ".ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    path = ranks / f"rank{rank}.json"
    path.write_text(json.dumps({"rank": rank, "host": host or os.uname().nodename, "pid": pid or os.getpid(),
                                "launch_id": launch_id}))
    os.utime(path, (time.time() - age_s,) * 2)


@pytest.mark.parametrize("status,age,expected", [
    ("running", 5, "running"), ("running", 2 * liveness.LOST_AFTER_S, "lost"),
    ("completed", 2 * liveness.LOST_AFTER_S, "completed"), ("failed", 10_000, "failed")])
def test_a_running_run_without_heartbeat_is_lost(tmp_path, status, age, expected):
    beat(tmp_path, 0, "a", age)
    beat(tmp_path, 1, "a", age + 1)
    state, silent = liveness.run_state(str(tmp_path), status)
    assert state == expected and silent == pytest.approx(age, abs=1)


def test_runs_from_before_heartbeats_keep_their_status(tmp_path):
    assert liveness.run_state(str(tmp_path), "running") == ("running", None)


def test_the_report_and_sweep_status_show_a_lost_run(tmp_path):
    from analysis.collect import load_dir
    from analysis.tables import by_job, incomplete
    from bench import sweep
    run = tmp_path / "job"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "running", "model": "tiny-llama", "run_dir": str(run)}))
    beat(run, 0, "a", 3 * liveness.LOST_AFTER_S)
    r = load_dir(str(run))
    assert r.status == "lost" and "no heartbeat since" in r.summary["error"]
    assert by_job([r]) == {} and incomplete([r])[0]["status"] == "lost", "never mixed into results"
    summary = json.loads((run / "summary.json").read_text())
    assert sweep._status(summary) == "lost"
    assert sweep.combine("lost", None) == "lost"
    assert sweep.combine("lost", "PENDING") == "pending", "a requeued job resumes it"
    assert sweep.combine("lost", "TIMEOUT") == "timeout"


def test_peers_lost_by_exit_or_by_silence(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    hb = liveness.Heartbeat(str(tmp_path), 0, 3, "L", timeout_s=10)
    assert hb.check() is None, "peers that have not started yet are not lost"
    beat(tmp_path, 1, "L", 1)
    beat(tmp_path, 2, "L", 0, pid=gone.pid)
    assert hb.check() == (2, f"its process (pid {gone.pid} on {os.uname().nodename}) exited")
    assert hb.lowest_alive() == 0
    hb2 = liveness.Heartbeat(str(tmp_path / "b"), 1, 2, "M", timeout_s=10)
    beat(tmp_path / "b", 0, "M", 0, host="another-host")  # another host: only its heartbeat can tell
    now = time.monotonic()
    assert hb2.why_lost(0, now) is None and hb2.why_lost(0, now + 9) is None  # silent, not yet for long
    why = hb2.why_lost(0, now + 30)
    assert why.startswith("no heartbeat from it for 30 s (its beat counter stayed at 0")
    assert hb2.check(now + 30)[0] == 0
    assert hb2.lowest_alive(now + 30) == 1, "rank 0 lost: rank 1 writes the records"
    beat(tmp_path / "c", 1, "old-launch", 10_000)
    assert liveness.Heartbeat(str(tmp_path / "c"), 0, 2, "new", 10).check() is None, "an earlier launch's file"


def test_one_job_per_run_directory(tmp_path):
    assert liveness.claim(str(tmp_path), "first", "torchrun") is None
    beat(tmp_path, 0, "first", 3)  # the holder beats: refused, naming it
    with pytest.raises(BenchError, match=r"is in use by another job: torchrun \(pid \d+ on .*last heartbeat 3 s ago"):
        liveness.claim(str(tmp_path), "second", "torchrun")
    beat(tmp_path, 0, "first", 2 * liveness.LOST_AFTER_S)  # silent since: taken over, and said
    note = liveness.claim(str(tmp_path), "second", "torchrun")
    assert note.startswith(f"took over {tmp_path} from torchrun") and "no heartbeat for" in note
    liveness.release(str(tmp_path), "first")  # not its claim any more: nothing happens
    assert json.loads((tmp_path / liveness.OWNER).read_text())["launch_id"] == "second"
    liveness.release(str(tmp_path), "second")
    assert not (tmp_path / liveness.OWNER).exists()


def test_a_holder_whose_process_exited_is_taken_over_at_once(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / liveness.OWNER).write_text(json.dumps({"launch_id": "x", "host": os.uname().nodename,
                                                       "pid": gone.pid, "started": time.time()}))
    beat(tmp_path, 0, "x", 1)  # a fresh heartbeat, but its process is gone (killed with the node's launcher)
    assert "its process has exited" in liveness.claim(str(tmp_path), "y", "python")


def test_a_peer_is_judged_by_its_counter_not_by_this_hosts_clock(tmp_path):
    """A peer on another host keeps beating, but its files' mtimes read 90 s in the past (its clock behind this
    one's, or NFS attribute caching): not lost. Its counter stops moving: lost once the timeout has passed on
    this rank's own clock."""
    watcher = liveness.Heartbeat(str(tmp_path), 0, 2, "L", timeout_s=10)
    peer = liveness.Heartbeat(str(tmp_path), 1, 2, "L", timeout_s=10)
    info = json.loads((tmp_path / ".ranks" / "rank1.json").read_text())
    (tmp_path / ".ranks" / "rank1.json").write_text(json.dumps({**info, "host": "another-host"}))
    now = time.monotonic()
    for i in range(6):  # a minute of healthy beats, every file's mtime 90 s old
        peer.beat()
        for name in ("rank1.json", "rank1.beat"):
            os.utime(tmp_path / ".ranks" / name, (time.time() - 90,) * 2)
        assert watcher.why_lost(1, now + 12 * i) is None, i
    assert watcher.why_lost(1, now + 12 * 5 + 5) is None  # last seen moving 5 s ago (this clock): not yet
    why = watcher.why_lost(1, now + 12 * 5 + 11)
    assert why and why.startswith("no heartbeat from it for 11 s (its beat counter stayed at 6")
