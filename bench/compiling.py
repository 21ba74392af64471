"""--compile on: the engine's model runs under torch.compile, and the record says what compiling cost.

- How: DeepSpeed's `engine.compile()` (runtime/engine.py `DeepSpeedEngine.compile`: `module.compile(backend=...)`,
  the backend the accelerator names, inductor on the CPU and on CUDA), once the engine exists, so ZeRO's hooks,
  AutoTP's and AutoEP's replaced layers and Ulysses' attention are what is compiled. DeepCompile is DeepSpeed's own
  compiler pass, asked for in the ds_config (`"compile": {"deepcompile": true}`) and started by the same call.
- Cost: dynamo's own clock (torch/_dynamo/utils.py `calculate_time_spent`: frame and backward compilation) read
  around every step (metrics.jsonl `compile_s`), its counters (graphs, graph breaks and their reasons, frames
  compiled) and inductor's FX-graph cache (hits and misses: a run whose every graph came from the cache started
  warm). The first steps, which compile, are never timed (bench/train.py), nor is a later step the compiler ran
  in (a new shape: packed rows of another length, another number of documents): summary.json
  `compile.recompiled_steps` names those, `recompiled_s` is what they spent compiling.
- Cache: inductor keeps compiled kernels in `$TORCHINDUCTOR_CACHE_DIR`; unless the user set one, this environment's
  own directory beside its op cache, one per instruction set (bench/ops.py isa_key), so the second run of a job
  starts warm and two environments do not share kernels built for another torch.
"""
from __future__ import annotations

import os
import sys

from bench.config import BenchError


def cache_dir() -> str:
    from bench.ops import isa_key
    return os.path.join(sys.prefix, "torchinductor", isa_key())


def use_own_cache() -> None:
    """Point inductor at this environment's cache (a TORCHINDUCTOR_CACHE_DIR the user set wins)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir()


def deepcompile_asked(ds: dict) -> bool:
    return bool((ds.get("compile") or {}).get("deepcompile"))


def check(cfg, ds: dict, device_type: str, refuses: str | None) -> None:
    """One line for a compile the run cannot do; refuses: the strategy's reason it cannot be compiled here, or
    None (Strategy.compile_problem)."""
    on = cfg.compile.enable == "on"
    if deepcompile_asked(ds):
        if not on:
            raise BenchError(f"{cfg.parallelism.ds_config} asks for DeepCompile (compile.deepcompile), which runs "
                             "through engine.compile(): add --compile on")
        if device_type != "cuda":
            raise BenchError("DeepCompile needs CUDA: deepspeed/compile/util.py is_deepcompile_supported() is false "
                             "off CUDA and its op (op_builder/dc.py) builds against cuda.h and NCCL; drop "
                             "compile.deepcompile from the ds_config to compile with torch.compile alone")
    if not on and cfg.compile.backend != "auto":
        raise BenchError(f"--compile_backend {cfg.compile.backend} picks what compiles the model: add --compile on")
    if on and refuses:
        raise BenchError(f"--compile on with --strategy {cfg.parallelism.strategy}: {refuses}; run it with "
                         "--compile off")


def resolve_ds(ds: dict, cfg, strategy) -> dict:
    """The ds_config with what compiling under this strategy needs (Strategy.compile_ds), when --compile on."""
    return strategy.compile_ds(ds) if cfg.compile.enable == "on" else ds


def compile_engine(ds_engine, backend: str) -> None:
    """DeepSpeed's compile of its module (see the module's docstring); backend "auto": the accelerator's."""
    if backend == "auto":
        ds_engine.compile()
    else:
        ds_engine.compile(backend=backend)


def seconds() -> float:
    """Dynamo's compile time in this process so far (frames and backward graphs), 0 before anything compiled."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return dynamo.calculate_time_spent()["total_wall_time"] if dynamo is not None else 0.0


def counted() -> dict:
    """This rank's compile counters so far (dynamo's and inductor's, see the module's docstring)."""
    from torch._dynamo.utils import counters
    breaks = counters["graph_break"]
    return {"compile_s": seconds(), "graphs": counters["stats"]["unique_graphs"],
            "frames_compiled": counters["frames"]["ok"], "graph_breaks": sum(breaks.values()),
            # dynamo's reasons run to a page each (hints, links): the title and the explanation say what broke
            "break_reasons": [" ".join(reason.split("\n")[:2])[:300] for reason, _ in breaks.most_common(5)],
            "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "cache_misses": counters["inductor"]["fxgraph_cache_miss"]}


def summary(enabled: bool, backend: str, ds: dict, per_rank: list[dict], res) -> dict:
    """summary.json `compile`: the slowest rank's compile time and counts, every rank's, the compile time the
    steps held (metrics.jsonl compile_s: the slowest rank's per step), and the steps after warm-up that compiled
    (bench/train.py leaves them out of the timing) with their compile time."""
    if not enabled:
        return {"enabled": False}
    from deepspeed.accelerator import get_accelerator
    hits, misses = sum(r["cache_hits"] for r in per_rank), sum(r["cache_misses"] for r in per_rank)
    if backend == "auto":
        backend = str(get_accelerator().get_compile_backend())
    return {"enabled": True, "backend": backend,
            "deepcompile": deepcompile_asked(ds), "compile_s": max(r["compile_s"] for r in per_rank),
            "steps_compile_s": sum(r.get("compile_s", 0.0) for r in res.records),
            "recompiled_steps": res.recompiled_steps,
            "recompiled_s": sum(r.get("compile_s", 0.0) for r in res.records if r["step"] in res.recompiled_steps),
            "graphs": max(r["graphs"] for r in per_rank), "graph_breaks": max(r["graph_breaks"] for r in per_rank),
            "break_reasons": per_rank[0]["break_reasons"],
            "cache": {"dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "hits": hits, "misses": misses,
                      "warm": misses == 0 and hits > 0},
            "per_rank": per_rank}
