"""Where a run's records go: the run directory first (source of truth), then W&B (from rank 0, through a process
of its own: bench/wandb_writer.py)."""
from __future__ import annotations

import json
import math
import os
import secrets
import select
import string
import subprocess
import sys
from bench.log import log


def write_json_atomic(path: str, obj) -> None:
    """Readers (analysis, a watching user) never see a half-written file, and a failed write (a full disk)
    leaves the previous version in place."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=str, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(obj):
    """JSON has no NaN/inf; a diverged loss is recorded as null rather than making the file unreadable."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_records(path: str) -> list[dict]:
    """metrics.jsonl's records; a last line cut short (the disk filled up mid-write, the process was killed) is
    not a record."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip() and line.endswith("\n")]


class JsonlLogger:
    """metrics.jsonl: one object per line, flushed as written, so a killed run keeps every finished step."""

    def __init__(self, path: str):
        self.path = path
        self._fh = open(path, "a")

    def truncate_after(self, step: int) -> list[dict]:
        """Resuming from a checkpoint at `step`: drop the lines of later steps (they will be recomputed, and
        the file must not list a step twice); -> the dropped records."""
        self._fh.close()
        records = read_records(self.path)
        keep = [r for r in records if r["step"] <= step]
        with open(self.path + ".tmp", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(self.path + ".tmp", self.path)
        self._fh = open(self.path, "a")
        return [r for r in records if r["step"] > step]

    def log(self, record: dict) -> str:
        """-> the line written (W&B gets the same text: the record is serialized once)."""
        line = json.dumps(_finite(record), default=str)
        self._fh.write(line + "\n")
        self._fh.flush()
        return line

    def close(self) -> None:
        self._fh.close()


class WandbLogger:
    """One W&B run per benchmark run, from rank 0. Mirrors metrics.jsonl lines and summary.json.

    W&B itself runs in a separate, lowest-priority process (bench/wandb_writer.py); this side writes each record,
    as a JSON line, to that process's pipe without blocking: what the pipe cannot take yet waits here and goes
    with the next record. No thread: a thread woken every step competes with the training loop for the GIL and a
    core. What W&B still costs the rank shows in docs/results/harness_overhead_cpu.md (time between steps).
    """

    FINISH_TIMEOUT_S = 600  # an online run's upload at the end; the run's own files are complete before it

    def __init__(self, cfg, run_dir: str, run_name: str, config: dict, tags: list[str], resume_id: str = None):
        self.run_id = self._proc = None
        if cfg.logging.wandb_mode == "disabled":
            return
        os.makedirs(os.path.join(run_dir, "wandb"), exist_ok=True)
        # The id is chosen here, so summary.json has it at once and a resumed run continues the same W&B run.
        # (secrets, not random: the harness seeds random, and two runs must not share an id)
        self.run_id = resume_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        out = cfg.logging
        init = {"project": out.wandb_project, "group": out.wandb_group or cfg.model.name,
                "job_type": cfg.parallelism.strategy,
                "name": run_name, "tags": tags, "config": config, "mode": out.wandb_mode, "dir": run_dir,
                "id": self.run_id, "resume": "allow" if resume_id else None}
        # Its own session: a Ctrl-C in the terminal reaches the ranks, which then finish the W&B run in order. The
        # writer leaves this process's tree (see wandb_writer.py) and says it is done by closing its end of `done`.
        self._done, done_w = os.pipe()
        self._proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "wandb_writer.py"),
                                       str(done_w)], stdin=subprocess.PIPE, start_new_session=True,
                                      pass_fds=(done_w,))
        os.close(done_w)
        self._pipe = self._proc.stdin.fileno()
        os.set_blocking(self._pipe, False)
        self._pending = bytearray()  # appended to per record; written from the front as the pipe takes it
        self._send("init", json.dumps(init, default=str))

    def _send(self, kind: str, payload: str) -> None:
        if self._pipe is None:
            return
        self._pending += f'{{"{kind}": {payload}}}\n'.encode()
        try:
            while self._pending:
                del self._pending[:os.write(self._pipe, self._pending)]
        except BlockingIOError:
            pass  # the writer is behind; the rest goes with the next record
        except OSError:  # the writer died; it said why on stderr
            self._pipe = None

    def log(self, line: str) -> None:
        """One metrics.jsonl line, as written there; the writer flattens it."""
        if self._proc is not None:
            self._send("log", line)

    def summary(self, summary: dict) -> None:
        if self._proc is not None:
            self._send("summary", json.dumps(_finite(summary), default=str))

    def finish(self, exit_code: int = 0) -> None:
        if self._proc is None:
            return
        self._send("finish", json.dumps(exit_code))
        if self._pipe is not None:
            os.set_blocking(self._pipe, True)  # the run is over: now wait for the writer to take the rest
            try:
                os.write(self._pipe, self._pending)
            except OSError:
                pass
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        self._proc.wait()  # the writer's first process, which left at once
        if not select.select([self._done], [], [], self.FINISH_TIMEOUT_S)[0]:  # readable: closed, the writer ended
            log.warning(f"the W&B writer did not finish within {self.FINISH_TIMEOUT_S} s; leaving it to finish "
                        "on its own (the run directory holds every record)")
        os.close(self._done)
        self._proc = None


RESERVE = ".space-for-summary"


def reserve_space(run_dir: str, nbytes: int = 256 * 1024) -> None:
    """Keep room for the last summary.json: a run that fills the disk (checkpoints) must still say how it ended,
    and a summary left `running` is the one thing a reader cannot correct."""
    try:
        with open(os.path.join(run_dir, RESERVE), "wb") as fh:
            fh.write(b"\0" * nbytes)  # written, not sparse: the blocks are really held
    except OSError:
        pass


def release_reserve(run_dir: str) -> bool:
    try:
        os.unlink(os.path.join(run_dir, RESERVE))
        return True
    except OSError:
        return False
