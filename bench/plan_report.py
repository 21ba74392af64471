"""The planner's prediction in words (bench/estimate.py holds the formulas): the console table of a memory plan,
and what would lower a peak that does not fit."""
from __future__ import annotations

from bench.ds_config import offloaded
from bench.gpus import GIB


def suggestions(plan) -> list[str]:
    """What would lower the peak, in the order a user would try them."""
    out = []
    # where ZeRO splits every rank's dense states (no dimension but those it shards over): ZeRO-3 and its offload
    zero_everywhere = all(d.zero_shards for d in plan.layout.declared())
    if plan.zero_stage < 3 and zero_everywhere:
        out.append("ZeRO-3 (--ds_config ds_configs/dp_zero3.json)")
    if plan.batch.micro > 1:
        out.append(f"a smaller micro batch (--micro_batch_size {plan.batch.micro // 2})")
    if not plan.cfg.model.activation_checkpointing:
        out.append("activation checkpointing (--activation_checkpointing)")
    if plan.peft != "lora":
        out.append("LoRA (--peft lora)")
    if not offloaded(plan.ds) and zero_everywhere:
        out.append("ZeRO offload (ds_configs/dp_zero3_offload.json)")
    out.append("more GPUs")
    return out


def format_table(est: dict, gpu: str | None = None) -> str:
    """The plan as a console table: one row per group of ranks that hold the same, then the verdict."""
    cols = ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes", "activation_bytes",
            "transient_bytes", "peak_micro_batch_bytes", "overhead_bytes", "offloaded_bytes", "total_bytes")
    head = ("params", "grads", "optimizer", "buffers", "activations", "transient", "+ peak mb", "overhead", "- host",
            "total")
    rows: list[list] = []
    for r in est["per_rank"]:
        values = [r[k] for k in cols]
        if rows and rows[-1][1] == values:
            rows[-1][0][1] = r["rank"]
        else:
            rows.append([[r["rank"], r["rank"]], values])
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    shapes = est["micro_batch_shapes"]
    widest = max(shapes["all"], key=lambda s: s[0] * s[1])
    mean, widest = (" x ".join(map(str, s)) for s in (shapes["mean"], widest))
    lines = ["memory plan per rank (GiB; bench/estimate.py, docs/planner.md; host: what ZeRO offload keeps in host "
             "memory, not in the device total)",
             f"activations and transient: of the mean micro-batch ({mean} tokens); + peak mb: what the micro-batch "
             f"at the peak adds, of {len(shapes['all'])} shapes the run will see (the widest: {widest})", "-" * 128,
             f"{'ranks':<8}" + "".join(f"{h:>12}" for h in head)]
    for (a, b), values in rows:
        lines.append(f"{f'{a}' if a == b else f'{a}-{b}':<8}" + "".join(f"{gib(v):>12}" for v in values))
    lines.append(f"load (bench/loading.py, before deepspeed.initialize): {gib(est['load_peak_bytes'])} GiB per rank "
                 f"on the device, {gib(max(r['load_host_bytes'] for r in est['per_rank']))} GiB staged on the host; "
                 f"training {gib(est['training_peak_bytes'])} GiB")
    cap = est["capacity_bytes"]
    if cap is None:
        lines.append(f"peak {gib(est['peak_bytes'])} GiB per rank (no device capacity to compare with: pass --gpu "
                     "or --gpu_memory_gib)")
    else:
        verdict = "fits" if est["fits"] else "DOES NOT FIT"
        lines.append(f"peak {gib(est['peak_bytes'])} GiB of {gib(cap)} GiB{f' ({gpu})' if gpu else ''}: {verdict}, "
                     f"headroom {gib(cap - est['peak_bytes'])} GiB")
    comm = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in est["comm_bytes_per_step"].items()) or "none"
    lines.append(f"communication per step, rank 0 (MiB): {comm}")
    lines.append(f"FLOPs per rank per step: {est['flops_per_rank_per_step']:.4g}")
    return "\n".join(lines)
