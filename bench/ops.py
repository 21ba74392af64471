"""DeepSpeed's compiled ops and the optimizer: built where they will run, never a surprise at run time.

torch builds an op on first use into TORCH_EXTENSIONS_DIR/<name>, holding the file "lock" there while it builds;
every other process waits for as long as that file exists (torch/utils/file_baton.py, FileBaton.wait: no owner,
no timeout). A build killed half-way leaves the file behind and every later run waits forever: detected here and
refused in one line. DeepSpeed compiles its CPU ops with -march=native (op_builder/builder.py, cpu_arch), and
torch reuses a build whose flags did not change: a cache shared between a login node and compute nodes of another
CPU generation would load code with instructions the compute node lacks. This environment's cache is therefore
keyed to the host's instruction set.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time

from bench.config import BenchError
from bench.ds_config import offloaded

STALE_AFTER_S = 300  # a build shows progress (a file written in its directory) far more often than this


def isa_key(cpuinfo: str | None = None) -> str:
    """The machine and a digest of its CPU's feature flags: equal on hosts that can run each other's builds."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    flags = next((line.split(":", 1)[1] for line in cpuinfo.splitlines()
                  if line.split(":")[0].strip() in ("flags", "Features")), "")
    digest = hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:10]
    return f"{platform.machine()}-{digest}"


def extension_cache() -> str:
    """This environment's own cache of DeepSpeed's JIT-built ops, next to its packages, one per instruction set."""
    return os.path.join(sys.prefix, "torch_extensions", isa_key())


def use_own_extension_cache() -> None:
    """DeepSpeed's CPU shared-memory communication op is compiled on first use (45-120 s on 2 cores) into torch's
    default cache in the home directory, which every environment of the user shares, so two environments rebuild
    it in turn. scripts/install.sh builds it into this environment's cache; point torch there too (a
    TORCH_EXTENSIONS_DIR the user set wins)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = extension_cache()
    # torch's JIT build runs the first `ninja` on PATH. Ninja 1.11 and 1.12+ hash commands differently in the
    # build log, so alternating between the system's ninja and this environment's (a run started as
    # .venv/bin/python without activating the venv, then one with it) rebuilt the op every time: 40 s each.
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def stale_lock(build_dir: str, now: float | None = None) -> str | None:
    """The path of a build lock nobody is working behind, or None. A lock is live while its build directory shows
    progress (a file newer than STALE_AFTER_S, which covers a build on another host sharing the directory) or a
    process on this host works inside it (torch runs ninja, and ninja the compilers, in the build directory)."""
    lock = os.path.join(build_dir, "lock")
    try:
        newest = max(os.stat(os.path.join(build_dir, n)).st_mtime for n in os.listdir(build_dir))
    except (OSError, ValueError):
        return None
    if not os.path.exists(lock) or (now or time.time()) - newest < STALE_AFTER_S:
        return None
    return None if _working_in(build_dir) else lock


def _working_in(directory: str) -> bool:
    real = os.path.realpath(directory)
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if pid.isdigit():
            try:
                if os.path.realpath(f"/proc/{pid}/cwd") == real:
                    return True
            except OSError:
                continue
    return False


def ops_to_load(ds: dict, device_type: str) -> list[str]:
    """The JIT-built ops this run will load: the CPU's shared-memory collectives, CPU Adam under ZeRO offload,
    DeepSpeed's FusedAdam where a ds_config asks for it on a GPU (torch_adam false)."""
    names = ["deepspeed_shm_comm"] if device_type == "cpu" else []
    params = (ds.get("optimizer") or {}).get("params") or {}
    if offloaded(ds):
        names.append("cpu_adam")
    elif device_type == "cuda" and params.get("torch_adam") is False:
        names.append("fused_adam")
    return names


def check_ops(ds: dict, device_type: str) -> None:
    """Refuse, before any process group exists, a run that would wait forever on a dead build's lock or compile
    FusedAdam without a CUDA compiler."""
    use_own_extension_cache()
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    names = ops_to_load(ds, device_type)
    for name in names:
        lock = stale_lock(os.path.join(root, name)) if root else None
        if lock:
            raise BenchError(f"{lock} is left from a build of DeepSpeed's {name} op that was killed (no process works "
                             f"in its directory, nothing changed for {STALE_AFTER_S // 60} min); torch would wait for "
                             "it forever: delete that file, and the next run rebuilds the op")
    if "fused_adam" in names:
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None:
            raise BenchError("the ds_config sets torch_adam false: DeepSpeed's FusedAdam compiles at the first run "
                             "and needs nvcc (CUDA_HOME), which this machine lacks; set \"torch_adam\": \"auto\" "
                             "(torch's fused AdamW, nothing to compile)")


def build_cpu_comm_op() -> str:
    """Build (or find) the op a CPU run loads when its process group starts; install.sh calls this so the first
    run does not pay for the compile. -> what happened, one line."""
    use_own_extension_cache()
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        return "accelerator is not the CPU: no CPU communication op needed"
    import deepspeed.ops
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return "DeepSpeed's shared-memory op is not compatible here; gloo alone is used"
    builder.load(verbose=False)
    return f"{builder.NAME} ready in {os.environ['TORCH_EXTENSIONS_DIR']}"


def cpu_adam_problem() -> str | None:
    """Why DeepSpeed's CPU Adam (what ZeRO offload updates the offloaded states with) cannot be built here, or
    None when it can; scripts/install.sh builds it (build_cpu_adam), otherwise the first offload run compiles it."""
    use_own_extension_cache()
    from deepspeed.ops.op_builder import CPUAdamBuilder
    builder = CPUAdamBuilder()
    if not builder.is_compatible(verbose=False):
        return f"DeepSpeed's {builder.NAME} op is not compatible with this machine (see `ds_report`)"
    return None


def build_cpu_adam() -> str:
    """Build (or find) DeepSpeed's CPU Adam, for ZeRO offload. -> what happened, one line."""
    problem = cpu_adam_problem()
    if problem:
        return problem + "; ZeRO offload configs will be refused"
    from deepspeed.ops.op_builder import CPUAdamBuilder
    CPUAdamBuilder().load(verbose=False)
    return f"cpu_adam ready in {os.environ.get('TORCH_EXTENSIONS_DIR', 'torch default cache')}"
