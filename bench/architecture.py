"""The model's architecture without its weights: every parameter's name and size, and the layers LoRA would wrap,
read from the model built on the meta device. The planner, the strategies and the session all count from here."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from bench.config import BenchError


def meta_model(model_config):
    """The architecture on the meta device: names and shapes without allocating a byte (a fresh model: callers
    may wrap or change it)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


@dataclass(frozen=True)
class Architecture:
    """What the planner reads from the meta model, built once per architecture (the planner asks per rank):
    every parameter's (name, numel) in module order, the input embedding's name, and every module's (name,
    leaf name, (in, out) of a linear or embedding layer, else None)."""
    params: tuple
    modules: tuple
    kind: str  # the model class, for messages
    rows: tuple  # each parameter's first dimension, in params' order (FSDP2 shards by it)


# What decides every parameter's name and size: the architecture is built once per distinct set of these.
_SHAPE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "tie_word_embeddings",
          "attention_bias", "mlp_bias")
_built: dict = {}


def architecture(model_config) -> Architecture:
    key = tuple(getattr(model_config, k, None) for k in _SHAPE)
    if key not in _built:
        model = meta_model(copy.deepcopy(model_config))  # building may set attributes on its config
        params = tuple((n, p.numel()) for n, p in model.named_parameters())
        modules = tuple((n, n.rsplit(".", 1)[-1], _in_out(m)) for n, m in model.named_modules())
        rows = tuple(p.shape[0] for p in model.parameters())
        _built[key] = Architecture(params, modules, type(model).__name__, rows)
    return _built[key]


def target_names(cfg) -> list[str]:
    """--lora_targets as names, blanks dropped: the one place it is parsed."""
    return [t.strip() for t in cfg.model.lora_targets.split(",") if t.strip()]


def lora_adapter_params(cfg, model_config) -> int:
    """The --lora_targets names checked against the architecture; -> the adapter parameters peft will add,
    r x (in + out) per wrapped linear layer (counted on the meta device, before any weight exists)."""
    targets = target_names(cfg)
    arch = architecture(model_config)
    present = {leaf for _, leaf, _ in arch.modules}
    missing = [t for t in targets if t not in present]
    if not targets or missing:
        raise BenchError(f"--lora_targets {cfg.model.lora_targets!r}: no module named {missing or targets} in "
                         f"{arch.kind}")
    unsupported = sorted({leaf for _, leaf, io in arch.modules if leaf in targets and io is None})
    if unsupported:
        raise BenchError(f"--lora_targets {cfg.model.lora_targets!r}: {unsupported} are neither linear nor embedding "
                         f"layers in {arch.kind}; LoRA wraps those only")
    return sum(n for _, n in lora_sizes_by_name(cfg, model_config))


def _in_out(module) -> tuple[int, int] | None:
    """(in, out) sizes of the layer a LoRA adapter (A: r x in, B: out x r) wraps."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if hasattr(module, "num_embeddings"):
        return module.num_embeddings, module.embedding_dim
    return None


def lora_tensors(cfg, model_config) -> list[tuple[str, int, int]]:
    """(wrapped module's name + ".lora_A"/".lora_B", numel, first dimension) of every LoRA tensor peft adds, in
    order: A is r x in, B is out x r."""
    targets, r, tensors = target_names(cfg), cfg.model.lora_r, []
    for name, leaf, (n_in, n_out) in ((n, leaf, io) for n, leaf, io in architecture(model_config).modules
                                      if leaf in targets):
        tensors += [(f"{name}.lora_A", r * n_in, r), (f"{name}.lora_B", n_out * r, n_out)]
    return tensors


def lora_sizes_by_name(cfg, model_config) -> list[tuple[str, int]]:
    """(name, numel) of every LoRA tensor peft adds, in order (lora_tensors)."""
    return [(name, n) for name, n, _ in lora_tensors(cfg, model_config)]


def parameter_sizes(plan) -> list[int]:
    """numel of every parameter the model will have, LoRA's A and B included, from the meta device."""
    sizes = [n for _, n in architecture(plan.model_config).params]
    return sizes + ([n for _, n in lora_sizes_by_name(plan.cfg, plan.model_config)] if plan.peft == "lora" else [])
