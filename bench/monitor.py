"""Background device sampler: the seeds' `nvidia-smi` log, done in-process.

One sampler per node (local rank 0). On GPUs it reads NVML for every GPU visible to the job; on the CPU each
"device" is one training process (rank), sampled with psutil (RSS, CPU %). Rows go to a CSV, flushed as
written, so a crash keeps what was sampled.
"""
from __future__ import annotations

import csv
import os
import threading
import time

from bench import metrics

FIELDS = ["time_s", "device", "memory_used_mib", "utilization_pct"]


class _NvmlSource:
    def __init__(self):
        import pynvml
        pynvml.nvmlInit()
        self.nvml = pynvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = pynvml.nvmlDeviceGetCount()
        # Physical indices of the job's GPUs; reported under the job's own numbering 0..n-1.
        physical = [int(x) for x in visible.split(",") if x.strip().isdigit()] if visible else range(count)
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in physical]

    def sample(self):
        for i, h in enumerate(self.handles):
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
            util = self.nvml.nvmlDeviceGetUtilizationRates(h).gpu
            yield i, mem, float(util)

    def close(self):
        self.nvml.nvmlShutdown()


class _ProcessSource:
    def __init__(self, pids_by_rank: dict[int, int]):
        import psutil
        self.procs = {rank: psutil.Process(pid) for rank, pid in pids_by_rank.items()}
        for p in self.procs.values():
            p.cpu_percent(None)  # the first call only starts psutil's interval

    def sample(self):
        import psutil
        for rank, p in self.procs.items():
            try:
                yield rank, p.memory_info().rss / 2**20, p.cpu_percent(None)
            except psutil.Error:  # a rank that already exited
                continue

    def close(self):
        pass


class DeviceMonitor:
    def __init__(self, path: str, interval_s: float, device_type: str, pids_by_rank: dict[int, int]):
        self.path, self.interval = path, interval_s
        self.source = _NvmlSource() if device_type == "cuda" else _ProcessSource(pids_by_rank)
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
        for dev, mem, util in self.source.sample():
            self.samples.setdefault(dev, []).append((mem, util))
            self._writer.writerow([f"{now:.3f}", dev, f"{mem:.1f}", f"{util:.1f}"])
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
        self.source.close()
        out = []
        for dev in sorted(self.samples):
            mems = [m for m, _ in self.samples[dev]]
            utils = [u for _, u in self.samples[dev]]
            out.append({"index": dev, **metrics.device_stats(mems, utils), "samples": len(mems)})
        return out
