"""Every formula the harness reports, in one place (docs/metrics.md documents each one), except parameter counts
and FLOPs per token, which depend on the architecture and live in bench/models.py (count_params_from_config,
flops_per_token).

Inputs are plain numbers gathered by the training loop, so each formula is testable without a run.
"""
from __future__ import annotations

import math
import os
import statistics
from collections import Counter

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def step_time_stats(step_times: list[float]) -> dict:
    """Statistics over measured (post-warm-up) steps; each entry is already the slowest rank's time."""
    if not step_times:
        return {"median": None, "mean": None, "p10": None, "p90": None}
    return {"median": statistics.median(step_times), "mean": statistics.fmean(step_times),
            "p10": percentile(step_times, 10), "p90": percentile(step_times, 90)}


def rank_step_time_stats(rank_step_times: list[list[float]]) -> dict:
    """Per rank, {min, median, max} of its own step times over the measured steps, and the slowest rank (the
    highest median) with its median over the fastest rank's (1.0: no straggler). rank_step_times: per measured
    step, every rank's time (each rank's clock started together, bench/train.py)."""
    if not rank_step_times:
        return {"per_rank": [], "slowest_rank": None, "slowest_over_fastest": None}
    per_rank = [{"rank": r, "min": min(ts), "median": statistics.median(ts), "max": max(ts)}
                for r, ts in enumerate(zip(*rank_step_times))]
    slowest = max(per_rank, key=lambda x: x["median"])
    fastest = min(x["median"] for x in per_rank)
    return {"per_rank": per_rank, "slowest_rank": slowest["rank"],
            "slowest_over_fastest": slowest["median"] / fastest if fastest > 0 else None}


def throughput(step_times: list[float], work: list[int], global_batch: int, world_size: int,
               model_flops: tuple[float, float], hardware_flops: tuple[float, float],
               peak_tflops: float | None) -> dict:
    """Throughput over the measured steps: total work / total time (equivalently per-step work / mean time).

    work: [real tokens, computed tokens, real attention pairs, computed attention pairs] summed over those steps'
    global batches (bench/data.py MicroBatch.work). Two token counts, as the peers separate them: real tokens (the
    samples' own, no padding) give tokens_per_s, the model TFLOP/s and MFU, as NeMo and torchtitan report them,
    attention counted per sample; computed tokens (every position of every row, padding included: what the
    device processed) give computed_tokens_per_s and the hardware TFLOP/s behind HFU, attention counted per row
    as SDPA computes it, plus activation checkpointing's recomputed forward. model_flops and hardware_flops are
    (per token, per attention pair) FLOPs (bench/models.py flop_coefficients)."""
    keys = ("tokens_per_s", "tokens_per_s_per_gpu", "computed_tokens_per_s", "computed_tokens_per_s_per_gpu",
            "samples_per_s", "tflops_per_gpu", "mfu", "hfu")
    if not step_times:
        return dict.fromkeys(keys)
    seconds = sum(step_times)
    real, computed, real_pairs, computed_pairs = work
    tflops = (model_flops[0] * real + model_flops[1] * real_pairs) / seconds / world_size / 1e12
    hardware_tflops = (hardware_flops[0] * computed + hardware_flops[1] * computed_pairs) / seconds / world_size / 1e12
    return {"tokens_per_s": real / seconds, "tokens_per_s_per_gpu": real / seconds / world_size,
            "computed_tokens_per_s": computed / seconds,
            "computed_tokens_per_s_per_gpu": computed / seconds / world_size,
            "samples_per_s": global_batch / statistics.fmean(step_times),
            "tflops_per_gpu": tflops, "mfu": (tflops / peak_tflops) if peak_tflops else None,
            "hfu": (hardware_tflops / peak_tflops) if peak_tflops else None}


def goodput(applied_updates: int, useful_tokens: int, train_wall_s: float) -> dict:
    """Useful work per second of the whole training phase (eval, stalls and warm-up included).

    applied_updates excludes skipped (overflow) steps; useful_tokens counts the non-padding target tokens
    (labels != ignore) of applied steps only.
    """
    if train_wall_s <= 0:
        return {"updates_per_s": None, "tokens_per_s": None}
    return {"updates_per_s": applied_updates / train_wall_s, "tokens_per_s": useful_tokens / train_wall_s}


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """1F1B's idle fraction per stage when every stage takes the same time: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def idle_fraction(busy_s: float, step_s: float) -> float | None:
    """Share of the step a stage spent not computing (waiting on sends/receives: the measured bubble)."""
    return None if step_s <= 0 else max(0.0, 1.0 - busy_s / step_s)


def time_to_target(losses: list[tuple[int, float, float]], target: float | None) -> tuple:
    """losses: (step, loss, seconds since training start). -> (time_to_target_s, steps_to_target)."""
    if target is None:
        return None, None
    for step, loss, elapsed in losses:
        if loss <= target:
            return elapsed, step
    return None, None


def device_stats(memory_mib: list[float], util_pct: list[float]) -> dict:
    """One device's monitor samples -> peak, mean and mode memory (mode over whole MiB, the seeds'
    nvidia-smi view) and mean utilization."""
    if not memory_mib:
        return {"peak_mib": None, "avg_mib": None, "mode_mib": None, "util_avg_pct": None}
    mode = Counter(round(v) for v in memory_mib).most_common(1)[0][0]
    return {"peak_mib": max(memory_mib), "avg_mib": statistics.fmean(memory_mib), "mode_mib": float(mode),
            "util_avg_pct": statistics.fmean(util_pct) if util_pct else None}


def plan_check(planned_total_bytes: list[int], training_peak_mib: list[float | None]) -> dict | None:
    """The planner's per-rank device total beside the allocator's training peak, rank by rank (GPU runs; on the
    CPU there is no allocator peak and this is None). ratio = measured / planned on the rank with the largest
    planned total; the planner's total also holds a CUDA-context allowance the allocator never sees."""
    if not planned_total_bytes or any(m is None for m in training_peak_mib):
        return None
    worst = max(range(len(planned_total_bytes)), key=lambda r: planned_total_bytes[r])
    planned = planned_total_bytes[worst] / 2**20
    measured = training_peak_mib[worst]
    return {"rank": worst, "planned_mib": planned, "training_peak_allocated_mib": measured,
            "ratio": measured / planned if planned else None}


def current_rss_mib() -> float:
    """Resident memory now. Read every step, so from /proc directly where it exists (10 us, against 120 us for
    psutil's full memory_info)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE / 2**20
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss / 2**20


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---------------------------------------------------------------------------------------------------------
# Comparisons between runs (analysis/)

def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0. Used as
    time scaling t_base / t_N, memory scaling peak_base / peak_N, time reduction t_base / t,
    throughput increase tput / tput_base and memory reduction peak_base / peak."""
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def ideal_throughput(tput_base: float, gpus_base: int, gpus_n: int) -> float:
    """Linear scaling from the baseline: tput_base * N / N_base."""
    return tput_base * gpus_n / gpus_base


def scaling_efficiency(tput_n: float | None, gpus_n: int, tput_base: float | None, gpus_base: int) -> float | None:
    """Throughput at N GPUs over ideal linear scaling from the baseline: tput_N / (tput_base * N / N_base)."""
    if tput_n is None or not tput_base or not gpus_n or not gpus_base:
        return None
    return tput_n / ideal_throughput(tput_base, gpus_base, gpus_n)


def throughput_spread(tokens_per_s: float | None, step_time: dict) -> tuple[float, float] | None:
    """(low, high) tokens/s had every measured step taken the p90 / the p10 step time: tokens_per_s is work over
    the mean step time, so the same work over another step time t is tokens_per_s x mean / t. One slow step can
    lift the mean above p90: the range then still includes tokens_per_s itself."""
    mean, p10, p90 = (step_time or {}).get("mean"), (step_time or {}).get("p10"), (step_time or {}).get("p90")
    if not tokens_per_s or not mean or not p10 or not p90:
        return None
    return min(tokens_per_s, tokens_per_s * mean / p90), max(tokens_per_s, tokens_per_s * mean / p10)
