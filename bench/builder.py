"""A run's model, from its weights to the engine that trains it, in the order it happens: the model (weights or
a seeded init; on the meta device where a model-parallel layout fills only this rank's shard, bench/loading.py),
activation checkpointing, LoRA, the strategy's own preparation (pipeline stages), then the engine (bench/engines),
inside whose creation the model-parallel shards are placed."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from bench import faults, loading, models
from bench.attention import model_implementation
from bench.config import format_table
from bench.engines import Engine, engine_class
from bench.log import show
from bench.strategies.common import apply_lora, param_counts, param_shapes


@dataclass
class Built:
    engine: Engine
    params_before: dict   # bench/strategies/common.py param_counts, before LoRA
    params_after: dict    # and after it
    sections: dict        # summary.json sections known once the engine exists (optimizer, dtypes, sharding, ...)
    keep_alive: object    # ZeRO-3: transformers' HfDeepSpeedConfig, kept for the run as before (models.build_model)


def build(plan, device, peaks, phase, is_main: bool) -> Built:
    """peaks: bench/device.py MemoryPeaks (the model's placement is marked in it); phase(name) closes a start-up
    phase (model_build_s, ds_initialize_s)."""
    with loading.host_memory_returned():
        model, keep_alive, materializer, before, after = _model(plan, device)
        if is_main:
            show(param_table(before, after, plan.peft))
        phase("model_build_s")
        shapes = param_shapes(model)
        shards = loading.shards_only(materializer, placed=peaks.mark_model_placed) if materializer \
            else contextlib.nullcontext()
        with shards, plan.strategy.initializing(plan, model):
            # lazy: the engine reads it after AutoEP/AutoTP replaced layers (and LoRA re-wrapped AutoTP's)
            trained = engine_class(plan.strategy.engine).create(plan, model)
    phase("ds_initialize_s")
    sections = plan.strategy.after_initialize(plan, trained, shapes)
    text = plan.strategy.describe(sections) if sections else None
    if is_main and text:
        show(text)
    return Built(trained, before, after, {**trained.describe(), **sections}, keep_alive)


def _model(plan, device):
    """The model as the strategy wants it (weights, LoRA, stages) -> (model, what must stay alive until the engine
    exists, the shard materializer or None, parameter counts before and after LoRA). A model-parallel layout builds
    on the meta device and materializes each rank's shard inside the engine's creation (bench/loading.py)."""
    cfg = plan.cfg
    faults.slow_load()  # tests: a model load that takes a while
    zero3 = plan.ds if plan.zero_stage == 3 else None
    sharded = loading.shards_at_load(plan)
    model, keep_alive = models.build_model(cfg.model.name, cfg.model.init, plan.model_config, plan.dtype, device, zero3,
                                           cfg.training.seed,
                                           model_implementation(cfg.model.attn_implementation, cfg.model.attn_mask),
                                           sharded=sharded)
    if cfg.model.activation_checkpointing:
        # Per decoder layer, in the layer itself (transformers' GradientCheckpointingLayer), so pipeline stages,
        # which call the layers directly, recompute the same way. Non-reentrant: frozen inputs (LoRA) need no
        # enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = param_counts(model)
    if plan.peft == "lora":
        model = apply_lora(model, cfg)
    after = param_counts(model)
    materializer = None
    if sharded:
        weights = models.weights_of(cfg.model.name, cfg.model.init, plan.model_config, cfg.training.seed)
        materializer = loading.Materializer(model, weights, device)
        materializer.fill_adapters(model)
    with loading.stage_layers_only(materializer) if sharded else contextlib.nullcontext():
        model = plan.strategy.prepare(model, plan)
    return model, keep_alive, materializer, before, after


def param_table(before: dict, after: dict, peft: str) -> str:
    rows = [("trainable params", f"{before['trainable']:,}"), ("non-trainable params", f"{before['non_trainable']:,}"),
            ("total params", f"{before['total']:,}")]
    out = format_table(rows, "parameters" + (" before LoRA" if peft == "lora" else ""))
    if peft == "lora":
        rows = [("trainable params", f"{after['trainable']:,} ({after['trainable'] / after['total']:.3%})"),
                ("non-trainable params", f"{after['non_trainable']:,}"), ("total params", f"{after['total']:,}")]
        out += "\n" + format_table(rows, "parameters after LoRA")
    return out
