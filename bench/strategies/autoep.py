"""DeepSpeed AutoEP expert parallelism for Mixtral, alone (ep) and with AutoTP (tp_ep).

AutoEP replaces each MixtralSparseMoeBlock with an AutoEPMoELayer holding E/ep experts per rank and exchanges
tokens all-to-all. Expert-parallel ranks see different data (they are data-parallel for everything but the
experts), so the data-parallel degree of an EP run is dp x ep.
"""
from __future__ import annotations

from bench.config import BenchError
from bench.models import is_moe
from bench.strategies import autotp
from bench.strategies.common import reject_foreign_sections


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
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise BenchError(f"AutoEP here runs with ZeRO stage 0-2, got stage {stage}")
    if cfg.peft == "lora":
        raise BenchError("--peft lora with expert parallelism is refused: the model-parallel track is a full "
                         "fine-tune; use --peft none")


def check(cfg, ds: dict, layout, model_config) -> None:
    reject_foreign_sections("ep", ds, allowed=("expert_parallel",))
    check_ep(cfg, ds, layout, model_config, "ep")


def check_tp_ep(cfg, ds: dict, layout, model_config) -> None:
    reject_foreign_sections("tp_ep", ds, allowed=("expert_parallel", "tensor_parallel"))
    autotp.check_tp(cfg, ds, layout, model_config, "tp_ep")
    check_ep(cfg, ds, layout, model_config, "tp_ep")


def prepare(model, cfg, ds: dict):
    return model  # deepspeed.initialize swaps in the expert-parallel MoE layers from the ds_config


def experts_per_rank(module) -> int | None:
    """Experts each rank holds after AutoEP replaced the MoE blocks (E / ep)."""
    counts = {m.num_local_experts for m in module.modules() if type(m).__name__ == "AutoEPMoELayer"}
    return counts.pop() if len(counts) == 1 else None
