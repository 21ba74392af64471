"""DeepSpeed AutoTP tensor parallelism (full fine-tune): the ds_config's tensor_parallel.autotp_size splits
each attention and MLP weight across a group of consecutive ranks; deepspeed.initialize does the sharding.

LLaMA is sharded automatically (q/k/v/gate/up by column, o/down by row). Mixtral's Hugging Face tp_plan uses
styles AutoTP rejects (moe_tp_experts, packed_colwise), so for MoE models this module supplies an explicit
partition_config that shards attention only, unless the ds_config brings its own (which must match something).
"""
from __future__ import annotations

import contextlib
import copy
import re

from bench.config import BenchError
from bench.ds_config import zero_stage
from bench.architecture import architecture, lora_sizes_by_name, target_names
from bench.layout import Dimension, register
from bench.strategies.common import ModelParallel
from bench.strategies.tp_lora import adapters_follow_autotp

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
                         f"{cfg.parallelism.ds_config} (see ds_configs/tp2.json)")
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % tp or kv % tp:
        raise BenchError(f"TP {tp} must divide the attention heads ({heads}) and key/value heads ({kv}) of "
                         f"{cfg.model.name}; choose a TP size among the common divisors")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2):
        raise BenchError(f"AutoTP training here runs with ZeRO stage 0-2, got stage {stage}; "
                         "ZeRO-3 with AutoTP is not exercised by this harness")
    if cfg.model.peft == "lora":
        outside = sorted(set(target_names(cfg)) - TP_LORA_TARGETS)
        if outside:
            raise BenchError(f"--lora_targets {outside} under tensor parallelism: adapters follow AutoTP's split "
                             f"of the attention and MLP projections only ({', '.join(sorted(TP_LORA_TARGETS))})")
    partition = (ds.get("tensor_parallel") or {}).get("partition_config")
    if partition is not None:
        check_partition_matches(partition, model_config, cfg.parallelism.ds_config)


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


# Layers whose split (column or row) a LoRA adapter follows under TP (bench/strategies/tp_lora.py)
TP_LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

AUTO_POLICY = {r".*\.(o|down)_proj\.weight$": "row", r".*\.(q|k|v|gate|up)_proj\.weight$": "column",
               r"^lm_head\.weight$": "column"}  # AutoTP's LLaMA policy


def vocab_parallel(plan) -> bool:
    """Whether AutoTP splits the LM head along the vocabulary (its logits stay split, the loss reduces across the
    group): a tied model without a partition_config, whose Hugging Face plan asks for "embedding_rowwise"
    (runtime/engine.py, auto_vocab_parallel_lm_head); the one embedding/head tensor is then split once."""
    partition = (plan.ds.get("tensor_parallel") or {}).get("partition_config")
    return plan.layout.tp > 1 and partition is None and plan.model_config.tie_word_embeddings


def tp_splits(plan) -> dict[str, str]:
    """{parameter name: "row" | "column"} of what AutoTP splits: for LLaMA its automatic policy (q/k/v/gate/up by
    column, o/down by row, the LM head by column, a tied head with its embedding by vocabulary); with a partition_config (Mixtral's attention-only preset), what
    its patterns match."""
    partition = (plan.ds.get("tensor_parallel") or {}).get("partition_config")
    policy = AUTO_POLICY if partition is None else \
        {p: spec.get("partition_type", "column") for spec in partition.get("layer_specs", [])
         for p in spec.get("patterns", [])}
    if vocab_parallel(plan):
        policy = {**policy, r"^model\.embed_tokens\.weight$": "column"}
    splits = {}
    for name, _ in architecture(plan.model_config).params:
        kinds = [kind for pattern, kind in policy.items() if re.match(pattern, name)]
        if kinds:
            splits[name] = kinds[0]
    return splits


def tp_params_not_held(plan) -> int:
    """Elements of the model a rank does not hold because TP split them: the base weights AutoTP splits and, under
    LoRA, the split adapters."""
    tp, sizes = plan.layout.tp, dict(architecture(plan.model_config).params)
    base = sum(sizes[n] - sizes[n] // tp for n in tp_splits(plan))
    if plan.peft != "lora":
        return base
    return base + sum(n for _, n in lora_sizes_by_name(plan.cfg, plan.model_config)) - \
        sum(n for _, n in lora_local_sizes(plan))


def lora_local_sizes(plan) -> list[tuple[str, int]]:
    """(name, numel on a rank) of every LoRA tensor under TP (bench/strategies/tp_lora.py): B split on a
    column-parallel layer, A on a row-parallel one, the rest whole."""
    splits, tp = tp_splits(plan) if plan.layout.tp > 1 else {}, plan.layout.tp
    out = []
    for name, numel in lora_sizes_by_name(plan.cfg, plan.model_config):
        module, part = name.rsplit(".", 1)
        kind = splits.get(module + ".weight")
        split = (kind == "column" and part == "lora_B") or (kind == "row" and part == "lora_A")
        out.append((name, numel // tp if split else numel))
    return out


def comm_bytes(plan, rank: int, w: int) -> dict:
    """What AutoTP's collectives move per step on a rank (bench/estimate.py sums the dimensions): per micro-batch
    and decoder layer, each split linear's all-reduce (row-parallel: the output in forward; column-parallel: the
    input gradient in backward), the LM head's gather or the vocabulary-parallel loss's reductions, and LoRA's."""
    c, lay = plan.model_config, plan.layout
    (micro, seq), accum = plan.micro_shape, plan.batch.grad_accum
    bsh = micro * seq * c.hidden_size
    row, col, head = _tp_linears(plan)
    out = {"all_reduce": accum * (c.num_hidden_layers * (row + col) + head) * bsh * w}
    if plan.peft == "lora":
        out["all_reduce"] += accum * _tp_lora_all_reduce(plan, micro * seq, bsh * w, w)
    if head and vocab_parallel(plan):  # the split embedding's output summed; the loss's max, sum of
        # exponentials and target logit per predicted token (deepspeed/sequence/cross_entropy.py)
        out["all_reduce"] += accum * (bsh * w + 3 * micro * (seq - 1) * 4)
    elif head:
        out["all_gather"] = accum * micro * seq * -(-c.vocab_size // lay.tp) * w
    return out


def comm_calls(plan, rank: int) -> dict:
    """The calls comm_bytes counts (measured: tests/support assert_plan_matches): per micro-batch, one all-reduce
    per split linear of every decoder layer and the head's, one per LoRA adapter less the skipped ones, the
    vocabulary-parallel embedding's and loss's four, or the head's one gather."""
    row, col, head = _tp_linears(plan)
    reduce = plan.model_config.num_hidden_layers * (row + col) + head
    if plan.peft == "lora":
        adapters, skipped = _tp_lora_reductions(plan)
        reduce += adapters - skipped
    accum = plan.batch.grad_accum
    out = {"all_reduce": accum * (reduce + (4 if head and vocab_parallel(plan) else 0))}
    if head and not vocab_parallel(plan):
        out["all_gather"] = accum
    return out


def local_numel(plan):
    """(name, numel) -> what a rank holds of it: the parameters AutoTP splits, divided by its degree."""
    sharded, tp = tp_splits(plan), plan.layout.tp
    return lambda name, n: n // tp if name in sharded else n


def load_transient(plan, w: int) -> int:
    """The largest weight AutoTP splits, whole on the device before it is sliced (bench/loading.py)."""
    sizes = dict(architecture(plan.model_config).params)
    return max(sizes[n] for n in tp_splits(plan)) * w


TP = register(Dimension(
    "tp", "tensor_parallel", "tensor_parallel.autotp_size",
    degree=lambda ds: (ds.get("tensor_parallel") or {}).get("autotp_size", 1), comm_bytes=comm_bytes,
    comm_calls=comm_calls, span=lambda lay: lay.tp, gather_group=lambda lay: lay.tp, splits_weights=True,
    local_numel=local_numel, adapter_sizes=lora_local_sizes, load_transient=load_transient,
    vocab_split=lambda plan: plan.layout.tp if vocab_parallel(plan) else 1,
    # measured under AutoTP on rows without a mask (padded and packed alike): one more q-sized tensor per layer
    # than the same layer saves without TP (tests/integration/test_packing_parity.py, test_model_parallel.py); not
    # yet traced to the op that keeps it
    saves_extra_q=True,
    gemm_split=lambda lay: lay.tp,  # q, k, v, gate, up split by columns, o and down by rows: heads, MLP width
    order=10))  # groups of consecutive ranks, innermost (DeepSpeed's (data, tensor) mesh)


def _tp_linears(plan) -> tuple[int, int, bool]:
    """(row-parallel, column-parallel) linear layers AutoTP makes per decoder layer, and whether the LM head is
    column-parallel (gathered)."""
    partition = (plan.ds.get("tensor_parallel") or {}).get("partition_config")
    if partition is None:  # AutoTP's automatic policy for LLaMA
        return 2, 5, True
    row = col = 0
    names = [n for n, _ in architecture(plan.model_config).params if ".layers.0." in n]
    for spec in partition.get("layer_specs", []):
        hits = sum(1 for n in names if any(re.match(p, n) for p in spec.get("patterns", [])))
        if spec.get("partition_type") == "row":
            row += hits
        else:
            col += hits
    return row, col, False


def _tp_lora_all_reduce(plan, tokens: int, layer_bytes: int, w: int) -> int:
    """LoRA under TP, per micro-batch (bench/strategies/tp_lora.py): each adapter on a split layer reduces its
    r-wide middle (in the model's width: DeepSpeed casts the adapters too), and a column-parallel layer whose input
    needs no gradient skips its backward all-reduce (_tp_lora_reductions)."""
    adapters, skipped = _tp_lora_reductions(plan)
    return adapters * tokens * plan.cfg.model.lora_r * w - skipped * layer_bytes


def _tp_lora_reductions(plan) -> tuple[int, int]:
    """(adapters on split layers, column-parallel layers whose backward all-reduce is skipped): the first layer's
    q/k/v (the embeddings are frozen), and its gate/up too when no attention projection carries an adapter."""
    splits = tp_splits(plan)
    targets = set(target_names(plan.cfg))
    adapters = sum(1 for name in splits if name.rsplit(".", 2)[-2] in targets)
    first = {name.rsplit(".", 2)[-2] for name, kind in splits.items() if ".layers.0." in name and kind == "column"}
    skipped = first & {"q_proj", "k_proj", "v_proj"}
    if not targets & {"q_proj", "k_proj", "v_proj", "o_proj"}:
        skipped |= first & {"gate_proj", "up_proj"}
    return adapters, len(skipped)


class AutoTP(ModelParallel):
    """deepspeed.initialize shards the model from the ds_config (prepare: nothing)."""
    name, default_peft, dimensions = "tp", "none", ("tp",)

    def params_not_held(self, plan) -> int:
        return tp_params_not_held(plan)

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        self.reject_foreign_sections(ds)
        check_tp(cfg, ds, layout, model_config, "tp")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        return with_moe_partition(ds, model_config)

    def compile_problem(self, device_type: str) -> str | None:
        # measured here (torch 2.13, DeepSpeed 0.19.8, gloo; inductor and aot_eager alike); not tried on CUDA
        if device_type == "cpu":
            return ("step 1 never completes on the CPU: while dynamo traces AutoTP's all-reduce layers a rank waits "
                    "in a collective the others never join (docs/results/compile_cpu.md)")
        return None

    def initializing(self, plan, model):
        return adapters_follow_autotp(model) if plan.peft == "lora" else contextlib.nullcontext()
