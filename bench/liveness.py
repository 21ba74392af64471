"""Every rank's heartbeat, and what the others conclude when one stops.

Each rank writes <run dir>/.ranks/rank<N>.json once (host, pid, this launch's id) and, every HEARTBEAT_S from a
daemon thread off the training path, counts up a beat counter in rank<N>.beat (and touches rank<N>.json for the
readers below). The same thread watches the other ranks: a peer is lost when its process on this host has exited
(the kernel's OOM killer, a SIGKILL), or when its counter has not moved for the peer timeout, timed by this rank's
own clock (a process on another host that died, or one that stopped: SIGSTOP, a hung node). A peer is judged by
what it wrote, never by a file's mtime against this host's clock: across nodes the mtime comes from another
clock and through NFS attribute caching (actimeo up to 60 s), and skew or a metadata stall would fool it. The
counter is rewritten in place (one inode: NFS's close-to-open consistency shows a reader the last close). That is what no
signal handler can see, and what NCCL shows only as a collective that hangs until its watchdog aborts the process
after --dist_timeout_s, recording nothing: the survivors record `failed` naming the rank that stopped (the session
decides how, see bench/recorder.py RunRecorder._peer_lost).

Readers of a run directory (analysis, bench.sweep status, --resume auto) use the same files to tell a live run
from one that died without a word: `running` with no heartbeat for LOST_AFTER_S is `lost` (run_state).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

HEARTBEAT_S = 2.0
LOST_AFTER_S = 60.0  # a reader's verdict: no rank of a `running` run touched its heartbeat for this long


def peer_timeout(dist_timeout_s: float) -> float:
    """How long a peer may stay silent: well inside the collective timeout, so the survivors record the failure
    before NCCL's watchdog aborts them (at dist_timeout_s); never under a few heartbeats."""
    return max(5 * HEARTBEAT_S, min(60.0, dist_timeout_s / 2))


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its launcher counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False


class Heartbeat:
    """This rank's heartbeat and its watch over the others. on_lost(rank, why) is called once, from the watch
    thread, the first time a peer is found lost."""

    def __init__(self, run_dir: str, rank: int, world: int, launch_id: str, timeout_s: float, on_lost=None):
        self.dir = os.path.join(run_dir, ".ranks")
        os.makedirs(self.dir, exist_ok=True)
        self.rank, self.world, self.launch_id, self.timeout = rank, world, launch_id, timeout_s
        self.host = socket.gethostname()
        self.on_lost, self.lost = on_lost, None
        self._peers: dict[int, dict] = {}
        self._seen: dict[int, tuple] = {}  # peer -> (its counter as last read, this clock's time it was first read)
        self._beats = 0
        self._path = os.path.join(self.dir, f"rank{rank}.json")
        self._beat_path = os.path.join(self.dir, f"rank{rank}.beat")
        tmp = self._path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"rank": rank, "host": self.host, "pid": os.getpid(), "launch_id": launch_id,
                       "started": time.time()}, fh)
        os.replace(tmp, self._path)
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        """Beats until the process exits (a daemon thread: it must outlive every record the process writes)."""
        self._thread.start()
        return self

    def _loop(self):
        from bench import signals
        told = False
        while True:
            time.sleep(HEARTBEAT_S)
            try:
                self.beat()
            except OSError:
                pass  # a full disk or a lost mount: the peers may call this rank lost, which it then is
            try:
                signals.orphaned()  # the launcher gone and the kernel's SIGHUP missed: tell this process now
                if not told and self.on_lost and self.check():
                    told = True  # on its own thread: this one keeps the heartbeat going meanwhile
                    threading.Thread(target=self.on_lost, args=self.lost, name="peer-lost", daemon=True).start()
            except Exception:  # noqa: BLE001 - the beat must go on, or the peers would call this rank lost
                continue

    def beat(self) -> None:
        """One beat: the counter up by one, written in place, and rank<N>.json touched for the readers."""
        self._beats += 1
        fd = os.open(self._beat_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"%020d\n" % self._beats, 0)
        finally:
            os.close(fd)
        os.utime(self._path)

    def _counter(self, rank: int) -> str | None:
        try:
            with open(os.path.join(self.dir, f"rank{rank}.beat")) as fh:
                return fh.read().strip() or None
        except OSError:
            return None

    def _peer(self, rank: int) -> dict | None:
        """A peer's record of this launch (None until it has written one)."""
        if rank not in self._peers:
            try:
                with open(os.path.join(self.dir, f"rank{rank}.json")) as fh:
                    info = json.load(fh)
            except (OSError, ValueError):
                return None
            if info.get("launch_id") != self.launch_id:
                return None  # an earlier launch's file, not yet replaced
            self._peers[rank] = info
        return self._peers[rank]

    def why_lost(self, rank: int, now: float | None = None) -> str | None:
        """Why a peer is lost, or None. now: this rank's monotonic clock (tests pass it)."""
        info = self._peer(rank)
        if info is None:
            return None
        if info["host"] == self.host and process_gone(info["pid"]):
            return f"its process (pid {info['pid']} on {info['host']}) exited"
        now = time.monotonic() if now is None else now
        value = self._counter(rank)
        seen = self._seen.get(rank)
        if seen is None or seen[0] != value:  # it beat since the last look (or this is the first look)
            self._seen[rank] = (value, now)
            return None
        silent = now - seen[1]
        if silent > self.timeout:
            return (f"no heartbeat from it for {silent:.0f} s (its beat counter stayed at {int(value or 0)}; pid "
                    f"{info['pid']} on {info['host']})")
        return None

    def check(self, now: float | None = None) -> tuple[int, str] | None:
        """The first lost peer and why, or None (remembered once found)."""
        if self.lost is None:
            for r in range(self.world):
                why = None if r == self.rank else self.why_lost(r, now)
                if why:
                    self.lost = (r, why)
                    break
        return self.lost

    def lowest_alive(self, now: float | None = None) -> int:
        """The lowest rank not known to be lost: the survivor that writes the run's records when rank 0 is gone."""
        return next(r for r in range(self.world) if r == self.rank or not self.why_lost(r, now))


def run_state(run_dir: str, status: str, now: float | None = None) -> tuple[str, float | None]:
    """(status as a reader should show it, seconds since the newest heartbeat). A `running` run whose ranks have
    all been silent for LOST_AFTER_S died without a word: `lost`. Runs from before heartbeats keep their status."""
    newest = newest_beat(run_dir)
    if newest is None:
        return status, None
    silent = (now or time.time()) - newest
    return ("lost" if status == "running" and silent > LOST_AFTER_S else status), silent


# ---------------------------------------------------------------------------------------------------------
# One job per run directory

OWNER = ".owner.json"


def _describe(holder: dict) -> str:
    ago = time.time() - holder.get("started", time.time())
    return (f"{holder.get('launcher', 'a launch')} (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{ago / 60:.0f} min ago)")


def newest_beat(run_dir: str, launch_id: str | None = None) -> float | None:
    """The newest heartbeat time among the run directory's ranks (only one launch's with launch_id), or None."""
    ranks, newest = os.path.join(run_dir, ".ranks"), None
    for name in os.listdir(ranks) if os.path.isdir(ranks) else ():
        if not name.endswith(".json"):
            continue  # the beat counters (rank<N>.beat), and temporary files
        path = os.path.join(ranks, name)
        try:
            if launch_id is not None:
                with open(path) as fh:
                    if json.load(fh).get("launch_id") != launch_id:
                        continue
            newest = max(newest or 0.0, os.stat(path).st_mtime)
        except (OSError, ValueError):
            continue
    return newest


def holder_silence(run_dir: str, holder: dict, now: float | None = None) -> float | None:
    """Seconds since the holder's newest heartbeat (its claim's own time before its first heartbeat)."""
    newest = newest_beat(run_dir, holder.get("launch_id"))
    if newest is None:
        try:
            newest = os.stat(os.path.join(run_dir, OWNER)).st_mtime
        except OSError:
            return None
    return (now or time.time()) - newest


def claim(run_dir: str, launch_id: str, launcher: str) -> str | None:
    """Take the run directory for this launch (rank 0, once the directory exists). A live holder (another job
    whose ranks still beat) is refused in one line that names it; a lost holder (its process gone from this host,
    or silent for LOST_AFTER_S) is taken over. -> a note saying so, or None."""
    from bench.config import BenchError
    path = os.path.join(run_dir, OWNER)
    me = {"launch_id": launch_id, "host": socket.gethostname(), "pid": os.getpid(), "ppid": os.getppid(),
          "launcher": launcher, "started": time.time()}
    try:
        with open(path, "x") as fh:  # exclusive: of two launches at once, one gets it
            json.dump(me, fh)
        return None
    except FileExistsError:
        pass
    try:
        with open(path) as fh:
            holder = json.load(fh)
    except (OSError, ValueError):
        holder = {}
    gone = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and process_gone(holder["pid"])
    silent = holder_silence(run_dir, holder)
    if not gone and silent is not None and silent <= LOST_AFTER_S:
        raise BenchError(f"{run_dir} is in use by another job: {_describe(holder)}, last heartbeat {silent:.0f} s "
                         f"ago; a run directory is written by one job at a time: wait for that job to end or stop "
                         f"it (a holder silent for {LOST_AFTER_S:.0f} s is taken over)")
    tmp = f"{path}.{launch_id}"
    with open(tmp, "w") as fh:
        json.dump(me, fh)
    os.replace(tmp, path)
    why = "its process has exited" if gone else f"no heartbeat for {silent or 0:.0f} s"
    return f"took over {run_dir} from {_describe(holder)}: {why} (lost)"


def release(run_dir: str, launch_id: str) -> None:
    """Give the directory up at the end of this launch (only if the claim is still this launch's)."""
    path = os.path.join(run_dir, OWNER)
    try:
        with open(path) as fh:
            if json.load(fh).get("launch_id") != launch_id:
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def launcher_name() -> str:
    """Which launcher started this rank, for a holder's description."""
    e = os.environ
    if "SLURM_PROCID" in e and "LOCAL_SIZE" not in e and "LOCAL_WORLD_SIZE" not in e:
        return f"srun (job {e.get('SLURM_JOB_ID')})"
    if "LOCAL_SIZE" in e:
        return "the deepspeed launcher"
    if "TORCHELASTIC_RUN_ID" in e or "LOCAL_WORLD_SIZE" in e:
        return "torchrun"
    return "python"
