"""What a layout will hold, move and compute per rank, predicted before launch from the architecture, the resolved
ds_config and the layout: the one place these formulas live (docs/planner.md documents each, with its source).

The quantities are the ones bench/accounting.py measures on every run, defined the same way, so a run's
summary.json shows the prediction's error: parameters, gradients (held at the accumulation boundary), optimizer
states, ZeRO's reduction buffers, activations saved for backward per micro-batch, the logits, and communication
per optimizer step as DeepSpeed's comms logger counts it. The peak adds what lives only for part of a step (ZeRO-1's
unreduced gradients, ZeRO-1/2 reduction buckets, ZeRO-3's gathered parameters, the loss's fp32 logits, pipeline
micro-batches in flight) and, on a GPU, an allowance for the CUDA context and the allocator.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bench import gpus, models
from bench.ds_config import element_bytes, offloaded
from bench.layout import WHOLE, Placement
from bench.strategies import DIMENSIONS
from bench.architecture import architecture, lora_sizes_by_name, parameter_sizes, target_names

GIB = gpus.GIB
# The CUDA context, cuBLAS workspaces and NCCL's buffers (a fixed allowance), and the caching allocator's
# fragmentation (a share of everything else): allowances, not measurements (docs/planner.md).
CONTEXT_BYTES = 1 * GIB
FRAGMENTATION = 0.05
# DeepSpeed's defaults where a ds_config leaves them out (deepspeed/runtime/zero/config.py, 0.19.8)
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
PERSISTENCE_THRESHOLD = 100_000


def zero_section(plan) -> dict:
    """The resolved ds_config's zero_optimization section ({} without one)."""
    return plan.ds.get("zero_optimization") or {}


def _width(plan) -> int:
    return element_bytes(plan.ds)


# ---------------------------------------------------------------------------------------------------------
# What each rank trains: ZeRO partitions each parameter group over the ranks that hold the same copy of it.

@dataclass
class Group:
    sizes: list        # numel of each trainable parameter this rank holds in the group, in DeepSpeed's order
    degree: int        # ranks the group's optimizer states are partitioned over
    index: int         # this rank's place among them


def placement(plan, rank: int) -> Placement:
    """The part of the model's depth this rank runs: a dimension's that places layers (the pipeline's), else all."""
    return next((d.placement(plan, rank) for d in plan.layout.declared() if d.placement), WHOLE)


def _holds(name: str, place: Placement) -> bool:
    """Whether a parameter of the whole model lives on a rank of this placement."""
    if place.layers is None:
        return True
    m = re.search(r"\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) in place.layers
    return place.first if "embed_tokens" in name else place.last


def _local_sizes(plan, rank: int) -> tuple[list[int], list[int]]:
    """(dense, expert) numel of every trainable parameter this rank holds, in module order: each dimension's part
    of it (local_numel: TP's split, EP's E/ep experts), the layers its placement runs (a pipeline stage's), and in
    a LoRA run only the adapters (adapter_sizes: as TP splits them)."""
    on = plan.layout.declared()
    place = placement(plan, rank)
    if plan.peft == "lora":
        adapters = next((d.adapter_sizes(plan) for d in on if d.adapter_sizes), None)
        adapters = lora_sizes_by_name(plan.cfg, plan.model_config) if adapters is None else adapters
        return [n for name, n in adapters if _holds(name, place)], []
    parts = [d.local_numel(plan) for d in on if d.local_numel]
    experts_apart = any(d.expert_group for d in on)  # expert parameters form their own group
    dense, expert = [], []
    named = list(architecture(plan.model_config).params)
    if place is not WHOLE and plan.model_config.tie_word_embeddings:  # the last stage's own copy of the tied head
        named.append(("lm_head.weight", dict(named)["model.embed_tokens.weight"]))
    for name, numel in named:
        if not _holds(name, place):
            continue
        n = numel
        for part in parts:  # floor divisions compose in any order
            n = part(name, n)
        (expert if experts_apart and ".experts." in name else dense).append(n)
    return dense, expert


def groups(plan, rank: int) -> list[Group]:
    """The parameter groups ZeRO flattens on this rank (dense and, under EP, expert parameters)."""
    lay = plan.layout
    dense, expert = _local_sizes(plan, rank)
    out = [Group(dense, lay.zero_degree, lay.coords(rank).zero)]
    for d in plan.layout.declared():
        if expert and d.expert_group:
            out.append(Group(expert, *d.expert_group(lay, rank)))
    return out


def _partition_overlap(g: Group) -> int:
    """Elements of the whole parameters overlapping this rank's 1/degree of the group's flat buffer: ZeRO-1/2 keep
    the gradients of whole parameters that cross into their partition (stage_1_and_2.py: grads_in_partition)."""
    total = sum(g.sizes)
    part = -(-total // g.degree)
    lo, hi = g.index * part, (g.index + 1) * part
    held, offset = 0, 0
    for n in g.sizes:
        if offset < hi and offset + n > lo:
            held += n
        offset += n
    return held


# ---------------------------------------------------------------------------------------------------------
# Model states and buffers

def model_states(plan, rank: int) -> dict:
    """params, grads (at the accumulation boundary), optimizer, and the buffers ZeRO keeps, in bytes, wherever
    they live; what of them ZeRO offload keeps in host memory (offloaded_bytes); and what lives only during
    backward (transient_bytes). Another engine than DeepSpeed answers for itself (its strategy's engine_states)."""
    own = plan.strategy.engine_states(plan, rank)
    if own is not None:
        return own
    w, zero, stage = _width(plan), zero_section(plan), plan.zero_stage
    off = offloaded(plan.ds)
    step = 0
    params = held = plan.strategy.params_per_rank(plan)[rank] * w
    gs = groups(plan, rank)
    trainable = sum(sum(g.sizes) for g in gs)
    partition = sum(-(-sum(g.sizes) // g.degree) for g in gs)
    bucket = int(zero.get("reduce_bucket_size", REDUCE_BUCKET)) * w
    transient = 0
    if stage == 3:
        sizes = [n for g in gs for n in g.sizes]
        world = plan.layout.world_size
        part3 = sum(-(-n // world) for n in sizes)
        # parameters at or under the persistence threshold stay whole on every rank beside their partition
        threshold = zero.get("stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD)
        params += sum(n for n in parameter_sizes(plan) if n <= threshold) * w
        # LoRA adapters are held fp32 under ZeRO-3: their partition and their persistent whole copy at 4 bytes
        params += sum(-(-n // world) + (n if n <= threshold else 0) for n in lora_sizes(plan)) * \
            (_adapter_width(plan) - w)
        optimizer = part3 * 8  # Adam's two fp32 states
        # gradients as bench/accounting.py finds them (measured, tests/integration/test_zero.py and test_bf16.py): in fp32 the
        # reduce-scatter target and the averaged partition; in bf16 one bf16 buffer and the fp32 master
        # partition, which stage3.py keeps outside the inner optimizer's param_groups (fp32 training updates
        # the partition itself: no master)
        master = 0 if w == 4 else 4
        grads = part3 * (w + 4)
        buffers = bucket // w * _reduce_width(plan)  # one bucket, kept for the whole run
        prefetch = int(zero.get("stage3_prefetch_bucket_size", PREFETCH_BUCKET))
        # the parameters gathered for compute: frozen ones too
        transient = min(sum(parameter_sizes(plan)), prefetch + _largest_layer(plan)) * w
        # offload: the optimizer and the averaged gradient partition in host memory; with offload_param the
        # partitions too (the persistent whole parameters stay on the device)
        host = (optimizer + part3 * (w + master) if "optimizer" in off else 0) + \
            (held if "param" in off else 0)  # the fp32 master goes with the optimizer
    elif stage in (1, 2):
        optimizer = partition * 12 + 4 * len(gs)  # fp32 master + Adam's two states, and a step counter per group
        grads = sum(_partition_overlap(g) for g in gs) * w
        host = 0
        if w == 2 and "optimizer" not in off:
            # at the step each group's bf16 gradient partition is copied to fp32 for its master
            # (stage_1_and_2.py step: flat_grad_partition.to(fp32)), one group at a time, after backward
            step = max((-(-sum(g.sizes) // g.degree) for g in gs), default=0) * 4
        if "optimizer" in off:  # ZeRO-Offload: fp32 gradient partitions and a staging buffer of the largest
            # parameter on each side (stage_1_and_2.py), and the partition's gradients on the device only while
            # they accumulate over micro-batches; the host holds the optimizer and the fp32 partitions
            largest = max((n for g in gs for n in g.sizes), default=0)
            grads = (grads if plan.batch.grad_accum > 1 else 0) + 2 * partition * 4 + largest * (4 + w)
            host = optimizer + 2 * partition * 4 + largest * 4
        overlap = zero.get("overlap_comm", False)
        buffers = 0
        transient = (2 if overlap else 1) * bucket if zero.get("contiguous_gradients", True) else 0
        if stage == 1:  # every gradient, whole, until the boundary's reduction (beyond the partition it keeps)
            transient += max(0, trainable * w - grads)
    else:
        optimizer = trainable * (8 if w == 4 else 12)  # bf16 without ZeRO: DeepSpeed's BF16_Optimizer keeps fp32
        grads = trainable * (w if w == 4 else 4 + w)  # ... and fp32 gradient accumulators
        buffers = host = 0
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optimizer, "buffers_bytes": buffers,
            "offloaded_bytes": host, "transient_bytes": transient, "step_transient_bytes": step}


def lora_sizes(plan) -> list[int]:
    return [n for _, n in lora_sizes_by_name(plan.cfg, plan.model_config)] if plan.peft == "lora" else []


def _reduce_width(plan) -> int:
    """Bytes per element of ZeRO's gradient reductions: the training dtype's, or the dtype a dimension that is on
    reduces in (its module's reduce_dtype: SP's)."""
    for d in plan.layout.declared():
        if d.reduce_dtype:
            return {"fp32": 4, "fp16": 2, "bf16": 2}[d.reduce_dtype(plan.ds)]
    return _width(plan)


def _tiler(plan, hook: str):
    """The dimension whose runner tiles the dense MLPs ("tiles_mlp") or the LM head and loss ("tiles_loss") in
    this run (SP's, under --tiled_mlp / --tiled_loss), or None."""
    return next((d for d in plan.layout.declared() if getattr(d, hook) and getattr(d, hook)(plan)), None)


def _sizes_and_widths(plan) -> list[tuple[int, int]]:
    """(numel, bytes per element) of every parameter of the model, adapters last (parameter_sizes' order)."""
    adapters = lora_sizes(plan)
    base = parameter_sizes(plan)[:-len(adapters) or None]
    return [(n, _width(plan)) for n in base] + [(n, _adapter_width(plan)) for n in adapters]


def _adapter_width(plan) -> int:
    """Bytes per LoRA adapter element as the engine holds them: ZeRO-0/1/2 cast the whole module to the training
    dtype at initialize (runtime/engine.py, _cast_module_mixed_precision); ZeRO-3's model is built under zero.Init
    and peft adds the adapters after, so they stay fp32 (summary.dtypes records it; docs/parity.md)."""
    return 4 if plan.zero_stage == 3 else _width(plan)


def _largest_layer(plan) -> int:
    c = models.count_params_from_config(plan.model_config)
    layer = c["layer"]
    experts = max(1, layer["experts"])
    return max(c["embedding"], c["head"], layer["attention"] + experts * layer["mlp"])


# ---------------------------------------------------------------------------------------------------------
# Loading (bench/loading.py): what a rank holds while its model is materialized, before deepspeed.initialize

def _largest_tensor(plan) -> int:
    return max(n for _, n in architecture(plan.model_config).params)


def load_bytes(plan, rank: int) -> dict:
    """The load's peak per rank -> {"device": bytes, "host": bytes}. A model-parallel rank (TP, EP, PP without
    ZeRO-3) holds its own parameters plus one transient: the largest weight AutoTP splits, whole before it is
    sliced; under AutoEP one layer's local experts three times over (the rows read, ep_repack.py's slices of them
    and their contiguous copies). Any other layout holds the whole model (ZeRO-3: its partition and the largest
    tensor gathered at construction). The host stages one tensor at a time read from a checkpoint."""
    from bench.loading import shards_at_load
    w = _width(plan)
    transient = 0
    if shards_at_load(plan):  # each dimension's own (TP: its largest split weight; EP: a layer's experts x 3)
        held = plan.strategy.params_per_rank(plan)[rank] * w
        transient = max([d.load_transient(plan, w) for d in plan.layout.declared() if d.load_transient], default=0)
    elif plan.zero_stage == 3:
        held = plan.strategy.params_per_rank(plan)[rank] * w
        transient = _largest_tensor(plan) * w
    else:
        held = plan.strategy.whole_model_bytes(plan)
    host = _largest_tensor(plan) * w if plan.cfg.model.init == "pretrained" else 0
    return {"device": held + transient, "host": host}


# ---------------------------------------------------------------------------------------------------------
# Activations

def activation_bytes(plan, rank: int, micro: int | None = None, seq: int | None = None) -> dict:
    """What one micro-batch's forward saves for backward on this rank (saved-tensor hooks, each storage once; the
    attention path of plan.attention), and the logits. Per decoder layer, counted tensor by tensor
    from Hugging Face's LLaMA/Mixtral forward under SDPA (docs/planner.md): the two RMSNorms keep an fp32 copy,
    their output and 1/rms; attention keeps q, k, v (expanded to every head when a mask is given), its output and
    log-sum-exp, the o_proj input and the mask; the MLP keeps gate, up, act and act*up. No score matrix: SDPA and
    flash attention recompute it. After Korthikanti et al. 2022, Table 2, without the attention scores."""
    c, lay, w, on = plan.model_config, plan.layout, _width(plan), plan.layout.declared()
    rows, width = plan.micro_shape  # the run's mean micro-batch (packed: one row of its samples)
    micro, seq = micro or rows, (seq or width) // lay.sequence_split  # SP: this rank's slice
    tp = math.prod(d.gemm_split(lay) for d in on if d.gemm_split)  # the heads and MLP width a rank computes (TP)
    h, inter, hd = c.hidden_size, c.intermediate_size, models.head_dim(c)
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    bs = micro * seq
    # The attention path (bench/attention.py, plan.attention): padded rows pass no mask and packed rows attend
    # within their documents (causal SDPA per document, keys and values not expanded), unless the run asks for
    # transformers' dense masks (--attn_mask dense, eager): the padding mask, where a strategy passes it (pipeline
    # stages and Ulysses never do: their modules' drops_mask), and the packed rows' block-diagonal mask, over the
    # whole gathered row under Ulysses (a dimension that splits the sequence attends over the gathered row)
    split = lay.sequence_split
    masked = plan.attention["mask"] == "dense"
    packed = masked and plan.collate.mode == "packed"
    q_elems, kv_elems = bs * heads * hd // tp, bs * kv * hd // tp
    expanded = masked or split > 1  # SDPA gets k and v repeated to every head (under SP: this rank's heads)
    attention = (2 * q_elems + (2 * q_elems if expanded else 2 * kv_elems) + q_elems) * w  # q, out, k, v, o_proj in
    mask = micro * (seq * split if packed else seq) ** 2 * w  # SDPA converts a bool mask to the query dtype
    attention += (mask if masked else 0) + micro * heads // tp * seq * 4  # mask, log-sum-exp
    attention += micro * seq * split * 8 if split > 1 else 0  # Ulysses: the gathered position ids
    if any(d.saves_extra_q for d in on) and not masked:  # measured, not yet traced (autotp.py's TP declares it)
        attention += q_elems * w
    if plan.attention["kernel"] == "sdpa per document" and split == 1:
        # one SDPA call per document saves each document's output, and their concatenation is the o_proj input
        # (a whole-row kernel's output is the o_proj input itself); under Ulysses the all-to-all's output is
        # the o_proj input either way. Measured: one q-sized tensor per layer (tests/integration/
        # test_packing_parity.py)
        attention += q_elems * w
    if plan.cfg.model.attn_implementation == "eager":
        # transformers' eager_attention_forward: matmul(q, k^T) keeps q and k repeated to every head, the softmax
        # its fp32 output and matmul(p, v) the probabilities cast back to w (one tensor in fp32) and v repeated;
        # the mask is added, not kept, and neither the output nor a log-sum-exp is kept: score matrices of
        # (4 + w) b heads s^2 bytes, where SDPA and flash attention keep none
        scores = micro * heads // tp * seq * seq
        attention = 4 * q_elems * w + scores * (4 if w == 4 else 4 + w)  # q, k, v, the o_proj input; scores
    norms = 2 * (bs * h * (4 + w) + bs * 4) + bs * h * w  # two RMSNorms, and the residual stream kept once more
    if models.is_moe(c):
        k = c.num_experts_per_tok
        tokens = bs * k  # each token's top-k copies; AutoEP under TP splits the experts' intermediate width
        split = math.prod(d.expert_width_split(lay) for d in on if d.expert_width_split)
        mlp = (4 * tokens * inter // split + 2 * tokens * h + 4 * tokens) * w + bs * c.num_local_experts * 4
        mlp += 4 * tokens * 8  # routing indices
    else:  # a tiled MLP keeps only its input (the norm's output, counted above) and recomputes the rest
        mlp = 0 if _tiler(plan, "tiles_mlp") else 4 * bs * inter // tp * w
    layer = norms + attention + mlp
    if plan.peft == "lora":
        dense_inter = inter // tp  # what a rank holds of a dense MLP (TP splits it)
        layer = _lora_layer(plan, bs, q_elems, 0 if _tiler(plan, "tiles_mlp") else dense_inter, attention, w)
        if models.is_moe(c):  # frozen experts keep neither their down projection's input nor one copy of the
            # tokens (no weight gradient): the MoE block in place of _lora_layer's dense MLP
            layer += mlp - (tokens * inter // split + tokens * h) * w - 3 * bs * dense_inter * w
    place = placement(plan, rank)
    n_layers = c.num_hidden_layers if place.layers is None else len(place.layers)
    if plan.cfg.model.activation_checkpointing:
        kept = n_layers * bs * h * w  # each layer's input; the rest is recomputed in backward, one layer at a time
        recompute = layer
    else:
        kept, recompute = n_layers * layer, 0
    vocab = c.vocab_size // math.prod(d.vocab_split(plan) for d in on if d.vocab_split)  # a rank's part of logits
    outside = 2 * seq * hd * w if n_layers else 0  # the rotary cos and sin
    if place.first:
        outside += 2 * bs * 8  # ids and labels
    if place.last:  # the final norm (frozen under LoRA: nothing, but ZeRO-3 keeps the head's input) and the fp32
        # log-probabilities cross-entropy keeps
        if plan.peft != "lora":
            outside += bs * h * (4 + 2 * w) + bs * 4
        elif plan.zero_stage == 3:
            outside += bs * h * w
        if not _tiler(plan, "tiles_loss"):  # tiled: the head and loss run slice by slice, their backward at once
            outside += bs * vocab * 4
    logits = bs * vocab * w if place.last and not _tiler(plan, "tiles_loss") else 0
    return {"activation_bytes": kept + outside, "logits_bytes": logits, "recompute_bytes": recompute}


def _lora_layer(plan, bs: int, q_elems: int, inter: int, attention: int, w: int) -> int:
    """A decoder layer's saved tensors when only LoRA adapters train (dense MLP; measured tensor by tensor like
    activation_bytes; q_elems and inter are this rank's share under TP). Frozen linear layers keep no input (no
    weight gradient to compute), except under ZeRO-3, whose linear wrapper keeps every input. Adapters keep their
    input and their r-wide middle in the adapters' dtype (_adapter_width: bf16 under ZeRO-0/1/2 in bf16, fp32
    under ZeRO-3, where each adapter casts its input to fp32 separately)."""
    h, r = plan.model_config.hidden_size, plan.cfg.model.lora_r
    targets = set(target_names(plan.cfg))
    if _tiler(plan, "tiles_mlp"):  # the tiled MLP's adapters recompute with it
        targets -= {"gate_proj", "up_proj", "down_proj"}
    inputs = {"q_proj": ("norm1", bs * h), "k_proj": ("norm1", bs * h), "v_proj": ("norm1", bs * h),
              "o_proj": ("o", q_elems), "gate_proj": ("norm2", bs * h), "up_proj": ("norm2", bs * h),
              "down_proj": ("down", bs * inter)}
    wrapped = [inputs[t] for t in targets if t in inputs]
    kept = attention - q_elems * w + 2 * bs * 4  # attention without the o_proj input; the norms' 1/rms
    kept += 3 * bs * inter * w  # gate, up and act (the down input only when something needs it)
    aw = _adapter_width(plan)
    kept += len(wrapped) * bs * r * aw
    if aw == w:  # adapters in the model's dtype: each distinct input once, the norms' copies shared with the
        # residual stream but one (in bf16 also one fp32 copy of it)
        kept += (bs * h + sum(dict(wrapped).values())) * w + (bs * h * 4 if w != 4 else 0)
    else:  # fp32 adapters on a bf16 model (ZeRO-3): each adapter casts its input to fp32 separately
        kept += (2 * bs * h + sum(n for _, n in wrapped)) * 4
    if plan.zero_stage == 3:  # the frozen linears' inputs too
        frozen = {kind: n for name, (kind, n) in inputs.items() if name not in targets}
        kept += sum(n for kind, n in frozen.items() if kind not in dict(wrapped)) * w
    return kept


# ---------------------------------------------------------------------------------------------------------
# Communication per optimizer step, as DeepSpeed's comms logger counts it (bench/accounting.py: CommCounter)

def comm_bytes_per_step(plan, rank: int) -> dict:
    """Bytes per step this rank's collectives log, by kind (what bench/accounting.py counts)."""
    out: dict = {}
    for kinds in comm_by_source(plan, rank).values():
        for kind, n in kinds.items():
            out[kind] = out.get(kind, 0) + n
    return out


def critical_calls_per_step(plan, rank: int) -> dict:
    """Calls per step of the collectives a layer or stage waits on (comm_by_source's "tp", "ep", "sp", "pp"), by
    kind: each pays the link's latency (the calibrated cost model's per-call term, bench/calibrate.py). ZeRO's
    and the engines' reductions are bucketed, their calls few and overlapped: not counted."""
    out: dict = {}
    for source, dimension in DIMENSIONS.items():
        if getattr(plan.layout, source) > 1:
            for kind, n in dimension.comm_calls(plan, rank).items():
                out[kind] = out.get(kind, 0) + int(n)
    return out


def comm_by_source(plan, rank: int) -> dict:
    """comm_bytes_per_step by what issues it -> {source: {kind: bytes}}. "tp", "ep", "sp" and "pp": inside a
    layer or between stages, on the critical path (the next operation needs the result), each counted by its
    dimension's module (DIMENSIONS); "zero_backward": ZeRO's gradient reductions inside backward and ZeRO-3's
    parameter gathers inside forward and backward, which DeepSpeed can overlap with compute (overlap_comm,
    prefetching); "zero_step": what runs after backward, at the step (plain data parallelism's all-reduce, the
    norm, ZeRO-1/2's gather of the updated parameters)."""
    lay, w = plan.layout, _width(plan)
    out: dict = {}
    for source, dimension in DIMENSIONS.items():
        if getattr(lay, source) > 1:
            out[source] = {kind: int(n) for kind, n in dimension.comm_bytes(plan, rank, w).items()}
    own = plan.strategy.engine_comm(plan, rank)  # another engine than DeepSpeed: its own data-parallel traffic
    if own is not None:
        return {**out, **own}
    source = "zero_backward"

    def add(kind, n):
        kinds = out.setdefault(source, {})
        kinds[kind] = kinds.get(kind, 0) + int(n)

    accum = plan.batch.grad_accum
    gs = groups(plan, rank)
    if plan.zero_stage == 3:
        sizes = [n for g in gs for n in g.sizes]
        world = lay.world_size
        threshold = zero_section(plan).get("stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD)
        add("reduce_scatter", accum * sum(-(-n // world) for n in sizes) * world * _reduce_width(plan))
        every = _sizes_and_widths(plan)  # frozen ones too: the forward needs them
        small = sum(-(-n // world) * width for n, width in every if n <= threshold)
        large = sum(-(-n // world) * width for n, width in every if n > threshold)
        add("all_gather", 2 * accum * large)  # forward and backward per micro-batch
        source = "zero_step"
        add("all_gather", small)  # the persistent parameters, after the step
        add("all_reduce", 4 if "optimizer" in offloaded(plan.ds) else 8)  # the norm: fp32 offloaded, else fp64
    elif plan.zero_stage == 0 and gs[0].degree > 1:  # plain data parallel: the engine all-reduces at the boundary
        source = "zero_step"
        add("all_reduce", sum(sum(g.sizes) for g in gs) * _reduce_width(plan))
    elif plan.zero_stage in (1, 2):
        trainable = sum(sum(g.sizes) for g in gs)
        reductions = accum if plan.zero_stage == 2 else 1
        add("all_reduce", reductions * trainable * _reduce_width(plan))
        source = "zero_step"
        add("all_reduce", 4)
        gathered = sum(-(-sum(g.sizes) // g.degree) for g in gs if g.degree > 1)
        if gathered:
            add("all_gather", gathered * w)
    return out


# ---------------------------------------------------------------------------------------------------------
# Everything together

def estimate(plan, capacity: int | None = None, device: str = "cuda") -> dict:
    """The plan's prediction per rank -> bench-plan's --json shape (docs/planner.md)."""
    per_rank, in_flight = [], _in_flight(plan)
    for rank in range(plan.layout.world_size):
        states = model_states(plan, rank)
        flight = in_flight[rank]
        activations, transient, logits = _micro_batch_bytes(plan, rank, plan.micro_shape, flight)
        # Packed and longest-padded micro-batches vary in width: the peak comes with the one that holds the most of
        # those the run will see, usually the widest (not always: --tiled_loss's slices shrink as a row crosses a
        # tile boundary); every micro-batch in flight taken as that one, an upper bound under the pipeline
        most = max(sum(_micro_batch_bytes(plan, rank, shape, flight)[:2]) for shape in plan.micro_shapes)
        extra = max(0, most - activations - transient)
        transient += states.pop("transient_bytes")
        step = states.pop("step_transient_bytes")
        host = states.pop("offloaded_bytes")
        # on the device: the peak of backward (activations and its transients) or of the optimizer step, after
        # backward freed them (the step's own transient)
        held = sum(states.values()) - host + max(activations + transient + extra, step)
        allowance = (lambda b: int(CONTEXT_BYTES + FRAGMENTATION * b)) if device == "cuda" else (lambda b: 0)
        overhead = allowance(held)
        load = load_bytes(plan, rank)
        per_rank.append({"rank": rank, **states, "offloaded_bytes": host, "activation_bytes": activations,
                         "logits_bytes": logits, "transient_bytes": transient,
                         "peak_micro_batch_bytes": extra, "step_transient_bytes": step,
                         "overhead_bytes": overhead, "total_bytes": held + overhead,
                         "load_bytes": load["device"] + allowance(load["device"]), "load_host_bytes": load["host"],
                         "micro_batches_in_flight": flight,
                         # of activation_bytes, the layer recomputed in backward under checkpointing (not saved
                         # by the forward, which is what the accounting counts)
                         "recompute_bytes": activation_bytes(plan, rank, *plan.micro_shape)["recompute_bytes"]})
    training = max(r["total_bytes"] for r in per_rank)
    loading = max(r["load_bytes"] for r in per_rank)
    peak = max(training, loading)
    rows, width = plan.micro_shape
    micro_batches = plan.batch.grad_accum * plan.layout.data_parallel  # per step, over the replicas
    per_token, per_pair = models.flop_coefficients(plan.model_config, plan.lora_params)
    flops = micro_batches * rows * (per_token * width + per_pair * width ** 2)  # computed: attention per row
    return {"fits": None if capacity is None else peak <= capacity, "capacity_bytes": capacity, "peak_bytes": peak,
            "training_peak_bytes": training, "load_peak_bytes": loading,
            "micro_batch_shapes": {"mean": list(plan.micro_shape), "all": [list(s) for s in plan.micro_shapes]},
            "per_rank": per_rank, "comm_bytes_per_step": comm_bytes_per_step(plan, 0),
            "comm_bytes_per_step_per_rank": [comm_bytes_per_step(plan, r) for r in range(plan.layout.world_size)],
            "critical_calls_per_step_per_rank": [critical_calls_per_step(plan, r)
                                                 for r in range(plan.layout.world_size)],
            "computed_tokens_per_step": micro_batches * rows * width,
            "flops_per_rank_per_step": flops / plan.layout.world_size}


def _micro_batch_bytes(plan, rank: int, shape: tuple[int, int], flight: int) -> tuple[int, int, int]:
    """(activations, transient, logits) of micro-batches of this shape on this rank at its backward's peak: what
    the micro-batches in flight saved (and one layer's recompute under checkpointing); the logits, the loss's fp32
    copy of them and their gradient, on the stage that computes it; the logits alone."""
    act = activation_bytes(plan, rank, *shape)
    loss = 2 * act["logits_bytes"] // _width(plan) * 4
    tiler = _tiler(plan, "tiles_loss")
    if tiler:  # its runner computes the head and loss one slice at a time
        loss = tiler.loss_slice(plan, shape)
    logits = act["logits_bytes"]
    return act["activation_bytes"] * flight + act["recompute_bytes"], logits + loss, logits


def slowest_share(plan) -> float:
    """The slowest rank's compute as a multiple of the mean rank's (a pipeline's slowest stage, its module's
    compute_share); 1 where every rank computes alike."""
    return math.prod(d.compute_share(plan) for d in plan.layout.declared() if d.compute_share)


def _in_flight(plan) -> list[int]:
    """Micro-batches whose activations each rank holds at its peak: one, or a dimension's that keeps several in
    flight (the pipeline's 1F1B)."""
    return next((d.in_flight(plan) for d in plan.layout.declared() if d.in_flight), [1] * plan.layout.world_size)
