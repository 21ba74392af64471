"""The device a rank runs on: which one, whether it is really there, what it is, and what it held at its peaks.

Everything here goes through DeepSpeed's accelerator interface (deepspeed/accelerator/*_accelerator.py), so a CPU
run makes the same calls in the same order as a GPU run; what only a GPU has (the CUDA, NCCL and driver
versions) is read where CUDA exists and recorded as null elsewhere.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

from bench.config import BenchError
from bench.log import log

CHOICES = ("auto", "cuda", "cpu")


def device_index(local_rank: int, count: int) -> int:
    """The device this rank drives, among those it can see. A site that binds one GPU per task
    (CUDA_VISIBLE_DEVICES with one entry, a GPU UUID or a MIG id) shows each rank a single device 0 while
    LOCAL_RANK still counts the node's ranks: the rank's device is LOCAL_RANK modulo what it sees."""
    return local_rank % count if count > 0 else 0


def gpu_evidence(environ=os.environ, nvidia_smi=None) -> str | None:
    """What says this machine has NVIDIA GPUs for this job, or None: a non-empty CUDA_VISIBLE_DEVICES, SLURM's GPU
    variables, or an `nvidia-smi -L` that lists GPUs. The deepspeed launcher sets CUDA_VISIBLE_DEVICES for its
    ranks even on a machine without GPUs (launcher/launch.py, set_visible_devices_envs of the CPU accelerator), so
    under it (LOCAL_SIZE) that variable says nothing."""
    visible = None if "LOCAL_SIZE" in environ else environ.get("CUDA_VISIBLE_DEVICES")
    if visible not in (None, "", "-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS"):
        if environ.get(key) not in (None, "", "0"):
            return f"{key}={environ[key]}"
    listed = (nvidia_smi or _nvidia_smi_gpus)()
    return f"nvidia-smi lists {listed} GPU(s)" if listed else None


def _nvidia_smi_gpus() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def choose(requested: str, evidence=None) -> str:
    """Decide the accelerator before DeepSpeed does. DeepSpeed falls back to the CPU with only a warning when torch
    sees no CUDA (deepspeed/accelerator/real_accelerator.py, get_accelerator): a CPU wheel on a GPU node, or a CUDA
    wheel newer than the driver, would then "benchmark" the CPU. Refuse that in one line; --device cpu runs on the
    CPU on purpose (DS_ACCELERATOR=cpu). -> "cuda" or "cpu"."""
    if requested == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        return "cpu"
    import torch
    if torch.cuda.is_available():
        return "cuda"
    shown = "--device cuda" if requested == "cuda" else (evidence or gpu_evidence)()
    if shown:
        build = ("a CPU build" if torch.version.cuda is None else
                 f"built for CUDA {torch.version.cuda}, which cannot use them (a driver older than the build? "
                 "nvidia-smi shows the driver's CUDA version)")
        raise BenchError(f"GPUs expected ({shown}) but torch {torch.__version__} is {build}; install the CUDA build "
                         "of torch that matches the driver (README: Installing on a GPU machine), or pass --device "
                         "cpu to run on the CPU on purpose")
    return "cpu"


FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def attention_problem(impl: str, device_type: str, find_spec=importlib.util.find_spec) -> str | None:
    """Why --attn_implementation cannot run here, or None. Checked when the run resolves: transformers would
    raise ImportError only when the model is built, after the process group and the run directory exist."""
    package = FLASH_PACKAGES.get(impl)
    if package is None:
        return None
    if device_type != "cuda":
        return f"--attn_implementation {impl} runs on NVIDIA GPUs only; use sdpa on the {device_type}"
    if find_spec(package) is None:
        wheel = "flash-attn" if impl == "flash_attention_2" else "flash-attn 3 (hopper/ in the flash-attention repo)"
        return (f"--attn_implementation {impl} needs the {package} package, which is not installed; install "
                f"{wheel} for this torch and CUDA, or use --attn_implementation sdpa")
    return None


def select(local_rank: int) -> int:
    """Make this rank's device current, before the process group exists: NCCL's object collectives put their
    tensors on torch.cuda.current_device() (torch/distributed/distributed_c10d.py, _object_to_tensor), which is
    device 0 on every rank until set_device. -> the device index (a no-op on the CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    index = device_index(local_rank, acc.device_count() if acc.device_name() == "cuda" else 1)
    acc.set_device(index)
    return index


def torch_device(index: int):
    import torch
    from deepspeed.accelerator import get_accelerator
    name = get_accelerator().device_name()
    return torch.device(name, index) if name == "cuda" else torch.device("cpu")


def versions() -> dict:
    """CUDA, NCCL and driver versions, the GPU's name and count: null on the CPU."""
    import torch
    out = {"cuda": torch.version.cuda, "nccl": None, "cuda_driver": None, "gpu_name": None, "gpu_count": 0}
    if not torch.cuda.is_available():
        return out
    out["gpu_count"] = torch.cuda.device_count()
    out["gpu_name"] = torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):
        pass
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            out["cuda_driver"] = driver.decode() if isinstance(driver, bytes) else driver
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - NVML missing or broken: the record says so, the run goes on
        log.warning(f"NVML could not report the driver version ({type(e).__name__}: {e})")
    return out


# ---------------------------------------------------------------------------------------------------------
# Peak memory by phase of the run

PHASES = ("load", "warmup", "training")


class MemoryPeaks:
    """The peaks of each phase of a run: "load" (from just before the model is built until the engine is: weights,
    sharding, ZeRO's buffers), "warmup" (the steps that are not timed, the instrumented ones among them) and "training" (the
    measured steps). Without the resets between them the allocator's peak is the peak since process start, which
    for TP/EP/PP is the model load, not training.

    Each phase starts with the accelerator's reset_peak_memory_stats (torch.cuda's on GPUs) and a reset of the
    process's RSS high-water mark (Linux: "5" to /proc/self/clear_refs resets VmHWM, which is also what getrusage's
    ru_maxrss reads). On the CPU there is no allocator: allocated/reserved are null and RSS is the figure."""

    def __init__(self):
        from deepspeed.accelerator import get_accelerator
        self.acc = get_accelerator()
        self.gpu = self.acc.device_name() == "cuda"
        self.phases: dict[str, dict] = {}
        self.open = "load"
        self.rss_before_model_mib = None
        self.model_placed_peak_rss_mib = None

    def mark_before_model(self) -> None:
        """RSS just before the model is built (imports alone hold a few hundred MiB), where the load phase's RSS
        high-water mark restarts: its peak minus this is what loading the model cost the host."""
        from bench.metrics import current_rss_mib
        self.rss_before_model_mib = current_rss_mib()
        reset_rss_peak()

    def mark_model_placed(self) -> None:
        """The RSS high-water mark once a model-parallel rank's shard is on its device (bench/loading.py), before
        deepspeed.initialize builds process groups and the optimizer: minus rss_before_model_mib, what
        materializing the model cost the host."""
        self.model_placed_peak_rss_mib = peak_rss_mib()

    def now(self) -> dict:
        """The open phase's peaks so far."""
        mib = 2 ** 20
        return {"peak_allocated_mib": self.acc.max_memory_allocated() / mib if self.gpu else None,
                "peak_reserved_mib": self.acc.max_memory_reserved() / mib if self.gpu else None,
                "peak_rss_mib": peak_rss_mib()}

    def close(self, phase: str, then: str | None) -> None:
        """End `phase` (recording its peaks) and start `then` from what is held now."""
        self.phases[phase] = self.now()
        self.acc.reset_peak_memory_stats()
        reset_rss_peak()
        self.open = then

    def record(self) -> dict:
        """memory.per_rank's figures for this rank: the training phase's peaks at the top level (null when the run
        never reached it), every phase under "phases" (the open one as far as it got)."""
        phases = dict(self.phases)
        if self.open is not None:
            phases[self.open] = self.now()
        top = phases.get("training") or dict.fromkeys(("peak_allocated_mib", "peak_reserved_mib", "peak_rss_mib"))
        return {**top, "phases": phases, "rss_before_model_mib": self.rss_before_model_mib,
                "model_placed_peak_rss_mib": self.model_placed_peak_rss_mib}


def peak_rss_mib() -> float:
    """The process's RSS high-water mark since start or the last reset_rss_peak (VmHWM where /proc has it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 1024)


def reset_rss_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux 4.0+). -> whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
