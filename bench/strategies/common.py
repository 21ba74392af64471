"""Pieces several strategies share: LoRA wrapping, the parameter summary and the model-parallel sharding record."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from bench.config import BenchError
from bench.strategies.base import Strategy

# ds_config sections that turn on a model-parallel dimension, and the strategy that owns each.
PARALLEL_SECTIONS = {"tensor_parallel": "tp", "expert_parallel": "ep", "pipeline": "pp",
                     "sequence_parallel_size": "sp"}


def reject_foreign_sections(strategy: str, ds: dict, allowed: tuple = ()) -> None:
    for section, owner in PARALLEL_SECTIONS.items():
        if section in ds and section not in allowed:
            raise BenchError(f"--strategy {strategy} got a ds_config with a '{section}' section; "
                             f"that layout belongs to a {owner} strategy: remove the section or change --strategy")


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


_SHAPE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "tie_word_embeddings",
          "attention_bias", "mlp_bias")
_seen: dict = {}  # (id, shape numbers) -> the config's JSON: serializing a config is slower than planning with it


def architecture(model_config) -> Architecture:
    key = (id(model_config), *(getattr(model_config, k, None) for k in _SHAPE))
    if key not in _seen:
        if len(_seen) > 64:
            _seen.clear()
        _seen[key] = model_config.to_json_string()
    return _architecture(_seen[key])


@functools.lru_cache(maxsize=8)
def _architecture(config_json: str) -> Architecture:
    import json
    from transformers import AutoConfig
    d = json.loads(config_json)
    model = meta_model(AutoConfig.for_model(d.pop("model_type"), **d))
    params = tuple((n, p.numel()) for n, p in model.named_parameters())
    modules = tuple((n, n.rsplit(".", 1)[-1], _in_out(m)) for n, m in model.named_modules())
    return Architecture(params, modules, type(model).__name__)


def _target_names(cfg) -> list[str]:
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


def lora_adapter_params(cfg, model_config) -> int:
    """The --lora_targets names checked against the architecture; -> the adapter parameters peft will add,
    r x (in + out) per wrapped linear layer (counted on the meta device, before any weight exists)."""
    targets = _target_names(cfg)
    arch = architecture(model_config)
    present = {leaf for _, leaf, _ in arch.modules}
    missing = [t for t in targets if t not in present]
    if not targets or missing:
        raise BenchError(f"--lora_targets {cfg.lora_targets!r}: no module named {missing or targets} in {arch.kind}")
    unsupported = sorted({leaf for _, leaf, io in arch.modules if leaf in targets and io is None})
    if unsupported:
        raise BenchError(f"--lora_targets {cfg.lora_targets!r}: {unsupported} are neither linear nor embedding "
                         f"layers in {arch.kind}; LoRA wraps those only")
    return sum(n for _, n in lora_sizes_by_name(cfg, model_config))


def _in_out(module) -> tuple[int, int] | None:
    """(in, out) sizes of the layer a LoRA adapter (A: r x in, B: out x r) wraps."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if hasattr(module, "num_embeddings"):
        return module.num_embeddings, module.embedding_dim
    return None


def lora_sizes_by_name(cfg, model_config) -> list[tuple[str, int]]:
    """(wrapped module's name + ".lora_A"/".lora_B", numel) of every LoRA tensor peft adds, in order."""
    targets, r, sizes = _target_names(cfg), cfg.lora_r, []
    for name, leaf, (n_in, n_out) in ((n, leaf, io) for n, leaf, io in architecture(model_config).modules
                                      if leaf in targets):
        sizes += [(f"{name}.lora_A", r * n_in), (f"{name}.lora_B", n_out * r)]
    return sizes


def parameter_sizes(plan) -> list[int]:
    """numel of every parameter the model will have, LoRA's A and B included, from the meta device."""
    sizes = [n for _, n in architecture(plan.model_config).params]
    return sizes + ([n for _, n in lora_sizes_by_name(plan.cfg, plan.model_config)] if plan.peft == "lora" else [])


def save_adapters(engine, out_dir: str, is_main: bool) -> bool:
    """A LoRA run's adapters as peft writes them (adapter_model.safetensors and adapter_config.json, whole
    tensors), so they load into peft on one process. ZeRO-3 gathers each adapter's partitions first (a collective:
    every rank calls this), tensor parallelism each split adapter's shards (bench/strategies/tp_lora.py).
    -> whether they were written (False: not a peft model, e.g. pipeline stages)."""
    import contextlib
    from bench.strategies.tp_lora import whole
    model = engine.module
    if not hasattr(model, "peft_config"):
        return False
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in adapters.values()):
        import deepspeed
        gather = deepspeed.zero.GatheredParameters(list(adapters.values()))
    with gather:
        state = {n: whole(p) for n, p in adapters.items()}
        if is_main:
            model.save_pretrained(out_dir, state_dict=state)
    return True


def apply_lora(model, cfg):
    """peft LoRA on the named modules; everything else frozen. Dropout 0 keeps runs bit-comparable; the adapters
    are drawn per name (bench/loading.py), the same whatever device or strategy holds them."""
    from peft import LoraConfig, get_peft_model
    from bench.loading import init_adapters
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=_target_names(cfg),
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    init_adapters(model, cfg.seed)
    return model


def param_counts(model) -> dict:
    """Logical parameter counts (a ZeRO-3 partitioned parameter counts at its full size) and what this rank
    holds locally (its ZeRO-3 partition, its TP shard)."""
    total = trainable = local = local_trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        held = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        total += n
        local += held
        if p.requires_grad:
            trainable += n
            local_trainable += held
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable, "local": local,
            "local_trainable": local_trainable}


def param_shapes(module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def sharding_report(before: dict[str, tuple], module) -> list[dict]:
    """What deepspeed.initialize did to the parameters, one row per parameter pattern (layer index -> *):
    full and local shape, and the split dimension, or the parameters a replaced module brought in."""
    import re
    after = param_shapes(module)
    rows = {}
    for name in list(before) + [n for n in after if n not in before]:
        full, local = before.get(name), after.get(name)
        if full == local:
            continue  # replicated
        key = re.sub(r"\.\d+\.", ".*.", name)
        if full is not None and local is not None:
            dims = [i for i, (a, b) in enumerate(zip(full, local)) if a != b]
            row = {"param": key, "full": list(full), "local": list(local), "split_dim": dims[0] if dims else None}
        elif local is None:
            row = {"param": key, "full": list(full), "local": None, "note": "replaced"}
        else:
            row = {"param": key, "full": None, "local": list(local), "note": "added by replacement"}
        row["count"] = rows[key]["count"] + 1 if key in rows else 1
        rows[key] = row
    return list(rows.values())


def format_sharding(rows: list[dict]) -> str:
    lines = ["sharding applied (per rank)", "-" * 60]
    for r in rows:
        if "split_dim" in r:
            lines.append(f"{r['param']}  {r['full']} -> {r['local']} (split dim {r['split_dim']}) x{r['count']}")
        elif r["local"] is None:
            lines.append(f"{r['param']}  {r['full']} replaced x{r['count']}")
        else:
            lines.append(f"{r['param']}  new {r['local']} x{r['count']}")
    return "\n".join(lines if rows else lines + ["(nothing: every parameter is replicated)"])


class ModelParallel(Strategy):
    """Strategies whose deepspeed.initialize shards or replaces layers (AutoTP, AutoEP): they record what each
    rank really holds."""

    def after_initialize(self, plan, engine, shapes_before: dict) -> dict:
        sections = {"sharding": sharding_report(shapes_before, engine.module)}
        if plan.layout.ep > 1:
            sections["experts_per_rank"] = experts_per_rank(engine.module)
        return sections

    def describe(self, sections: dict) -> str | None:
        return format_sharding(sections["sharding"])

    def params_per_rank(self, plan) -> list[int]:
        """The whole model minus what tensor parallelism splits (weights the ds_config's TP shards and LoRA's
        adapters on them: /tp) and what expert parallelism distributes (experts: E/ep per rank)."""
        from bench.models import count_params_from_config
        from bench.strategies.autotp import tp_params_not_held
        c, lay = count_params_from_config(plan.model_config), plan.layout
        if lay.tp == 1 and lay.ep == 1:  # nothing split this way (sequence parallelism alone): ZeRO's share
            return super().params_per_rank(plan)
        held = plan.total_params
        if lay.tp > 1:
            held -= tp_params_not_held(plan)
        if lay.ep > 1:
            experts = c["layers"] * c["layer"]["experts"] * c["layer"]["mlp"]
            held -= experts - experts // lay.ep
        return [held] * lay.world_size


def experts_per_rank(module) -> int | None:
    """Experts each rank holds after AutoEP replaced the MoE blocks (E / ep)."""
    counts = {m.num_local_experts for m in module.modules() if type(m).__name__ == "AutoEPMoELayer"}
    return counts.pop() if len(counts) == 1 else None
