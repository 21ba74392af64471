"""Where a run's records go: the run directory first (source of truth), then W&B (rank 0, imported lazily)."""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading

from bench.summary import flatten


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

    def log(self, record: dict) -> None:
        self._fh.write(json.dumps(_finite(record), default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class WandbLogger:
    """One W&B run per benchmark run, from rank 0. Mirrors metrics.jsonl lines and summary.json.

    wandb.log costs milliseconds of Python per call, as much as a small model's whole step, so records go
    through a queue to a background thread: the training loop only enqueues, and order is kept.
    """

    def __init__(self, cfg, run_dir: str, run_name: str, config: dict, tags: list[str], resume_id: str = None):
        self.run = None
        if cfg.wandb_mode == "disabled":
            return
        import wandb  # lazy: a disabled run never pays the import
        os.makedirs(os.path.join(run_dir, "wandb"), exist_ok=True)
        self.run = wandb.init(
            project=cfg.wandb_project, group=cfg.wandb_group or cfg.model, job_type=cfg.strategy,
            name=run_name, tags=tags, config=config, mode=cfg.wandb_mode, dir=run_dir,
            id=resume_id, resume="allow" if resume_id else None,  # a resumed run continues its W&B run
            # System stats off: the harness samples devices itself (device_monitor.csv), and on a small
            # host the extra sampler process competes with training for CPU.
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        # Every metric is plotted against the optimizer step, not W&B's internal call counter.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="wandb-logger", daemon=True)
        self._thread.start()

    def _drain(self):
        while (item := self._queue.get()) is not None:
            kind, payload = item
            try:
                self.run.log(payload) if kind == "log" else self.run.summary.update(payload)
            except Exception as e:  # noqa: BLE001 - W&B trouble must not stop the run; disk has it all
                print(f"warning: W&B {kind} failed: {e}", file=sys.stderr)

    def log(self, record: dict) -> None:
        if self.run is not None:
            self._queue.put(("log", _finite(flatten(record))))

    def summary(self, summary: dict) -> None:
        if self.run is not None:
            self._queue.put(("summary", _finite(flatten(summary))))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        self._queue.put(None)
        self._thread.join()
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            print(f"warning: W&B finish failed: {e}", file=sys.stderr)
        self.run = None

    @property
    def run_id(self):
        return self.run.id if self.run is not None else None

