"""DeepSpeed AutoEP expert parallelism for Mixtral, alone (ep) and with AutoTP (tp_ep).

AutoEP replaces each MixtralSparseMoeBlock with an AutoEPMoELayer holding E/ep experts per rank and exchanges
tokens all-to-all. Expert-parallel ranks see different data (they are data-parallel for everything but the
experts), so the data-parallel degree of an EP run is dp x ep.
"""
from __future__ import annotations

from bench.config import BenchError, zero_stage
from bench.models import is_moe
from bench.strategies import autotp
from bench.strategies.common import ModelParallel, reject_foreign_sections


def check_ep(cfg, ds: dict, layout, model_config, strategy: str) -> None:
    section = ds.get("expert_parallel") or {}
    ep = layout.ep
    if ep <= 1:
        raise BenchError(f"--strategy {strategy} needs \"expert_parallel\": {{\"enabled\": true, "
                         f"\"autoep_size\": N>1, \"preset_model\": \"mixtral\"}} in {cfg.ds_config} "
                         "(see ds_configs/ep2.json)")
    if not is_moe(model_config):
        raise BenchError(f"expert parallelism needs a mixture-of-experts model; {cfg.model} is dense "
                         "(use --model mixtral-8x7b or tiny-mixtral)")
    experts = model_config.num_local_experts
    if experts % ep:
        raise BenchError(f"EP {ep} must divide the number of experts ({experts}) of {cfg.model}")
    if section.get("preset_model") not in (None, "mixtral"):
        raise BenchError(f"expert_parallel.preset_model {section['preset_model']!r}: this harness runs the "
                         "'mixtral' preset")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2):
        raise BenchError(f"AutoEP here runs with ZeRO stage 0-2, got stage {stage}")
    if cfg.peft == "lora":
        raise BenchError("--peft lora with expert parallelism is refused: the model-parallel track is a full "
                         "fine-tune; use --peft none")


class AutoEP(ModelParallel):
    """deepspeed.initialize swaps in the expert-parallel MoE layers from the ds_config (prepare: nothing)."""
    name, default_peft = "ep", "none"

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        reject_foreign_sections("ep", ds, allowed=("expert_parallel",))
        check_ep(cfg, ds, layout, model_config, "ep")


class AutoTPxEP(ModelParallel):
    name, default_peft = "tp_ep", "none"

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        reject_foreign_sections("tp_ep", ds, allowed=("expert_parallel", "tensor_parallel"))
        autotp.check_tp(cfg, ds, layout, model_config, "tp_ep")
        check_ep(cfg, ds, layout, model_config, "tp_ep")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        return autotp.with_moe_partition(ds, model_config)
