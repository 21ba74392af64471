"""The cost model (docs/planner.md, where each term's source is named): a layout's predicted seconds per optimizer
step, in parts, from what the planner says it computes and moves (bench/estimate.py). bench-plan --recommend ranks
layouts by it (bench/recommend.py); a run on a catalog GPU records its prediction (bench/plan.py check_memory),
which the report sets beside the measured step; bench/calibrate.py fits its constants to the user's runs.

It is deliberately simple and every assumption is printed with what uses it: the slowest rank's FLOPs at a fixed
share of the GPU's bf16 peak, less for GEMMs that leave the GPU's SMs idle (narrow tensor-parallel shards); the
collectives a layer or a pipeline stage waits on (TP, EP, SP, pipeline sends) exposed at the link's bandwidth;
ZeRO's reductions and gathers hidden behind the backward they overlap (DeepSpeed's overlap_comm and prefetching),
the excess exposed; the 1F1B bubble of the slowest stage; checkpointing's recompute; ZeRO offload's PCIe transfers
and CPU Adam time.
"""
from __future__ import annotations

import math

from bench import estimate, gpus, models
from bench.strategies import DIMENSIONS

# Share of the bf16 dense peak that GEMMs filling the GPU's SMs sustain. Chosen between the published figures it is
# compared with (docs/results/cost_model.md): torchtitan's eager FSDP runs about 36 % of peak by this harness's
# FLOP count, NeMo's Transformer Engine runs 58-68 %; 0.5 sits between them. An assumption, not a measurement of
# this harness on a GPU.
EFFICIENCY = 0.50
# Within a node each GPU's link from bench/gpus.py (NVLink, one direction); between nodes a 400 Gb/s InfiniBand NIC
# per GPU.
INTER_NODE = 50e9
# Bytes that cross each rank's link per byte DeepSpeed's logger counts for a call (ring algorithms over n ranks,
# n large): all-reduce moves its tensor out and back, an all-gather's logged input shard arrives from n - 1 peers.
BUS_FACTOR = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_to_all": 1.0, "broadcast": 1.0,
              "send_recv": 0.5}  # send_recv: logged by the sender and the receiver
PCIE = 25e9       # bytes/s host <-> GPU, one direction (PCIe 4 x16 in practice)
CPU_ADAM = 10e9   # bytes of offloaded state CPU Adam updates per second per rank (a few host cores each)
TILE = (128, 256)  # output tile (rows, columns) of NVIDIA's wave-quantization example (Matrix Multiplication
# Background User's Guide): a GEMM runs in waves of one tile per SM, the last wave part-empty


def peak_tflops(gpu: str) -> float:
    """The bf16 dense peak of a bench-plan GPU name."""
    return gpus.BY_KEY[gpu].bf16_tflops


def assumptions(gpu: str, world: int) -> list[str]:
    inter = world > gpus.GPUS_PER_NODE
    link = gpus.BY_KEY[gpu].link_bytes_s
    sms = gpus.BY_KEY[gpu].sms
    return [f"compute at {EFFICIENCY:.0%} of {gpu}'s bf16 peak ({peak_tflops(gpu)} TFLOP/s) for GEMMs that fill "
            + (f"its {sms} SMs; a decoder layer's GEMMs lose the empty share of their last wave of "
               f"{TILE[0]}x{TILE[1]} tiles (narrow TP shards lose most)" if sms else "its SMs (waves not modelled)")
            + "; activation checkpointing recomputes the forward (x 4/3)",
            f"collectives a layer or stage waits on (TP, EP, SP, pipeline sends) exposed at {link / 1e9:.0f} GB/s "
            f"per GPU (NVLink){'; ZeRO beyond the node at 50 GB/s (InfiniBand)' if inter else ''}; ring bus "
            "factors (all-reduce 2, all-gather n - 1 shards, others 1)",
            "ZeRO's reductions and ZeRO-3's gathers hidden behind backward (ZeRO-1: the last micro-batch's) where "
            "overlap_comm is on, outside a pipeline; the excess and what runs at the step exposed",
            "pipeline: every stage waits for the slowest (its layers' and the head's FLOPs), plus the 1F1B bubble "
            "(stages - 1) x its micro-batch; expert routing balanced",
            f"ZeRO offload (and FSDP2's cpu_offload, charged alike): the offloaded bytes cross PCIe twice at "
            f"{PCIE / 1e9:.0f} GB/s and CPU Adam updates them at {CPU_ADAM / 1e9:.0f} GB/s per rank, not overlapped"]


def wave_efficiency(m: int, n: int, sms: int | None) -> float:
    """The share of the SMs' tile slots an [m, n] GEMM output fills: its tiles over waves x SMs tiles' area."""
    if not sms:
        return 1.0
    tiles = math.ceil(m / TILE[0]) * math.ceil(n / TILE[1])
    return m * n / (math.ceil(tiles / sms) * sms * TILE[0] * TILE[1])


def gemm_efficiency(plan, sms: int | None) -> float:
    """A decoder layer's GEMMs' FLOP-weighted wave efficiency on this rank: one micro-batch's tokens (s/SP of
    each row) through q, k, v, gate and up split by columns over TP and o and down by rows (their outputs whole);
    an expert sees its share of the EP group's tokens. Forward shapes stand for backward's."""
    c, lay, on = plan.model_config, plan.layout, plan.layout.declared()
    rows, width = plan.micro_shape
    m = rows * width // lay.sequence_split
    hd = models.head_dim(c)
    q, kv, h, f = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.hidden_size, c.intermediate_size
    split = math.prod(d.gemm_split(lay) for d in on if d.gemm_split)  # each dimension's own term
    gathered = math.prod(d.expert_tokens(lay) for d in on if d.expert_tokens)
    experts = getattr(c, "num_local_experts", 0) or 0
    m_mlp = max(1, m * c.num_experts_per_tok * gathered // experts) if experts else m
    gemms = [(m, q // split, h), (m, kv // split, h), (m, kv // split, h), (m, h, q // split),
             (m_mlp, f // split, h), (m_mlp, f // split, h), (m_mlp, h, f // split)]  # (m, n, k)
    flops = sum(m_ * n * k for m_, n, k in gemms)
    return flops / sum(m_ * n * k / wave_efficiency(m_, n, sms) for m_, n, k in gemms)


def spans_nodes(plan, source: str) -> bool:
    """Whether a source's collectives reach beyond a node: the ranks they reach (a dimension's span,
    bench/strategies; ZeRO's: every rank) more than a node's GPUs."""
    lay = plan.layout
    return (DIMENSIONS[source].span(lay) if source in DIMENSIONS else lay.world_size) > gpus.GPUS_PER_NODE


def _link(plan, gpu: str, source: str) -> float:
    """Bandwidth a source's collectives see: NVLink inside a node, else InfiniBand."""
    return INTER_NODE if spans_nodes(plan, source) else gpus.BY_KEY[gpu].link_bytes_s


def _seconds(plan, gpu: str, source: str, kinds: dict) -> float:
    """Seconds a source's logged bytes take on its link. The group an all-gather gathers from: the dimension's
    (bench/strategies), or ZeRO's."""
    lay = plan.layout
    group = DIMENSIONS[source].gather_group(lay) if source in DIMENSIONS else max(lay.zero_degree, 1)
    moved = sum(b * (group - 1 if kind == "all_gather" else BUS_FACTOR.get(kind, 1.0)) for kind, b in kinds.items())
    return moved / _link(plan, gpu, source)


def step_breakdown(plan, est: dict, gpu: str) -> dict:
    """Predicted seconds per optimizer step, in parts (the slowest rank's; see assumptions): compute (the forward
    and backward once), recompute (activation checkpointing's second forward), bubble (the pipeline's 1F1B idle
    share), communication (exposed: on the critical path, or beyond what overlaps backward), offload (ZeRO
    offload's PCIe transfers and CPU Adam) and their total."""
    peak = peak_tflops(gpu) * 1e12
    efficiency = EFFICIENCY * gemm_efficiency(plan, gpus.BY_KEY[gpu].sms)
    compute = est["flops_per_rank_per_step"] * estimate.slowest_share(plan) / (peak * efficiency)
    recompute = compute / 3 if plan.cfg.model.activation_checkpointing else 0.0
    bubble = sum((d.idle(plan, compute + recompute) for d in plan.layout.declared() if d.idle), 0.0)
    host = max(r["offloaded_bytes"] for r in est["per_rank"])
    offload = 2 * host / PCIE + host / CPU_ADAM  # ZeRO offload: the states cross PCIe and CPU Adam updates them
    window = plan.strategy.reduction_window(plan, 2 / 3 * compute + recompute)  # backward's share
    exposed = 0.0
    for rank_sources in [estimate.comm_by_source(plan, r) for r in _representative_ranks(plan)]:
        t = 0.0
        for source, kinds in rank_sources.items():
            seconds = _seconds(plan, gpu, source, kinds)
            t += max(0.0, seconds - window) if source == "zero_backward" else seconds
        exposed = max(exposed, t)
    parts = {"compute_s": compute, "recompute_s": recompute, "bubble_s": bubble, "communication_s": exposed,
             "offload_s": offload}
    return {**parts, "step_s": sum(parts.values())}


def _representative_ranks(plan) -> list[int]:
    """Ranks that between them move every distinct byte count: a dimension's (one per pipeline stage), else rank 0
    (the others move the same bytes)."""
    chosen = [d.representatives(plan.layout) for d in plan.layout.declared() if d.representatives]
    return chosen[0] if chosen else [0]
