"""bench/compiling.py without a launch: what --compile on changes in the resolved ds_config, where inductor's
cache goes, and the summary's arithmetic over the per-step compile times."""
import pytest

from bench import compiling
from bench.config import parse_args
from bench.strategies import STRATEGIES

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_only_expert_parallelism_alone_compiles_around_its_experts(name):
    on, off = parse_args(["--compile", "on"]), parse_args([])
    strategy = STRATEGIES[name]()
    got = compiling.resolve_ds({"zero_optimization": {"stage": 1}}, on, strategy)
    assert compiling.resolve_ds({"zero_optimization": {"stage": 1}}, off, strategy) == {
        "zero_optimization": {"stage": 1}}
    if name == "ep":
        assert got["compile"] == {"autoep_non_moe": True}
    else:
        assert "compile" not in got
    mine = {"compile": {"autoep_non_moe": False}}  # the user's own choice is kept
    assert compiling.resolve_ds(dict(mine), on, strategy) == mine


def test_inductor_cache_is_the_environments_own_unless_the_user_set_one(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiling.use_own_cache()
    import os
    import sys
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(os.path.join(sys.prefix, "torchinductor", ""))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiling.use_own_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_summary_adds_the_steps_compile_time_and_takes_the_slowest_rank():
    class Res:
        records = [{"step": 1, "warmup": True, "compile_s": 5.0}, {"step": 2, "warmup": True, "compile_s": 1.0},
                   {"step": 3, "warmup": False, "compile_s": 0.0}, {"step": 4, "warmup": True, "compile_s": 2.5}]
        recompiled_steps = [4]
    ranks = [{"rank": r, "compile_s": 9.0 + r, "graphs": 3, "frames_compiled": 3, "graph_breaks": r,
              "break_reasons": [], "cache_hits": 2, "cache_misses": r} for r in (0, 1)]
    s = compiling.summary(True, "aot_eager", {}, ranks, Res())
    assert (s["backend"], s["compile_s"], s["steps_compile_s"], s["recompiled_s"]) == ("aot_eager", 10.0, 8.5, 2.5)
    assert s["graph_breaks"] == 1 and s["cache"]["hits"] == 4 and s["cache"]["warm"] is False
    assert compiling.summary(False, "auto", {}, [{}], Res()) == {"enabled": False}
