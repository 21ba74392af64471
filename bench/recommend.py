"""bench-plan --recommend: for one job (the --peft given), the shipped layouts (ds_configs/*.json, micro batches
1-8, with and without activation checkpointing) that fit the GPUs, ordered by a cost model's predicted step time.

The cost model (docs/planner.md) is deliberately simple and every assumption is printed with the table: compute
at a fixed share of the GPU's bf16 peak, plus every byte the planner says a rank communicates at the link's
bandwidth, without overlap (an upper bound on the step), plus the 1F1B bubble, checkpointing's recompute, and
ZeRO offload's PCIe transfers and CPU Adam time.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os

from bench import config, estimate
from bench import gpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the shipped ds_configs/ live here

EFFICIENCY = 0.40  # share of the bf16 dense peak the matmuls sustain (torchtitan: 33-39 % MFU, Llama 3.1 8B, H100)
GPUS_PER_NODE = 8
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


def peak_tflops(gpu: str) -> float:
    """The bf16 dense peak of a bench-plan GPU name."""
    return gpus.BY_KEY[gpu].bf16_tflops


def assumptions(gpu: str, world: int) -> list[str]:
    inter = world > GPUS_PER_NODE
    link = INTER_NODE if inter else gpus.BY_KEY[gpu].link_bytes_s
    return [f"compute at {EFFICIENCY:.0%} of {gpu}'s bf16 peak ({peak_tflops(gpu)}"
            " TFLOP/s); activation checkpointing recomputes the forward (x 4/3)",
            f"communication at {link / 1e9:.0f} GB/s per GPU ({'InfiniBand between nodes' if inter else 'NVLink'}), "
            "ring bus factors (all-reduce 2, all-gather n - 1 shards over the data-parallel or TP group, others 1), "
            "not overlapped with compute",
            "pipeline: the 1F1B bubble (stages - 1) / micro-batches on top of compute; expert routing balanced",
            f"ZeRO offload: the offloaded bytes cross PCIe twice at {PCIE / 1e9:.0f} GB/s and CPU Adam updates them "
            f"at {CPU_ADAM / 1e9:.0f} GB/s per rank, not overlapped"]


def step_breakdown(plan, est: dict, gpu: str) -> dict:
    """Predicted seconds per optimizer step, in parts (the slowest rank's share; see assumptions): compute (the
    forward and backward once), recompute (activation checkpointing's second forward), bubble (the pipeline's
    1F1B idle share), communication (every byte the planner counts, exposed), offload (ZeRO offload's PCIe
    transfers and CPU Adam) and their total."""
    peak = peak_tflops(gpu) * 1e12
    compute = est["flops_per_rank_per_step"] / (peak * EFFICIENCY)
    recompute = compute / 3 if plan.cfg.activation_checkpointing else 0.0
    bubble = (compute + recompute) * (plan.layout.pp - 1) / plan.batch.grad_accum if plan.layout.pp > 1 else 0.0
    world = plan.layout.world_size
    link = INTER_NODE if world > GPUS_PER_NODE else gpus.BY_KEY[gpu].link_bytes_s
    host = max(r["offloaded_bytes"] for r in est["per_rank"])
    offload = 2 * host / PCIE + host / CPU_ADAM  # ZeRO offload: the states cross PCIe and CPU Adam updates them
    group = plan.layout.zero_degree if plan.layout.zero_degree > 1 else plan.layout.tp  # who gathers
    moved = max(sum(b * (group - 1 if kind == "all_gather" else BUS_FACTOR.get(kind, 1.0))
                    for kind, b in comm.items()) for comm in est["comm_bytes_per_step_per_rank"])
    parts = {"compute_s": compute, "recompute_s": recompute, "bubble_s": bubble, "communication_s": moved / link,
             "offload_s": offload}
    return {**parts, "step_s": sum(parts.values())}


def step_seconds(plan, est: dict, gpu: str) -> float:
    return step_breakdown(plan, est, gpu)["step_s"]


def _strategy_for(ds: dict, layout) -> str:
    if layout.pp > 1:
        return "hybrid" if layout.dp > 1 else "pp"
    if layout.tp > 1 and layout.ep > 1:
        return "tp_ep"
    if layout.sp > 1:
        return "sp"
    return "tp" if layout.tp > 1 else "ep" if layout.ep > 1 else "dp"


def candidates(args: list[str], world: int, gpu: str, reasons: list):
    """Resolved plans for every shipped ds_config that suits the model and world size, for one job: the args'
    --peft (a full fine-tune and a LoRA run are different jobs, never ranked together; default none); micro batch
    and checkpointing vary on copies of one resolved plan (the data's size is checked for micro 1 only). Without
    --global_batch_size every layout gets 8 samples per GPU per step, so micro batches 1-8 fit. Yields plans;
    reasons collects why the others were left out."""
    from bench.plan import plan_layout
    if "--global_batch_size" not in args:
        args = [*args, "--global_batch_size", str(8 * world)]
    if "--peft" not in args:
        args = [*args, "--peft", "none"]
    for path in sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))):
        path = os.path.relpath(path, REPO) if os.getcwd() == REPO else path
        with open(path) as fh:
            ds = json.load(fh)
        try:
            layout = config.Layout.from_ds_config(ds, world)
        except config.BenchError as e:
            reasons.append(f"{path}: {e}")
            continue
        try:
            base = plan_layout([*args, "--strategy", _strategy_for(ds, layout), "--ds_config", path,
                                "--micro_batch_size", "1"], world, gpu)
        except config.BenchError as e:  # not a layout for this model or world: bench/run.py's own reason
            reasons.append(f"{path}: {e}")
            continue
        for micro in MICRO_BATCHES:
            accum, rest = divmod(base.batch.global_, micro * layout.data_parallel)
            if rest or not accum:
                continue
            for ckpt in (False, True):
                plan = copy.copy(base)
                plan.cfg = dataclasses.replace(base.cfg, micro_batch_size=micro, activation_checkpointing=ckpt)
                plan.batch = config.Batch(micro, accum, base.batch.global_)
                yield plan


def recommend(args: list[str], world: int, gpu: str, capacity: int, top: int = 20) -> tuple[list[dict], list[str]]:
    """-> (the layouts that fit, fastest predicted first; the assumptions)."""
    rows, reasons, planned = [], [], 0
    for plan in candidates(args, world, gpu, reasons):
        planned += 1
        est = estimate.estimate(plan, capacity)
        if not est["fits"]:
            continue
        parts = step_breakdown(plan, est, gpu)
        rows.append({"strategy": plan.cfg.strategy, "ds_config": plan.cfg.ds_config, "peft": plan.peft,
                     "micro_batch_size": plan.batch.micro,
                     "activation_checkpointing": plan.cfg.activation_checkpointing,
                     "peak_bytes": est["peak_bytes"], "comm_bytes_per_step": max(
                         sum(c.values()) for c in est["comm_bytes_per_step_per_rank"]),
                     "flops_per_rank_per_step": est["flops_per_rank_per_step"], **parts,
                     "computed_tokens_per_s_per_gpu": est["computed_tokens_per_step"] / parts["step_s"] / world})
    if not planned:  # nothing resolved: the user's own arguments are wrong, not the layouts
        raise config.BenchError("no layout could be planned; the first reason: " + (reasons[0] if reasons else
                                "no ds_configs/*.json found"))
    rows.sort(key=lambda r: r["step_s"])
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
