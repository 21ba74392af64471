"""Compiled ops and the optimizer: a dead build's lock is named, not waited on; the cache follows the CPU."""
import os
import subprocess
import time

import pytest

from bench import ops

pytestmark = pytest.mark.unit

SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 avx512f\n"
ZEN2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 sse4a\n"


def test_cache_is_keyed_to_the_instruction_set():
    # -march=native builds from a login node must not load on a compute node of another CPU generation
    assert ops.isa_key(SKYLAKE) != ops.isa_key(ZEN2)
    assert ops.isa_key(SKYLAKE) == ops.isa_key(SKYLAKE.replace("avx avx2", "avx2 avx")), "flag order is irrelevant"
    assert ops.extension_cache().endswith(ops.isa_key())


def _build_dir(root, age_s: float):
    d = root / "deepspeed_shm_comm"
    d.mkdir(parents=True)
    for name in ("lock", "build.ninja"):
        (d / name).touch()
        os.utime(d / name, (time.time() - age_s,) * 2)
    return d


def test_a_lock_nobody_works_behind_is_stale(tmp_path):
    d = _build_dir(tmp_path, age_s=2 * ops.STALE_AFTER_S)
    assert ops.stale_lock(str(d)) == str(d / "lock")
    (d / "lock").unlink()
    assert ops.stale_lock(str(d)) is None, "no lock: nothing to wait for"


def test_a_build_in_progress_is_not_stale(tmp_path):
    assert ops.stale_lock(str(_build_dir(tmp_path, age_s=10))) is None, "recent progress (perhaps another host)"
    old = _build_dir(tmp_path / "old", age_s=2 * ops.STALE_AFTER_S)
    compiler = subprocess.Popen(["sleep", "30"], cwd=old)  # as ninja and the compilers run inside the directory
    try:
        time.sleep(0.2)
        assert ops.stale_lock(str(old)) is None
    finally:
        compiler.kill()
        compiler.wait()
    assert ops.stale_lock(str(old)) == str(old / "lock")


def test_a_run_refuses_a_dead_builds_lock_in_one_line(refuse, tmp_path, monkeypatch):
    d = _build_dir(tmp_path, age_s=2 * ops.STALE_AFTER_S)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    code, errors = refuse("--max_steps", "3")
    assert code == 2 and len(errors) == 1
    assert str(d / "lock") in errors[0] and "delete that file" in errors[0]
    assert not (tmp_path / "runs").exists(), "refused before any run directory exists"


@pytest.mark.parametrize("ds,device,expected", [
    ({}, "cpu", ["deepspeed_shm_comm"]),
    ({}, "cuda", []),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "cuda", ["cpu_adam"]),
    ({"optimizer": {"params": {"torch_adam": False}}}, "cuda", ["fused_adam"]),
])
def test_ops_a_run_loads(ds, device, expected):
    assert ops.ops_to_load(ds, device) == expected
