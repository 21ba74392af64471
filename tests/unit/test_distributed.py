"""Launcher environment -> ranks on this host -> CPU threads per rank, decided before torch starts its pools."""
import os

import pytest

from bench import distributed

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("env,world,expected", [
    ({"LOCAL_WORLD_SIZE": "4"}, 8, 4),             # torchrun
    ({"LOCAL_SIZE": "2"}, 2, 2),                   # deepspeed launcher
    ({"SLURM_NTASKS_PER_NODE": "4"}, 8, 4),        # srun with --ntasks-per-node
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, 8, 4),
    ({"SLURM_TASKS_PER_NODE": "3,2"}, 5, 3),
    ({}, 3, 3),                                    # nothing said: one host
    ({"LOCAL_WORLD_SIZE": "16"}, 4, 4),            # never more than the world
])
def test_local_world_size(launch_env, env, world, expected):
    launch_env(**env)
    assert distributed.local_world_size(world) == expected


def test_each_rank_gets_its_share_of_the_cores(launch_env):
    cores = len(os.sched_getaffinity(0))
    threads, source = distributed.set_cpu_threads(2, cores)
    assert threads == max(1, cores // 2) and os.environ["OMP_NUM_THREADS"] == str(threads)
    assert source == f"{cores} cores // 2 local ranks"
    assert distributed.set_cpu_threads(10 * cores, cores)[0] == 1  # more ranks than cores: one thread each


def test_the_users_omp_num_threads_wins(launch_env):
    launch_env(OMP_NUM_THREADS=7)
    assert distributed.set_cpu_threads(2, 16) == (7, "OMP_NUM_THREADS")


@pytest.mark.parametrize("env,affinity,ranks,threads", [
    # srun binding each of 8 tasks to its own 8 CPUs: the affinity is the task's share already
    ({"SLURM_PROCID": "3", "SLURM_CPU_BIND_TYPE": "mask_cpu:"}, 8, 8, 8),
    ({"SLURM_PROCID": "3", "SLURM_CPUS_PER_TASK": "8"}, 8, 8, 8),
    # srun without binding: every task sees the node's 64 CPUs and shares them
    ({"SLURM_PROCID": "3", "SLURM_CPU_BIND_TYPE": "none"}, 64, 8, 8),
    ({"SLURM_PROCID": "3", "SLURM_CPUS_PER_TASK": "8"}, 64, 8, 8),
    # the deepspeed launcher inside an sbatch job (LOCAL_SIZE): its children share the launcher's affinity
    ({"SLURM_PROCID": "0", "SLURM_CPU_BIND_TYPE": "mask_cpu:", "LOCAL_SIZE": "8"}, 64, 8, 8),
    ({"LOCAL_WORLD_SIZE": "2"}, 2, 2, 1),
])
def test_cpu_share_counts_only_what_the_rank_holds(env, affinity, ranks, threads):
    got, source = distributed.cpu_share(env, affinity, ranks)
    assert got == threads, source
    assert ("bound to this task" in source) == (got == affinity and ranks > 1)


def test_discover_records_threads_and_local_ranks(launch_env):
    launch_env(RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=1234, LOCAL_SIZE=2)
    env = distributed.discover()
    assert (env.rank, env.local_world_size) == (1, 2)
    assert env.cpu_threads == int(os.environ["OMP_NUM_THREADS"]) >= 1


def test_a_free_port_lies_below_the_ephemeral_range_and_is_never_given_twice():
    """The kernel hands ephemeral ports to any process's connections in the seconds before rank 0 binds; a port
    below that range is taken only by an explicit bind."""
    import socket
    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        low = int(fh.read().split()[0])
    ports = [distributed.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(p in distributed.FREE_PORTS and (p < low or low <= distributed.FREE_PORTS.start) for p in ports)
    for port in ports:  # and free
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
