"""bench-plan --recommend: for one job (the --peft given), the shipped layouts (ds_configs/*.json, micro batches
1-8, with and without activation checkpointing) that fit the GPUs, ordered by a cost model's predicted step time.

The cost model (docs/planner.md, where each term's source is named) is deliberately simple and every assumption
is printed with the table: the slowest rank's FLOPs at a fixed share of the GPU's bf16 peak, less for GEMMs that
leave the GPU's SMs idle (narrow tensor-parallel shards); the collectives a layer or a pipeline stage waits on
(TP, EP, SP, pipeline sends) exposed at the link's bandwidth; ZeRO's reductions and gathers hidden behind the
backward they overlap (DeepSpeed's overlap_comm and prefetching), the excess exposed; the 1F1B bubble of the
slowest stage; checkpointing's recompute; ZeRO offload's PCIe transfers and CPU Adam time.
"""
from __future__ import annotations

import glob
import math
import os

from bench import config, estimate, gpus, models
from bench.plan import assemble, load_data, load_model, planning_config
from bench.spec import spec_of
from bench.strategies import DIMENSIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the shipped ds_configs/ live here

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
MICRO_BATCHES = (1, 2, 4, 8)
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


def _link(plan, gpu: str, source: str) -> float:
    """Bandwidth a source's collectives see: NVLink while the ranks they reach fit in a node (a dimension's span,
    bench/strategies; ZeRO's: every rank), else InfiniBand."""
    lay = plan.layout
    span = DIMENSIONS[source].span(lay) if source in DIMENSIONS else lay.world_size
    return gpus.BY_KEY[gpu].link_bytes_s if span <= gpus.GPUS_PER_NODE else INTER_NODE


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


def default_coefficients(gpu: str | None) -> dict:
    """This model's constants as seconds per unit of each of bench/calibrate.py's features, for that GPU: what a
    calibration keeps for a constant its runs do not determine (none without a GPU)."""
    from bench.calibrate import KINDS, TERMS
    out = {t: 0.0 for t in TERMS}
    if gpu:
        out["flops"] = 1 / (peak_tflops(gpu) * 1e12 * EFFICIENCY)
        out.update({k: BUS_FACTOR.get(k, 1.0) / gpus.BY_KEY[gpu].link_bytes_s for k in KINDS})
        out["offloaded"] = 2 / PCIE + 1 / CPU_ADAM
    return out


def step_seconds(plan, est: dict, gpu: str) -> float:
    return step_breakdown(plan, est, gpu)["step_s"]


def candidates(args: list[str], world: int, gpu: str, reasons: list):
    """Plans for every shipped ds_config that suits the model and world size, for one job: the args' --peft (a
    full fine-tune and a LoRA run are different jobs, never ranked together; default none). Each ds_config is a
    run spec (bench/spec.py), planned with the one model config and data the job loads once; micro batch and
    checkpointing vary the spec (Plan.varied; the data's size is checked for micro 1 only). Without
    --global_batch_size every layout gets 8 samples per GPU per step, so micro batches 1-8 fit. Yields plans;
    reasons collects why the others were left out."""
    from bench.distributed import DistEnv
    if "--global_batch_size" not in args:
        args = [*args, "--global_batch_size", str(8 * world)]
    if "--peft" not in args:
        args = [*args, "--peft", "none"]
    job, env, device = planning_config(args, world), DistEnv(0, 0, 1), ("cuda", gpu, True)
    model, splits = None, []
    for path in sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))):
        path = os.path.relpath(path, REPO) if os.getcwd() == REPO else path
        cfg = job.with_flags(ds_config=path, micro_batch_size=1)  # the strategy is the ds_config's own
        try:
            spec = spec_of(cfg, world, lambda: (device[0], device[2]))
            model = model or load_model(cfg)

            def job_data(cfg=cfg, spec=spec, model=model):  # the same data for every spec: one global batch, micro 1
                if not splits:
                    splits.append(load_data(cfg, spec, model, env))
                return splits[0]
            base = assemble(cfg, spec, device, model, job_data)
        except config.BenchError as e:  # not a layout for this model or world: bench/run.py's own reason
            reasons.append(f"{path}: {e}")
            continue
        for micro in MICRO_BATCHES:
            accum, rest = divmod(base.batch.global_, micro * base.layout.data_parallel)
            if rest or not accum:
                continue
            plain = base.varied(micro, False)
            yield plain
            yield plain.varied(micro, True)  # its micro-batch shapes, planned once


def recommend(args: list[str], world: int, gpu: str, capacity: int, top: int = 20,
              calibration: dict | None = None) -> tuple[list[dict], list[str]]:
    """-> (the layouts that fit, fastest predicted first; the assumptions). With a calibration (bench/calibrate.py)
    the step times are the fitted model's, and the assumptions say which constants were fitted."""
    from bench import calibrate
    rows, reasons, planned = [], [], 0
    for plan in candidates(args, world, gpu, reasons):
        planned += 1
        est = estimate.estimate(plan, capacity)
        if not est["fits"]:
            continue
        parts = calibrate.breakdown(calibration, calibrate.features(plan, est)) if calibration \
            else step_breakdown(plan, est, gpu)
        rows.append({"strategy": plan.cfg.parallelism.strategy, "ds_config": plan.cfg.parallelism.ds_config,
                     "peft": plan.peft,
                     "micro_batch_size": plan.batch.micro,
                     "activation_checkpointing": plan.cfg.model.activation_checkpointing,
                     "peak_bytes": est["peak_bytes"], "comm_bytes_per_step": max(
                         sum(c.values()) for c in est["comm_bytes_per_step_per_rank"]),
                     "flops_per_rank_per_step": est["flops_per_rank_per_step"], **parts,
                     "computed_tokens_per_s_per_gpu": est["computed_tokens_per_step"] / parts["step_s"] / world})
    if not planned:  # nothing resolved: the user's own arguments are wrong, not the layouts
        raise config.BenchError("no layout could be planned; the first reason: " + (reasons[0] if reasons else
                                "no ds_configs/*.json found"))
    rows.sort(key=lambda r: r["step_s"])
    if calibration:  # the fitted model's constants, each said to be fitted or a default
        notes = [f"calibrated from {len(calibration['runs'])} runs on {', '.join(calibration['device'])} "
                 f"(bench-plan --calibrate); step s adds the overheads per micro-batch and per step; constants:",
                 *calibrate.describe(calibration)]
        return rows[:top], notes
    return rows[:top], assumptions(gpu, world)


def format_rows(rows: list[dict], notes: list[str]) -> str:
    job = f" (--peft {rows[0]['peft']})" if rows else ""
    head = f"{'strategy':<9}{'ds_config':<34}{'micro':>6}{'ckpt':>6}{'peak GiB':>10}{'compute':>9}{'recomp':>8}" \
           f"{'comm':>8}{'bubble':>8}{'offload':>8}{'step s':>9}{'tok/s/GPU':>11}"
    lines = [f"layouts that fit, fastest predicted first{job}; seconds per step in parts (bench/recommend.py, "
             "docs/planner.md)", "-" * len(head), head]
    for r in rows:
        lines.append(f"{r['strategy']:<9}{r['ds_config']:<34}{r['micro_batch_size']:>6}"
                     f"{'on' if r['activation_checkpointing'] else 'off':>6}{r['peak_bytes'] / estimate.GIB:>10.1f}"
                     f"{r['compute_s']:>9.3f}{r['recompute_s']:>8.3f}{r['communication_s']:>8.3f}"
                     f"{r['bubble_s']:>8.3f}{r['offload_s']:>8.3f}{r['step_s']:>9.3f}"
                     f"{r['computed_tokens_per_s_per_gpu']:>11.0f}")
    if not rows:
        lines.append("(none fits: more GPUs, a shorter --seq_len, or a larger GPU)")
    return "\n".join(lines + ["assumptions:"] + [f"  - {n}" for n in notes])
