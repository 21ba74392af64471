"""What a strategy is: everything that differs between parallelism strategies, behind one interface.

The plan resolves a run through `check` and `resolve_ds`; the session builds it through `prepare` and
`build_runner` and records it through `after_initialize` and `after_training`. Neither knows which strategy it
holds. The planner asks the strategy what it splits off each rank (`params_per_rank`; model-parallel ones answer
`params_not_held`, common.py). A model-parallel dimension's module declares it (bench/layout.py `Dimension`,
`register`): the ds_config section that turns it on, where its degree is read, where its ranks sit, the collectives
it adds to a step and the ranks they cross; the layout, the planner and the cost model read every dimension from
DIMENSIONS, and a layout's strategy is the one made of its dimensions (`dimensions`, `claims`). Adding a strategy or
a dimension is a module here, a ds_config, tests, and one line in the registry (__init__.py).
"""
from __future__ import annotations

import contextlib

from bench.architecture import parameter_sizes
from bench.config import BenchError
from bench.ds_config import element_bytes
from bench.layout import DIMENSIONS


class Strategy:
    name: str = ""
    default_peft: str = "none"     # what --peft auto means for this strategy
    dimensions: tuple = ()         # the model-parallel dimensions it is made of (DIMENSIONS' keys)
    mpu = None                     # the parallel-state object deepspeed.initialize gets, where one is needed
    engine = "deepspeed"           # what trains the model (bench/engines ENGINES); a ds_config's "engine" names it

    @classmethod
    def claims(cls, layout) -> bool:
        """Whether a layout made of this strategy's dimensions is this strategy (strategy_of; e.g. a pipeline with
        or without data parallelism)."""
        return True

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        """Refuse a ds_config, model or flag this strategy cannot run (raise BenchError with one line)."""
        raise NotImplementedError

    def reject_foreign_sections(self, ds: dict) -> None:
        """Refuse a ds_config section that turns on a dimension this strategy is not made of."""
        for d in DIMENSIONS.values():
            if d.section in ds and d.key not in self.dimensions:
                raise BenchError(f"--strategy {self.name} got a ds_config with a '{d.section}' section; that layout "
                                 f"belongs to a {d.key} strategy: remove the section or change --strategy")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        """The resolved ds_config with this strategy's presets filled in."""
        return ds

    def compile_ds(self, ds: dict) -> dict:
        """The resolved ds_config as --compile on needs it under this strategy (bench/compiling.py)."""
        return ds

    def compile_problem(self, device_type: str) -> str | None:
        """Why --compile on cannot run under this strategy on this device (bench/compiling.py), or None."""
        return None

    def prepare(self, model, plan):
        """The model deepspeed.initialize gets (LoRA-wrapped already if --peft lora): e.g. pipeline stages."""
        return model

    def initializing(self, plan, model):
        """A context around deepspeed.initialize, for what must happen inside it (LoRA following AutoTP)."""
        return contextlib.nullcontext()

    def build_runner(self, engine, device):
        """train_step / eval_loss over the engine (bench/engines)."""
        return EngineRunner(engine)

    def after_initialize(self, plan, engine, shapes_before: dict) -> dict:
        """Summary sections known once the engine exists (e.g. the sharding actually applied)."""
        return {}

    def after_training(self, plan, res, params_per_rank: list) -> dict:
        """Summary sections that need the training result (e.g. the measured pipeline bubble)."""
        return {}

    def describe(self, sections: dict) -> str | None:
        """Console text for the sections after_initialize returned, or None."""
        return None

    # The planner's terms for what the engine itself holds and moves (bench/estimate.py, bench/recommend.py): None
    # for DeepSpeed's, which estimate.py computes from the ZeRO stage; another engine's strategy answers for it.
    def engine_states(self, plan, rank: int) -> dict | None:
        """estimate.model_states' dict for this rank, or None."""
        return None

    def engine_comm(self, plan, rank: int) -> dict | None:
        """estimate.comm_by_source's data-parallel part ({source: {kind: bytes}}) for this rank, or None."""
        return None

    def whole_model_bytes(self, plan) -> int:
        """What a rank holds of the whole model before the engine shards or copies it (bench/estimate.py
        load_bytes): every parameter in the training dtype, as the model is built."""
        return plan.total_params * element_bytes(plan.ds)

    def reduction_window(self, plan, backward_s: float) -> float:
        """Seconds of backward the engine's data-parallel reductions (comm_by_source's "zero_backward") can hide
        behind; 0 when they do not overlap (bench/recommend.py). DeepSpeed overlaps them where overlap_comm is on
        (zero/config.py: the default only for stage 3), unless a dimension defers the reduction past the last
        backward (the pipeline's); ZeRO-1 reduces in the last micro-batch's backward only."""
        zero = plan.ds.get("zero_optimization") or {}
        overlap = zero.get("overlap_comm", plan.zero_stage == 3) and \
            not any(d.defers_reduction for d in plan.layout.declared())
        if not overlap:
            return 0.0
        return backward_s / plan.batch.grad_accum if plan.zero_stage == 1 else backward_s

    def params_per_rank(self, plan) -> list[int]:
        """Parameters each rank will hold once deepspeed.initialize has run (what summary.json's params.per_rank
        records), predicted from the architecture: every rank holds the whole model, or its ZeRO-3 partition of
        each parameter (ceil(n / world), DeepSpeed pads every parameter to a multiple of the world)."""
        world = plan.layout.world_size
        if plan.zero_stage == 3:
            return [sum(-(-n // world) for n in parameter_sizes(plan))] * world
        return [plan.total_params] * world


class EngineRunner:
    """Forward/backward/step through the engine seam (bench/engines/base.py): ZeRO, AutoTP, AutoEP."""

    busy_s = 0.0  # only pipeline stages measure their busy time
    loss_parts = 1  # ranks whose train losses add up to one micro-batch's (Ulysses: the sequence-parallel group)

    def __init__(self, engine):
        self.engine = engine
        self.accounting = {}  # what this rank holds and moves, counted in its first two steps (bench/accounting.py)

    def train_step(self, micro_batches: list[dict]):
        from bench.accounting import counted_step
        return counted_step(self.accounting, self.engine, lambda counter: self._step(micro_batches, counter),
                            getattr(self.engine, "comm_counter", None))

    def _step(self, micro_batches: list[dict], counter=None):
        loss_sum = 0.0
        for i, b in enumerate(micro_batches):
            with counter.forward(i) if counter else contextlib.nullcontext():
                out, pending = self.forward(b)
            if counter:
                counter.after_forward(out)
            loss = self.backward(out, pending)
            if counter and i == len(micro_batches) - 1:
                counter.at_boundary()
            self.engine.step()  # applies the update only at the accumulation boundary
            loss_sum = loss_sum + loss
        return loss_sum / len(micro_batches)

    def forward(self, batch: dict):
        """One micro-batch's forward, where its saved tensors are counted -> (the model's output, what backward
        needs besides it)."""
        return self.engine(**batch), None

    def backward(self, out, pending):
        """One micro-batch's backward -> its loss, detached."""
        self.engine.backward(out.loss)
        return out.loss.detach().float()

    def eval_loss(self, batch: dict) -> float:
        return float(self.engine(**batch).loss)
