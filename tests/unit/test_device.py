"""The device a rank runs on: chosen before any collective, refused when it is not what the machine promises, and
its memory recorded by phase. Run on the CPU through the same accelerator calls a GPU run makes."""
import pytest

from bench import device, monitor
from bench.config import BenchError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("local_rank,count,expected", [
    (3, 8, 3),   # one process per GPU of the node, all GPUs visible
    (3, 1, 0),   # one GPU bound per task (CUDA_VISIBLE_DEVICES with one entry, a UUID or a MIG id)
    (5, 2, 1),   # two GPUs per task
    (0, 0, 0),   # nothing visible (the CPU)
])
def test_device_index_is_local_rank_modulo_what_the_rank_sees(local_rank, count, expected):
    assert device.device_index(local_rank, count) == expected


@pytest.mark.parametrize("env,smi,expected", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, 0, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-8f1c"}, 0, "CUDA_VISIBLE_DEVICES=GPU-8f1c"),
    ({"CUDA_VISIBLE_DEVICES": ""}, 0, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "LOCAL_SIZE": "2"}, 0, None),  # set by the deepspeed launcher on any machine
    ({"SLURM_JOB_GPUS": "0,1,2,3"}, 0, "SLURM_JOB_GPUS=0,1,2,3"),
    ({}, 8, "nvidia-smi lists 8 GPU(s)"),
    ({}, 0, None),
])
def test_what_shows_gpus(env, smi, expected):
    assert device.gpu_evidence(env, nvidia_smi=lambda: smi) == expected


def test_no_silent_fall_back_to_the_cpu(monkeypatch):
    import torch
    assert not torch.cuda.is_available(), "this test runs where torch has no CUDA (the CPU wheel)"
    with pytest.raises(BenchError, match=r"GPUs expected \(SLURM_STEP_GPUS=0\) but torch .* is a CPU build.*--device cpu"):
        device.choose("auto", evidence=lambda: "SLURM_STEP_GPUS=0")
    with pytest.raises(BenchError, match=r"GPUs expected \(--device cuda\)"):
        device.choose("cuda", evidence=lambda: None)
    assert device.choose("auto", evidence=lambda: None) == "cpu", "no GPU anywhere: the CPU, as asked"
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert device.choose("cpu", evidence=lambda: "CUDA_VISIBLE_DEVICES=0") == "cpu"
    import os
    assert os.environ["DS_ACCELERATOR"] == "cpu", "DeepSpeed is told, not left to guess"


def test_a_run_expecting_gpus_is_refused_in_one_line(refuse, monkeypatch):
    monkeypatch.setattr(device, "gpu_evidence", lambda: "SLURM_JOB_GPUS=0,1")
    code, errors = refuse("--max_steps", "3")
    assert code == 2 and len(errors) == 1 and "GPUs expected (SLURM_JOB_GPUS=0,1)" in errors[0]


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_is_refused_when_the_run_resolves(refuse, impl):
    code, errors = refuse("--attn_implementation", impl, "--max_steps", "3")
    assert code == 2 and len(errors) == 1 and impl in errors[0]
    assert device.attention_problem(impl, "cuda", find_spec=lambda name: None).startswith(
        f"--attn_implementation {impl} needs the {device.FLASH_PACKAGES[impl]} package")
    assert device.attention_problem(impl, "cuda", find_spec=lambda name: object()) is None
    assert device.attention_problem("sdpa", "cpu") is None


def test_the_device_is_selected_before_the_process_group(launch_env, monkeypatch):
    """NCCL's object collectives stage on the current CUDA device: it must be the rank's own before the group
    exists. On the CPU set_device is a no-op, so the order is observed on the accelerator's own calls."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from bench import distributed
    calls = []
    monkeypatch.setattr(get_accelerator(), "set_device", lambda i: calls.append(("set_device", i)))

    class Stop(Exception):
        pass

    def init_distributed(**kw):
        calls.append(("init_distributed",))
        raise Stop
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    with pytest.raises(Stop):
        distributed.init(distributed.DistEnv(0, 0, 1), timeout_s=10)
    assert calls == [("set_device", 0), ("init_distributed",)]


def _resident(mib: int):
    """mib MiB of fresh pages, touched: an anonymous mapping, never memory the allocator already holds from
    earlier tests in this process (malloc would hand that back without the RSS growing)."""
    import mmap
    m = mmap.mmap(-1, mib * 2**20)
    for offset in range(0, len(m), 4096):
        m[offset] = 1
    return m


def test_memory_peaks_are_kept_apart_by_phase():
    peaks = device.MemoryPeaks()
    peaks.mark_before_model()
    load = _resident(300)  # a "model load" of 300 MiB, freed before training
    load.close()
    peaks.close("load", then="warmup")
    peaks.close("warmup", then="training")
    step = _resident(60)
    rec = peaks.record()
    phases = rec["phases"]
    assert phases["load"]["peak_rss_mib"] - rec["rss_before_model_mib"] >= 290
    assert rec["peak_rss_mib"] == phases["training"]["peak_rss_mib"]
    assert phases["load"]["peak_rss_mib"] - rec["peak_rss_mib"] >= 200, "training's peak is not the load's"
    assert rec["peak_rss_mib"] >= phases["warmup"]["peak_rss_mib"] + 50
    assert rec["peak_allocated_mib"] is None, "the CPU has no allocator peak"
    step.close()


@pytest.mark.parametrize("visible,expected", [
    (None, [0, 1, 2, 3]), ("2,3", [2, 3]),
    ("GPU-5ee3a4f1-7f2d,GPU-0b1c", ["GPU-5ee3a4f1-7f2d", "GPU-0b1c"]),
    ("MIG-4f3c2a1b-7d9e", ["MIG-4f3c2a1b-7d9e"]),
    ("1,bogus,2", [1]),  # CUDA stops at the first entry it cannot read
])
def test_nvml_devices_follow_cuda_visible_devices(visible, expected):
    assert monitor.visible_devices(visible, 4) == expected


def test_an_nvml_failure_never_stops_a_run(tmp_path, capsys):
    # no NVIDIA driver here: nvmlInit fails, as a broken driver would on a GPU node
    mon = monitor.DeviceMonitor(str(tmp_path / "m.csv"), 0.05, "cuda", {}).start()
    assert mon.stop() == []
    assert "warning: the GPU monitor cannot use NVML" in capsys.readouterr().err


def test_a_ranks_cpu_use_is_per_core_it_may_use():
    """psutil counts one busy core as 100 %: the monitor divides by the cores the process may run on, so one
    busy thread reads 100 % / cores and a rank can never read more than 100 % (docs/metrics.md)."""
    import os
    import time
    source = monitor._ProcessSource({0: os.getpid()})
    end = time.process_time() + 0.3
    while time.process_time() < end:  # one thread busy
        pass
    (rank, _, util), = source.sample()
    cores = len(os.sched_getaffinity(0))
    assert rank == 0 and 100 / cores * 0.5 < util <= 100 / cores * 1.2, (util, cores)
