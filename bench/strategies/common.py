"""Pieces several strategies share: LoRA wrapping and the parameter summary."""
from __future__ import annotations

from bench.config import BenchError

# ds_config sections that turn on a model-parallel dimension, and the strategy that owns each.
PARALLEL_SECTIONS = {"tensor_parallel": "tp", "expert_parallel": "ep", "pipeline": "pp"}


def reject_foreign_sections(strategy: str, ds: dict, allowed: tuple = ()) -> None:
    for section, owner in PARALLEL_SECTIONS.items():
        if section in ds and section not in allowed:
            raise BenchError(f"--strategy {strategy} got a ds_config with a '{section}' section; "
                             f"that layout belongs to a {owner} strategy: remove the section or change --strategy")


def lora_targets(cfg, model_config) -> list[str]:
    """The --lora_targets names, checked against the architecture (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if not targets or missing:
        raise BenchError(f"--lora_targets {cfg.lora_targets!r}: no module named {missing or targets} in "
                         f"{type(model).__name__}")
    return targets


def apply_lora(model, cfg):
    """peft LoRA on the named modules; everything else frozen. Dropout 0 keeps runs bit-comparable."""
    from peft import LoraConfig, get_peft_model
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def param_counts(model) -> dict:
    """Logical parameter counts (a ZeRO-3 partitioned parameter counts at its full size) and what this rank
    holds locally (its ZeRO-3 partition, its TP shard)."""
    total = trainable = local = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable, "local": local}
