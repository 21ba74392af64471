"""DeepSpeed AutoTP tensor parallelism (full fine-tune): the ds_config's tensor_parallel.autotp_size splits
each attention and MLP weight across a group of consecutive ranks; deepspeed.initialize does the sharding.

LLaMA is sharded automatically (q/k/v/gate/up by column, o/down by row). Mixtral's Hugging Face tp_plan uses
styles AutoTP rejects (moe_tp_experts, packed_colwise), so for MoE models this module supplies an explicit
partition_config that shards attention only, unless the ds_config brings its own (which must match something).
"""
from __future__ import annotations

import copy
import re

from bench.config import BenchError, zero_stage
from bench.strategies.common import ModelParallel, architecture, reject_foreign_sections

MOE_ATTENTION_ONLY = {
    "use_default_specs": False,
    "layer_specs": [
        {"patterns": [r".*\.o_proj\.weight$"], "partition_type": "row"},
        {"patterns": [r".*\.[qkv]_proj\.weight$"], "partition_type": "column"},
    ],
}


def check_tp(cfg, ds: dict, layout, model_config, strategy: str) -> None:
    tp = layout.tp
    if tp <= 1:
        raise BenchError(f"--strategy {strategy} needs \"tensor_parallel\": {{\"autotp_size\": N>1}} in "
                         f"{cfg.ds_config} (see ds_configs/tp2.json)")
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % tp or kv % tp:
        raise BenchError(f"TP {tp} must divide the attention heads ({heads}) and key/value heads ({kv}) of "
                         f"{cfg.model}; choose a TP size among the common divisors")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2):
        raise BenchError(f"AutoTP training here runs with ZeRO stage 0-2, got stage {stage}; "
                         "ZeRO-3 with AutoTP is not exercised by this harness")
    if cfg.peft == "lora":
        raise BenchError("--peft lora with tensor parallelism is refused: AutoTP replaces the nn.Linear layers "
                         "LoRA wraps, so the adapters would not be sharded consistently; use --peft none "
                         "(the model-parallel track is a full fine-tune)")
    partition = (ds.get("tensor_parallel") or {}).get("partition_config")
    if partition is not None:
        check_partition_matches(partition, model_config, cfg.ds_config)


def check_partition_matches(partition: dict, model_config, source: str) -> None:
    """A partition_config whose patterns match no parameter would run unsharded, silently: refuse it."""
    names = [n for n, _ in architecture(model_config).params]
    for spec in partition.get("layer_specs", []):
        for pattern in spec.get("patterns", []):
            if not any(re.match(pattern, n) for n in names):
                raise BenchError(f"{source}: tensor_parallel.partition_config pattern {pattern!r} matches no "
                                 f"parameter of the model (patterns match parameter names such as "
                                 f"{names[1]!r}; end them in \\.weight$), so nothing would be sharded")


def with_moe_partition(ds: dict, model_config) -> dict:
    """The resolved ds_config for an MoE model: attention-only sharding unless one is given."""
    from bench.models import is_moe
    if not is_moe(model_config) or "partition_config" in ds.get("tensor_parallel", {}):
        return ds
    ds = copy.deepcopy(ds)
    ds["tensor_parallel"]["partition_config"] = copy.deepcopy(MOE_ATTENTION_ONLY)
    return ds


AUTO_POLICY = (r".*\.(q|k|v|o|gate|up|down)_proj\.weight$", r"^lm_head\.weight$")  # AutoTP's LLaMA policy


def tp_sharded_names(plan) -> set[str]:
    """Parameters AutoTP splits: for LLaMA its automatic policy (q/k/v/gate/up by column, o/down by row, and the
    LM head by column); with a partition_config (Mixtral's attention-only preset), what its patterns match."""
    partition = (plan.ds.get("tensor_parallel") or {}).get("partition_config")
    patterns = AUTO_POLICY if partition is None else \
        [p for spec in partition.get("layer_specs", []) for p in spec.get("patterns", [])]
    return {n for n, _ in architecture(plan.model_config).params if any(re.match(pattern, n) for pattern in patterns)}


def tp_sharded_params(plan) -> int:
    """The number of parameters tp_sharded_names holds."""
    sizes = dict(architecture(plan.model_config).params)
    return sum(sizes[n] for n in tp_sharded_names(plan))


class AutoTP(ModelParallel):
    """deepspeed.initialize shards the model from the ds_config (prepare: nothing)."""
    name, default_peft = "tp", "none"

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        reject_foreign_sections("tp", ds, allowed=("tensor_parallel",))
        check_tp(cfg, ds, layout, model_config, "tp")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        return with_moe_partition(ds, model_config)
