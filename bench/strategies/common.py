"""Pieces several strategies share: LoRA wrapping, the parameter summary and the model-parallel sharding record."""
from __future__ import annotations

from bench.architecture import target_names
from bench.strategies.base import Strategy


def save_adapters(engine, out_dir: str, is_main: bool) -> bool:
    """A LoRA run's adapters as peft writes them (adapter_model.safetensors and adapter_config.json, whole
    tensors), so they load into peft on one process. ZeRO-3 gathers each adapter's partitions first, FSDP2 each
    DTensor's shards (collectives: every rank calls this), tensor parallelism each split adapter's shards
    (bench/strategies/tp_lora.py).
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
        state = {n: whole(p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in adapters.items()}
        if is_main:
            model.save_pretrained(out_dir, state_dict=state)
    return True


def apply_lora(model, cfg):
    """peft LoRA on the named modules; everything else frozen. Dropout 0 keeps runs bit-comparable; the adapters
    are drawn per name (bench/loading.py), the same whatever device or strategy holds them."""
    from peft import LoraConfig, get_peft_model
    from bench.loading import init_adapters
    lora = LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=0.0,
                      target_modules=target_names(cfg), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    init_adapters(model, cfg.training.seed)
    return model


def param_counts(model) -> dict:
    """Logical parameter counts (a ZeRO-3 partitioned parameter counts at its full size) and what this rank
    holds locally (its ZeRO-3 partition, its TP shard, its FSDP2 shard: a DTensor's local part)."""
    total = trainable = local = local_trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        held = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else (
            p.to_local().numel() if hasattr(p, "to_local") else p.numel())
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
        experts = experts_per_rank(engine.module)
        if experts is not None:  # AutoEP replaced the MoE blocks
            sections["experts_per_rank"] = experts
        return sections

    def describe(self, sections: dict) -> str | None:
        return format_sharding(sections["sharding"])

    def params_per_rank(self, plan) -> list[int]:
        """The whole model minus what this layout's dimensions split off each rank (params_not_held); ZeRO's
        share where they split nothing (sequence parallelism alone)."""
        not_held = self.params_not_held(plan)
        if not not_held:
            return super().params_per_rank(plan)
        return [plan.total_params - not_held] * plan.layout.world_size

    def params_not_held(self, plan) -> int:
        """Elements of the model a rank does not hold because this strategy's dimensions split them."""
        return 0


def experts_per_rank(module) -> int | None:
    """Experts each rank holds after AutoEP replaced the MoE blocks (E / ep)."""
    counts = {m.num_local_experts for m in module.modules() if type(m).__name__ == "AutoEPMoELayer"}
    return counts.pop() if len(counts) == 1 else None
