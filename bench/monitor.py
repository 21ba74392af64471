"""Background device sampler: the seeds' `nvidia-smi` log, done in-process.

One sampler per node (local rank 0). On GPUs it reads NVML for every GPU visible to the job; on the CPU each
"device" is one training process (rank), sampled with psutil (RSS, and CPU time over the cores it may run on:
100 % = every one of them busy all the time). Rows go to a CSV, flushed as
written, so a crash keeps what was sampled.
"""
from __future__ import annotations

import csv
import os
import threading
import time

from bench import metrics
from bench.log import log

FIELDS = ["time_s", "device", "memory_used_mib", "utilization_pct"]


def visible_devices(visible: str | None, count: int) -> list[int | str]:
    """The job's GPUs as NVML names them, in the job's own order 0..n-1: CUDA_VISIBLE_DEVICES entries are physical
    indices, GPU UUIDs ("GPU-...") or MIG ids ("MIG-..."); CUDA stops at the first entry it cannot read, and so does
    this. Unset: every GPU the driver has."""
    if visible is None:
        return list(range(count))
    out: list[int | str] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            out.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            out.append(entry)
        else:
            break
    return out


class _NvmlSource:
    def __init__(self):
        import pynvml
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = []
        for dev in visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), pynvml.nvmlDeviceGetCount()):
            self.handles.append(pynvml.nvmlDeviceGetHandleByIndex(dev) if isinstance(dev, int)
                                else pynvml.nvmlDeviceGetHandleByUUID(dev))  # a MIG id gives the MIG device

    def sample(self):
        for i, h in enumerate(self.handles):
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
            try:
                util = float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except self.nvml.NVMLError:  # MIG devices report no utilization
                util = None
            yield i, mem, util

    def close(self):
        self.nvml.nvmlShutdown()


class _ProcessSource:
    def __init__(self, pids_by_rank: dict[int, int]):
        import psutil
        self.procs = {rank: psutil.Process(pid) for rank, pid in pids_by_rank.items()}
        self.cores = {}
        for rank, p in self.procs.items():
            p.cpu_percent(None)  # the first call only starts psutil's interval
            # psutil's percent is of one core (a process of 8 busy threads reads 800 %): per core it may use
            self.cores[rank] = len(p.cpu_affinity()) if hasattr(p, "cpu_affinity") else (os.cpu_count() or 1)

    def sample(self):
        import psutil
        for rank, p in self.procs.items():
            try:
                yield rank, p.memory_info().rss / 2**20, p.cpu_percent(None) / self.cores[rank]
            except psutil.Error:  # a rank that already exited
                continue

    def close(self):
        pass


class _NoSource:
    """NVML failed: the run goes on and memory.device stays empty."""

    def sample(self):
        return iter(())

    def close(self):
        pass


def _source(device_type: str, pids_by_rank: dict[int, int]):
    if device_type != "cuda":
        return _ProcessSource(pids_by_rank)
    try:
        return _NvmlSource()
    except Exception as e:  # noqa: BLE001 - NVML missing, no driver, an id it cannot resolve: never stops a run
        log.warning(f"the GPU monitor cannot use NVML ({type(e).__name__}: {e}); memory.device stays empty")
        return _NoSource()


class DeviceMonitor:
    def __init__(self, path: str, interval_s: float, device_type: str, pids_by_rank: dict[int, int]):
        self.path, self.interval = path, interval_s
        self.source = _source(device_type, pids_by_rank)
        self.samples: dict[int, list[tuple[float, float]]] = {}  # device -> [(memory MiB, util %)]
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._fh = open(path, "w", newline="")
        self._writer = csv.writer(self._fh)
        self._writer.writerow(FIELDS)
        self._thread = threading.Thread(target=self._loop, name="device-monitor", daemon=True)

    def start(self):
        self._sample_once()
        self._thread.start()
        return self

    def _sample_once(self):
        now = time.perf_counter() - self._t0
        try:
            for dev, mem, util in self.source.sample():
                self.samples.setdefault(dev, []).append((mem, util))
                self._writer.writerow([f"{now:.3f}", dev, f"{mem:.1f}", "" if util is None else f"{util:.1f}"])
        except Exception as e:  # noqa: BLE001 - a sampling error (a GPU fallen off the bus) ends sampling, not the run
            log.warning(f"the device monitor stopped sampling ({type(e).__name__}: {e})")
            self.source = _NoSource()
        self._fh.flush()

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._sample_once()

    def stop(self) -> list[dict]:
        """Stop sampling; -> the summary's memory.device list."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sample_once()  # one last sample so even a very short run has a start and an end
        self._fh.close()
        try:
            self.source.close()
        except Exception:  # noqa: BLE001 - NVML's shutdown failing changes nothing recorded
            pass
        out = []
        for dev in sorted(self.samples):
            mems = [m for m, _ in self.samples[dev]]
            utils = [u for _, u in self.samples[dev] if u is not None]
            out.append({"index": dev, **metrics.device_stats(mems, utils), "samples": len(mems)})
        return out
