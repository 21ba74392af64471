"""Process-group setup that works under every launcher: deepspeed, torchrun, srun, or plain python."""
from __future__ import annotations

import errno
import json
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

from bench import compiling, ops
from bench.config import BenchError
from bench.log import log


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int = 1  # ranks on this host
    cpu_threads: int = 1       # intra-op threads per rank (set_cpu_threads)
    cpu_threads_source: str = ""
    affinity_cpus: int = 1     # CPUs this process may run on (its affinity mask)


_PORTS_GIVEN: set[int] = set()
# Where free_port looks: below the kernel's ephemeral range (32768 by default), apart from the ports slurm/common.sh
# derives from job ids (20000-28999) and the launchers' default 29500.
FREE_PORTS = range(10000, 20000)


def free_port() -> int:
    """A free port for a launch's rendezvous, chosen below the kernel's ephemeral range and never twice by one
    process. A port the kernel picks (bind to 0) lies in that range, where, in the seconds between this check and
    rank 0's bind, any process's outgoing connection or gloo listener may be given it: rank 0 then cannot bind,
    or another rank reaches the wrong server and waits there. Below the range only an explicit bind takes it."""
    # a host whose ephemeral range starts lower (some set 1024-65535) leaves nothing safe: the whole range then
    ports = range(FREE_PORTS.start, min(FREE_PORTS.stop, _ephemeral_low())) or FREE_PORTS
    pick = random.SystemRandom()
    for _ in range(1000):
        port = pick.choice(ports)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise BenchError(f"no free port in {ports.start}-{ports.stop - 1}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def discover() -> DistEnv:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from the launcher, SLURM, or world-size-1 defaults.

    deepspeed and torchrun set all five; srun sets SLURM_* only (the sbatch script exports MASTER_ADDR/PORT);
    plain `python bench/run.py` is a world of one on this host.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    try:
        rank, local, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise BenchError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers, got {env['RANK']!r}/"
                         f"{env['LOCAL_RANK']!r}/{env['WORLD_SIZE']!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise BenchError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world}")
    if world > 1 and "MASTER_ADDR" not in env:
        raise BenchError("WORLD_SIZE > 1 but MASTER_ADDR is not set; the launcher or sbatch script must export "
                         "MASTER_ADDR and MASTER_PORT (see slurm/)")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()) if world == 1 else "29500")
    if world > 1 and rank == 0 and not agent_store():
        check_port_free(env["MASTER_ADDR"], int(env["MASTER_PORT"]))
    ops.use_own_extension_cache()
    compiling.use_own_cache()
    local_ranks = local_world_size(world)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return DistEnv(rank, local, world, local_ranks, *set_cpu_threads(local_ranks, affinity), affinity)


def agent_store() -> bool:
    """torchrun (and accelerate launch, which uses it) serves the store on MASTER_PORT from its own agent process;
    every rank is then a client, as torch's env:// rendezvous does."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def port_taken_error(addr: str, port: int) -> BenchError:
    return BenchError(f"rendezvous port {port} on {addr} is already in use (another job on this host?); start on "
                      "a free port: deepspeed/torchrun --master_port N, or export MASTER_PORT=N under srun")


def check_port_free(addr: str, port: int) -> None:
    """Rank 0 will serve the rendezvous on this port: say at once, before the heavy imports, when another process
    holds it. (The store's own bind, later, stays the authoritative check; a port freed meanwhile is fine.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for the store too
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise port_taken_error(addr, port) from None
            # EADDRNOTAVAIL and friends: not this host's address; the store's bind will tell


def local_world_size(world: int) -> int:
    """Ranks on this host: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, SLURM's tasks per
    node ("4(x2)" means 4 on each of 2 nodes), else the whole world (one host)."""
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE",
                "SLURM_TASKS_PER_NODE"):
        head = env.get(key, "").split("(")[0].split(",")[0]
        if head.isdigit() and int(head) > 0:
            return min(int(head), world)
    return world


def set_cpu_threads(local_ranks: int, affinity: int) -> tuple[int, str]:
    """Give each rank its share of the CPUs, before torch is imported (its thread pools read OMP_NUM_THREADS at
    start-up); see cpu_share. -> (threads, where the number came from)."""
    threads, source = cpu_share(os.environ, affinity, local_ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads, source


def cpu_share(environ, affinity: int, local_ranks: int) -> tuple[int, str]:
    """This rank's intra-op threads. A user's OMP_NUM_THREADS always wins. A task that srun bound to its own CPUs
    (per-task binding, or an affinity no larger than --cpus-per-task) uses all of them: its affinity is already its
    share, and dividing it again by the ranks on the node (8 CPUs per task / 8 ranks = 1 thread) starves ZeRO
    offload's CPU Adam and the data path. Ranks that share one affinity (the deepspeed launcher, torchrun, an
    unbound srun) divide it: the deepspeed launcher leaves every rank at one thread per core, so N ranks on N cores
    oversubscribed them N-fold (a 2-rank LoRA step on 2 cores took 1.05 s instead of 0.07 s)."""
    if environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    bound = _task_binding(environ, affinity)
    if bound:
        return affinity, f"{affinity} CPUs bound to this task ({bound})"
    return max(1, affinity // max(1, local_ranks)), f"{affinity} cores // {local_ranks} local ranks"


def device_share(env: DistEnv, world: int) -> float:
    """The share of a device a CPU rank computes on: ranks sharing one affinity share its cores, so 4 ranks on 2
    cores each get half a core's time (measured: a 4-rank step on 2 cores takes twice a 2-rank step's compute,
    docs/results/calibration_cpu.md); a task srun bound to its own CPUs, or a rank with a core to itself, has 1.
    Ranks a plan counts but this process did not start (bench-plan, --dry_run --world_size) are taken to share this
    host. The cost features divide compute-bound work by it (bench/calibrate.py); a GPU rank's is 1."""
    started = env.world_size == world
    affinity = env.affinity_cpus if started else \
        (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if started and _task_binding(os.environ, affinity):
        return 1.0
    return min(1.0, affinity / max(1, env.local_world_size if started else world))


def _task_binding(environ, affinity: int) -> str | None:
    """Why this rank's affinity is its own (an srun task bound to its CPUs), or None when ranks share it."""
    if "SLURM_PROCID" not in environ or "LOCAL_SIZE" in environ or "LOCAL_WORLD_SIZE" in environ:
        return None  # not an srun task: a launcher's children share the launcher's affinity
    bind = environ.get("SLURM_CPU_BIND_TYPE", "")
    if bind and not bind.startswith("none"):
        return f"SLURM_CPU_BIND_TYPE={bind}"
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and affinity <= int(per_task):
        return f"SLURM_CPUS_PER_TASK={per_task}"
    return None


def init(env: DistEnv, timeout_s: int) -> int:
    """Select this rank's device, then create the process group. Every wait in it ends within timeout_s with one
    line that says what it waited for: a rank that never arrives, a rank 0 that cannot be reached, a port another
    job holds. -> the rank's device index (bench/device.py)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from bench import device
    index = device.select(env.local_rank)  # before any collective: see device.select
    timeout = timedelta(seconds=timeout_s)
    backend = get_accelerator().communication_backend_name()
    if env.world_size > 1:
        store = rendezvous_store(env, timeout_s)
        extra = {}
        if get_accelerator().device_name() == "cuda":  # as DeepSpeed does: binds the rank's GPU to the group
            extra["device_id"] = device.torch_device(index)
        try:
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                    **extra)
        except (RuntimeError, dist.DistError) as e:
            raise BenchError(f"rendezvous at {_address()}: rank {env.rank} waited {timeout_s} s for the other "
                             f"{env.world_size - 1} rank(s) of a world of {env.world_size} and gave up "
                             f"({_first_line(e)}); were all ranks started, with the same MASTER_ADDR/MASTER_PORT? "
                             "(--dist_timeout_s sets the wait)") from None
    # DeepSpeed adopts the group created above (world 1: it creates its own on a free local port).
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    return index


def _address() -> str:
    return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def rendezvous_store(env: DistEnv, timeout_s: int):
    """Rank 0 serves the rendezvous store on MASTER_PORT; the others connect to it. Keys live under a prefix
    unique to this job, so a rank that reaches another job's store (two launches on one port: the second job's
    rank 0 cannot bind, its other ranks connect to the first job's server) cannot disturb that job."""
    import torch.distributed as dist
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = dist.TCPStore(addr, port, env.world_size, is_master=env.rank == 0 and not agent_store(),
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except (RuntimeError, dist.DistError) as e:
        if env.rank == 0 and ("EADDRINUSE" in str(e) or "address already in use" in str(e).lower()):
            raise port_taken_error(addr, port) from None
        raise BenchError(f"rendezvous: rank {env.rank} could not reach rank 0 at {addr}:{port} within "
                         f"{timeout_s} s ({_first_line(e)}); is rank 0 running, and MASTER_ADDR/MASTER_PORT "
                         "right? (--dist_timeout_s sets the wait)") from None
    store = dist.PrefixStore(f"bench/{job_token(env)}/", store)
    if env.rank == 0:
        store.set("rank0", "up")
    else:
        wait_for_rank0(store, addr, port, timeout_s)
    return store


def wait_for_rank0(store, addr: str, port: int, timeout_s: int) -> None:
    """Wait for this job's rank 0 in short polls, not one blocking wait inside the C++ store: a signal (Ctrl-C,
    or the launcher's SIGTERM once rank 0 has failed, e.g. on a taken port) then stops this rank at once instead
    of after the launcher's 30 s grace and its SIGKILL."""
    import time

    import torch.distributed as dist
    deadline = time.monotonic() + timeout_s
    try:
        while not store.check(["rank0"]):
            if time.monotonic() > deadline:
                raise BenchError(f"rendezvous: rank 0 of this job never registered at {addr}:{port} within "
                                 f"{timeout_s} s (another job's server holds that port?); start every rank with "
                                 "the same free MASTER_PORT (--dist_timeout_s sets the wait)")
            time.sleep(0.1)
    except (RuntimeError, dist.DistError) as e:
        raise BenchError(f"rendezvous: rank 0's server at {addr}:{port} went away ({_first_line(e)}); is rank 0 "
                         "running, and MASTER_ADDR/MASTER_PORT right?") from None


def job_token(env: DistEnv) -> str:
    """The same on every rank of one job, different between concurrent jobs on one host: srun's job and step
    ids; for a single-host launcher (deepspeed, torchrun) the launcher's pid, every rank's parent."""
    e = os.environ
    if "SLURM_PROCID" in e and "SLURM_JOB_ID" in e:
        return f"slurm-{e['SLURM_JOB_ID']}.{e.get('SLURM_STEP_ID', 'batch')}"
    launched = "LOCAL_SIZE" in e or "LOCAL_WORLD_SIZE" in e  # deepspeed / torchrun: every rank is its child
    if launched and env.local_world_size == env.world_size:
        return f"launcher-{os.getppid()}"
    return "shared"  # ranks started by hand, or on several hosts: they rely on distinct ports, as before


class AlreadyCompleted(Exception):
    """--resume auto of a run that completed its --max_steps: nothing to do, and nothing may be touched."""


def completed_steps(run_dir: str) -> int | None:
    """The steps a run directory's summary.json says the run completed, or None (not completed, or unreadable)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as fh:
            summary = json.load(fh)
    except (OSError, ValueError):
        return None
    return summary.get("steps") if summary.get("status") == "completed" else None


def make_run_dir(output_dir: str, run_name: str, reuse: bool = False, max_steps: int | None = None
                 ) -> tuple[str, str]:
    """Rank 0 creates a directory no other run owns (name, name-2, ...) and every rank learns its path, and this
    launch's id (which tells its heartbeats from an earlier launch's, bench/liveness.py). reuse=True (resuming)
    takes the existing directory of that name instead, unless its run already completed max_steps steps: then
    every rank raises AlreadyCompleted before anything in it is claimed or written. -> (path, launch id)."""
    import uuid

    import torch.distributed as dist

    from bench import liveness
    path = [None, uuid.uuid4().hex, None, None]  # path, launch id, a refusal, a note
    existing = os.path.join(output_dir, run_name)
    done = completed_steps(existing) if dist.get_rank() == 0 and reuse else None
    if done is not None and max_steps is not None and done >= max_steps:
        path[2] = f"already completed at step {done}: nothing to do ({existing})"
        dist.broadcast_object_list(path, src=0, device=_object_device())
        raise AlreadyCompleted(path[2])
    if dist.get_rank() == 0 and reuse and os.path.isfile(os.path.join(existing, "config.json")):
        path[0] = existing
    elif dist.get_rank() == 0:
        os.makedirs(output_dir, exist_ok=True)
        for i in range(1, 1000):
            candidate = os.path.join(output_dir, run_name if i == 1 else f"{run_name}-{i}")
            try:
                os.makedirs(candidate)  # exist_ok=False: two runs started at once never share a directory
                path[0] = candidate
                break
            except FileExistsError:
                continue
    if path[0] is not None:  # one job per run directory (bench/liveness.py)
        try:
            path[3] = liveness.claim(path[0], path[1], liveness.launcher_name())
        except BenchError as e:
            path[2] = str(e)
    dist.broadcast_object_list(path, src=0, device=_object_device())
    if path[2] and path[2].startswith("already completed"):
        raise AlreadyCompleted(path[2])
    if path[2]:
        raise BenchError(path[2])
    if path[0] is None:
        raise BenchError(f"cannot create a run directory for {run_name!r} under {output_dir}")
    if path[3] and dist.get_rank() == 0:
        log.warning(path[3])
    return path[0], path[1]


def node_pids() -> dict[int, int]:
    """{global rank: pid} of the ranks on this host (for the CPU device monitor)."""
    mine = (socket.gethostname(), os.getpid())
    everyone = gather(mine)
    return {r: pid for r, (host, pid) in enumerate(everyone) if host == mine[0]}


def gather(obj) -> list:
    """Every rank's obj. all_gather_object takes no device: torch uses the current CUDA device under NCCL, which
    device.select made this rank's own before the group existed."""
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _object_device():
    """Where an object collective stages its bytes: this rank's current device (cuda:i after device.select), the
    CPU under gloo."""
    import torch
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def shutdown(clean: bool) -> None:
    """Tear the process group down once this rank is done (bench/run.py then leaves without the interpreter's
    teardown; see there why). A clean run first waits for every rank; after an error other ranks may be gone."""
    import glob
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    rank = dist.get_rank()
    try:
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer already gone; nothing left to tear down cleanly
        pass
    # DeepSpeed's CPU shared-memory all-reduce never unlinks its buffers (/dev/shm/deepspeed_allreduce_buffer_
    # <i>_<addr>_<port>_<rank>): left behind, every CPU run keeps RAM until the machine reboots.
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass
