"""DeepSpeed AutoEP expert parallelism for Mixtral, alone (ep) and with AutoTP (tp_ep).

AutoEP replaces each MixtralSparseMoeBlock with an AutoEPMoELayer holding E/ep experts per rank and exchanges
tokens all-to-all. Expert-parallel ranks see different data (they are data-parallel for everything but the
experts), so the data-parallel degree of an EP run is dp x ep.
"""
from __future__ import annotations

import copy

from bench.architecture import target_names
from bench.config import BenchError
from bench.ds_config import zero_stage
from bench.models import count_params_from_config, is_moe
from bench.strategies import autotp
from bench.layout import Dimension, register
from bench.strategies.common import ModelParallel


# Modules outside the MoE blocks AutoEP replaces: adapters there are ordinary data-parallel parameters.
NON_EXPERT_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj"}


def with_peft_names(ds: dict) -> dict:
    """AutoEP finds the MoE blocks by full module name; peft's wrapper prefixes every name with
    "base_model.model.", so the Mixtral preset's pattern gets that prefix as an option (a pattern the ds_config
    sets itself is kept)."""
    section = ds.get("expert_parallel") or {}
    if not section or "moe_layer_pattern" in section or section.get("preset_model", "mixtral") != "mixtral":
        return ds
    ds = copy.deepcopy(ds)
    ds["expert_parallel"]["moe_layer_pattern"] = r"(?:base_model\.model\.)?model\.layers\.\d+\.mlp"
    return ds


def allow_frozen_experts() -> None:
    """LoRA on the attention leaves every expert frozen, so no optimizer group holds an expert parameter, and
    DeepSpeed's ZeRO-1/2 asserts that a model with MoE layers has one. With no expert to update there is no
    expert gradient to reduce over the expert-data-parallel groups: skip only that assertion (everything else in
    its MoE set-up still runs). Patched on the class, once per process (a rank builds one engine)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    original = DeepSpeedZeroOptimizer._configure_moe_settings
    if getattr(original, "allows_frozen_experts", False):
        return

    def configure(self):
        if any(self.is_moe_group(group) for group in self.optimizer.param_groups):
            return original(self)
        self.is_moe_param_group = [False] * len(self.optimizer.param_groups)
    configure.allows_frozen_experts = True
    DeepSpeedZeroOptimizer._configure_moe_settings = configure


def check_ep(cfg, ds: dict, layout, model_config, strategy: str) -> None:
    section = ds.get("expert_parallel") or {}
    ep = layout.ep
    if ep <= 1:
        raise BenchError(f"--strategy {strategy} needs \"expert_parallel\": {{\"enabled\": true, "
                         f"\"autoep_size\": N>1, \"preset_model\": \"mixtral\"}} in {cfg.parallelism.ds_config} "
                         "(see ds_configs/ep2.json)")
    if not is_moe(model_config):
        raise BenchError(f"expert parallelism needs a mixture-of-experts model; {cfg.model.name} is dense "
                         "(use --model mixtral-8x7b or tiny-mixtral)")
    experts = model_config.num_local_experts
    if experts % ep:
        raise BenchError(f"EP {ep} must divide the number of experts ({experts}) of {cfg.model.name}")
    if section.get("preset_model") not in (None, "mixtral"):
        raise BenchError(f"expert_parallel.preset_model {section['preset_model']!r}: this harness runs the "
                         "'mixtral' preset")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2):
        raise BenchError(f"AutoEP here runs with ZeRO stage 0-2, got stage {stage}")
    if cfg.model.peft == "lora":
        experts = sorted(set(target_names(cfg)) - NON_EXPERT_TARGETS)
        if experts:
            raise BenchError(f"--lora_targets {experts} under expert parallelism: AutoEP replaces the experts with "
                             "its own layers, which LoRA cannot wrap; target the attention projections "
                             f"({', '.join(sorted(NON_EXPERT_TARGETS))})")


def experts_not_held(plan) -> int:
    """Expert elements a rank does not hold: each keeps E / ep of every layer's experts."""
    c = count_params_from_config(plan.model_config)
    experts = c["layers"] * c["layer"]["experts"] * c["layer"]["mlp"]
    return experts - experts // plan.layout.ep


def comm_bytes(plan, rank: int, w: int) -> dict:
    """What AutoEP's token exchange moves per step on a rank (bench/estimate.py sums the dimensions): every
    token's top-k copies out to their experts and back, forward and backward, routing assumed balanced; under TP
    the cross term: the MoE's tokens split across the TP group, gathered and reduced back."""
    c, lay = plan.model_config, plan.layout
    (micro, seq), accum = plan.micro_shape, plan.batch.grad_accum
    bsh, L = micro * seq * c.hidden_size, c.num_hidden_layers
    tokens = micro * seq // lay.sequence_split  # this rank's
    out = {"all_to_all": accum * L * 4 * tokens * c.num_experts_per_tok * c.hidden_size * w // lay.tp}
    if lay.tp > 1:
        out["all_gather"] = accum * L * 2 * bsh // lay.tp * w
        # backward: the gathered outputs' reduction (2 x bsh) and the input gradient's average (1 x bsh), in
        # fp32 even in bf16 (measured: tests/integration/test_bf16.py); with the experts trained, one more
        # bsh-sized reduction in the training dtype, measured (the data-dependent part: ~8 %)
        out["all_reduce"] = accum * L * (3 * bsh * 4 + (0 if plan.peft == "lora" else bsh * w))
    return out


def comm_calls(plan, rank: int) -> dict:
    """The calls comm_bytes counts (measured: tests/support assert_plan_matches): per layer and micro-batch, the
    tokens out to their experts and back, forward and backward, and the forward's exchange of token counts; under
    TP the cross term's two gathers and its reductions (two in fp32, one more with the experts trained)."""
    layers = plan.batch.grad_accum * plan.model_config.num_hidden_layers
    out = {"all_to_all": 5 * layers}
    if plan.layout.tp > 1:
        out.update(all_gather=2 * layers, all_reduce=(2 if plan.peft == "lora" else 3) * layers)
    return out


def degree(ds: dict) -> int:
    section = ds.get("expert_parallel") or {}
    return section.get("autoep_size", 1) if section.get("enabled", False) else 1  # DeepSpeed's default: off


def load_transient(plan, w: int) -> int:
    """One layer's local experts three times over while loading: the rows read, ep_repack.py's slices of them and
    their contiguous copies (bench/loading.py)."""
    layer = count_params_from_config(plan.model_config)["layer"]
    return 3 * layer["experts"] // plan.layout.ep * layer["mlp"] * w


def local_numel(plan):
    """(name, numel) -> what a rank holds of it: E/ep of every expert parameter."""
    ep = plan.layout.ep
    return lambda name, n: n // ep if ".experts." in name else n


EP = register(Dimension(
    "ep", "expert_parallel", "expert_parallel.autoep_size", degree=degree, comm_bytes=comm_bytes,
    comm_calls=comm_calls, splits_weights=True,
    local_numel=local_numel, load_transient=load_transient,
    # the ranks holding the same experts: every replica of them, TP (and SP) ranks included
    expert_group=lambda lay, rank: (lay.world_size // lay.ep, lay.coords(rank)["ep"]),
    expert_width_split=lambda lay: lay.tp,  # AutoEP under TP splits the experts' intermediate width
    expert_tokens=lambda lay: lay.ep,  # an expert sees its share of the whole EP group's tokens
    span=lambda lay: lay.ep,  # groups of consecutive ranks
    gather_group=lambda lay: lay.tp,  # its one all-gather is the TP cross term's
    streams=True,  # expert-data-parallel: its ranks are data-parallel for everything but the experts
    coord=lambda lay, rank: rank // lay.ep))  # place among the ranks holding the same experts (partners ep apart)


class AutoEP(ModelParallel):
    """deepspeed.initialize swaps in the expert-parallel MoE layers from the ds_config (prepare: nothing)."""
    name, default_peft, dimensions = "ep", "none", ("ep",)

    def params_not_held(self, plan) -> int:
        return experts_not_held(plan)

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        self.reject_foreign_sections(ds)
        check_ep(cfg, ds, layout, model_config, "ep")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        return with_peft_names(ds)

    def compile_ds(self, ds: dict) -> dict:
        """Compile what surrounds the experts (DeepSpeed's `compile.autoep_non_moe`: attention, norms, router; the
        routing, token exchange and expert GEMMs stay eager, runtime/engine.py DeepSpeedEngine.compile) unless the
        ds_config chooses: the experts' grouped GEMM (torch._grouped_mm) has no fp32 kernel for dynamo's fake
        tensors, so compiling through it fails in fp32 (measured, docs/results/compile_cpu.md)."""
        from bench.compiling import deepcompile_asked
        if not deepcompile_asked(ds) and "autoep_non_moe" not in (ds.get("compile") or {}):
            ds["compile"] = {**(ds.get("compile") or {}), "autoep_non_moe": True}
        return ds

    def prepare(self, model, plan):
        if plan.cfg.model.peft == "lora":
            allow_frozen_experts()
        return model


class AutoTPxEP(AutoEP, autotp.AutoTP):
    """AutoEP's preparation, AutoTP's initialization (LoRA following its split), both sets of checks."""
    name, default_peft, dimensions = "tp_ep", "none", ("tp", "ep")

    def params_not_held(self, plan) -> int:
        return autotp.tp_params_not_held(plan) + experts_not_held(plan)

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        self.reject_foreign_sections(ds)
        autotp.check_tp(cfg, ds, layout, model_config, "tp_ep")
        check_ep(cfg, ds, layout, model_config, "tp_ep")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        return with_peft_names(autotp.with_moe_partition(ds, model_config))

    def compile_ds(self, ds: dict) -> dict:
        return ds  # DeepSpeed's autoep_non_moe refuses AutoEP folded with AutoTP: the whole model compiles
