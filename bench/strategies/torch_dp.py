"""PyTorch's own data parallelism, beside DeepSpeed's ZeRO on the same job: `--strategy ddp` (DistributedDataParallel,
ds_configs/ddp.json, beside dp_zero0.json) and `--strategy fsdp2` (fully_shard, ds_configs/fsdp2.json beside
dp_zero3.json, fsdp2_no_reshard.json beside dp_zero2.json). The config file is the same ds_config format with an
"engine" key naming the engine (bench/engines): batch sizes, optimizer, learning rate and clipping are read from
the same keys by every engine, so two configs of one job differ in the engine and nothing else. With or without
LoRA (peft wraps the model before the engine does); data parallelism only (no model-parallel section)."""
from __future__ import annotations

import re

from bench.architecture import architecture, lora_tensors
from bench.config import BenchError
from bench.ds_config import element_bytes
from bench.strategies.base import Strategy

FP32 = 4  # bytes: the trained parameters' master weights, their gradients and reductions (torch_base.py)
FSDP2_KEYS = ("reshard_after_forward", "cpu_offload")  # a ds_config's "fsdp2" section (bench/engines/fsdp2.py)
STEP_COUNTER = 4  # torch.optim.AdamW's per-parameter "step": a float32 scalar tensor (optim/adam.py)


class TorchDP(Strategy):
    default_peft = "lora"  # as ZeRO data parallelism's: the comparisons put them side by side

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        where = cfg.parallelism.ds_config
        if ds.get("engine") != self.engine:
            raise BenchError(f"--strategy {self.name} needs \"engine\": \"{self.engine}\" in {where} (see "
                             f"ds_configs/{self.name}.json)")
        self.reject_foreign_sections(ds)
        for key in ("zero_optimization", "scheduler", "fp16"):
            if key in ds:
                raise BenchError(f"{where}: the {self.engine} engine does not read '{key}' (DeepSpeed's); remove it "
                                 f"or use a DeepSpeed config")
        own = ds.get("fsdp2")
        if own is not None and self.engine != "fsdp2":
            raise BenchError(f"{where}: the {self.engine} engine does not read 'fsdp2'; remove it")
        unknown = sorted(set(own or {}) - set(FSDP2_KEYS))
        if unknown:
            raise BenchError(f"{where}: fsdp2 has no setting {', '.join(unknown)}; it takes {', '.join(FSDP2_KEYS)}")
        if cfg.compile.enable == "on":
            raise BenchError(f"--compile on compiles DeepSpeed's engine (engine.compile()); the {self.engine} "
                             "engine is not compiled yet: drop --compile")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        ds.pop("zero_optimization", None)  # never present (check); DeepSpeed's ZeRO section means nothing here
        return ds

    # The planner's terms (bench/estimate.py composes them; docs/planner.md "PyTorch's engines"). The engines keep
    # the trained parameters in fp32 (master weights, gradients, Adam's two states) and the frozen ones in the
    # run's dtype (bench/engines/torch_base.py keep_master_weights); forward and backward compute in the run's
    # dtype, w bytes an element.
    def whole_model_bytes(self, plan) -> int:
        """Every rank builds the whole model before the engine wraps or shards it, the trained part in fp32."""
        return sum(n * self._held_width(plan, trained) for n, _, trained in _tensors(plan))

    @staticmethod
    def _held_width(plan, trained: bool) -> int:
        return FP32 if trained else element_bytes(plan.ds)

    def reduction_window(self, plan, backward_s: float) -> float:
        return backward_s  # both reduce (and FSDP2 gathers) while backward runs; see the subclasses' comm


class DDP(TorchDP):
    name = engine = "ddp"

    def engine_states(self, plan, rank: int) -> dict:
        """The whole model; the gradients live in DDP's buckets (gradient_as_bucket_view: one copy)."""
        trained = [n for n, _, t in _tensors(plan) if t]
        return _states(self.whole_model_bytes(plan), sum(trained) * FP32,
                       sum(trained) * 2 * FP32 + len(trained) * STEP_COUNTER)

    def engine_comm(self, plan, rank: int) -> dict:
        """One all-reduce of every gradient bucket per step, in the boundary micro-batch's backward."""
        if plan.layout.world_size == 1:
            return {}
        return {"zero_backward": {"all_reduce": sum(n for n, _, t in _tensors(plan) if t) * FP32}}

    def reduction_window(self, plan, backward_s: float) -> float:
        return backward_s / plan.batch.grad_accum  # only the boundary micro-batch's backward reduces


class FSDP2(TorchDP):
    name = engine = "fsdp2"

    def engine_states(self, plan, rank: int) -> dict:
        """Each rank's dim-0 shard of every parameter (padded to ceil(rows / world) rows: the storage FSDP2 keeps,
        _fully_shard/_fsdp_param.py), the gradients reduce-scattered into the same shards; Adam's states are
        made like the unpadded local shard. Transient: the units gathered for compute in w (the one running and
        the one prefetched; without reshard_after_forward every unit from forward to backward) and one unit's
        unsharded gradients. With cpu_offload the shards, gradients and Adam's states are in host memory."""
        world, tensors = plan.layout.world_size, _tensors(plan)
        params = sum(_padded(n, rows, world) * self._held_width(plan, t) for n, rows, t in tensors)
        grads = sum(_padded(n, rows, world) for n, rows, t in tensors if t) * FP32
        trained = [_local(n, rows, world, rank) for n, rows, t in tensors if t]
        w, units = element_bytes(plan.ds), _units(plan)
        gathered = sum(units) if not _reshards(plan) else sum(sorted(units)[-2:])
        largest_trained = max(_units(plan, trained_only=True), default=0)
        transient = gathered * w + largest_trained * (w + (FP32 if w != FP32 else 0))
        optimizer = sum(trained) * 2 * FP32 + len(trained) * STEP_COUNTER
        host = params + grads + optimizer if (plan.ds.get("fsdp2") or {}).get("cpu_offload") else 0
        return _states(params, grads, optimizer, transient, host)

    def engine_comm(self, plan, rank: int) -> dict:
        """Per micro-batch every unit's all-gather in w (its input shard, as counted: accounting.py), twice when
        it reshards after forward (again for backward); per step one reduce-scatter of the trained gradients in
        fp32 (the boundary's backward; earlier micro-batches accumulate unsharded)."""
        if plan.layout.world_size == 1:
            return {}
        world, tensors = plan.layout.world_size, _tensors(plan)
        shards = sum(_padded(n, rows, world) for n, rows, _ in tensors)
        gathers = (2 if _reshards(plan) else 1) * plan.batch.grad_accum
        scattered = sum(_padded(n, rows, world) * world for n, rows, t in tensors if t)
        return {"zero_backward": {"all_gather": gathers * shards * element_bytes(plan.ds),
                                  "reduce_scatter": scattered * FP32}}

    def params_per_rank(self, plan) -> list[int]:
        world, tensors = plan.layout.world_size, _tensors(plan)
        return [sum(_local(n, rows, world, r) for n, rows, _ in tensors) for r in range(world)]


def _tensors(plan) -> list[tuple[int, int, bool]]:
    """(numel, first dimension, trained) of every parameter the run's model has, LoRA's adapters last."""
    return [(n, rows, trained) for _, n, rows, trained in _named(plan)]


def _named(plan) -> list[tuple[str, int, int, bool]]:
    """_tensors with each parameter's name."""
    arch = architecture(plan.model_config)
    lora = plan.peft == "lora"
    base = [(name, n, rows, not lora) for (name, n), rows in zip(arch.params, arch.rows)]
    return base + ([(name, n, rows, True) for name, n, rows in lora_tensors(plan.cfg, plan.model_config)]
                   if lora else [])


def _padded(numel: int, rows: int, world: int) -> int:
    """Elements of FSDP2's padded shard of a parameter: ceil(rows / world) of its rows."""
    return -(-rows // world) * (numel // rows)


def _local(numel: int, rows: int, world: int, rank: int) -> int:
    """Elements of this rank's unpadded shard (torch.chunk's: the last ranks may get fewer rows, or none)."""
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk)) * (numel // rows)


def _units(plan, trained_only: bool = False) -> list[int]:
    """Elements of each unit FSDP2 gathers at once: a decoder layer (fsdp2.py shards each), and the root (what
    is left: embedding, final norm, head)."""
    units: dict = {}
    for name, n, _, trained in _named(plan):
        if trained or not trained_only:
            m = re.search(r"\.layers\.(\d+)\.", name)
            key = int(m.group(1)) if m else "root"
            units[key] = units.get(key, 0) + n
    return list(units.values())


def _reshards(plan) -> bool:
    return bool((plan.ds.get("fsdp2") or {}).get("reshard_after_forward", True))


def _states(params: int, grads: int, optimizer: int, transient: int = 0, host: int = 0) -> dict:
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optimizer, "buffers_bytes": 0,
            "offloaded_bytes": host, "transient_bytes": transient, "step_transient_bytes": 0}

