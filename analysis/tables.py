"""The report's tables: per job (model, sequence length, global batch, data, precision, packing), the seeds'
scaling tables and the strategy comparison against that job's baseline; the runs that did not complete, listed apart (never dropped, never mixed into results); a CSV of
everything. Ratios come from bench/metrics.py."""
from __future__ import annotations

import csv
from collections import Counter

from bench import metrics
from bench.summary import flatten
from analysis.collect import Run


def hms(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def by_job(runs: list[Run]) -> dict[str, list[Run]]:
    """Completed runs per job (Run.job), titled by Run.job_title, jobs in first-seen order: comparisons never
    cross jobs, so two runs of one model at different sequence lengths or batches are never one ratio. Two jobs
    whose data files share a name keep their titles apart by the data's whole path."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.ok:
            groups.setdefault(r.job, []).append(r)
    titles = Counter(members[0].job_title for members in groups.values())
    return {(m[0].job_title if titles[m[0].job_title] == 1 else f"{m[0].job_title} ({key[3]})"): m
            for key, m in groups.items()}


def incomplete(runs: list[Run]) -> list[dict]:
    """Runs that are still running, failed, ran out of memory or were stopped: listed apart from the results."""
    return [{"run": r.name, "model": r.model, "strategy": r.label, "GPUs": r.gpus, "status": r.status,
             "steps": _get(r, "steps"), "error": _get(r, "error")} for r in runs if not r.ok]


def memory_kind(runs: list[Run]) -> str:
    """What the device monitor's memory means for these runs: NVML device memory on GPUs, process RSS on CPUs."""
    kinds = {(r.config.get("device") or {}).get("type", "cuda") for r in runs}
    return "GPU memory" if kinds == {"cuda"} else "process RSS" if "cuda" not in kinds else "GPU memory / RSS"


def device0(run: Run) -> dict:
    devices = (run.summary.get("memory") or {}).get("device") or []
    return devices[0] if devices else {}


def peak_memory_mib(run: Run) -> float | None:
    """The highest peak any device of the run reached (NVML on GPUs; per-rank RSS on the CPU)."""
    peaks = [d.get("peak_mib") for d in (run.summary.get("memory") or {}).get("device") or [] if d.get("peak_mib")]
    return max(peaks) if peaks else None


def held_mib(run: Run, *kinds: str) -> float | None:
    """The most any rank holds of these kinds (summary.accounting: params, grads, optimizer, activation), in MiB;
    None when a run did not count them all (older runs, pipeline stages' activations)."""
    ranks = (run.summary.get("accounting") or {}).get("per_rank") or []
    totals = [[r.get(f"{k}_bytes") for k in kinds] for r in ranks]
    if not totals or any(v is None for t in totals for v in t):
        return None
    return max(sum(t) for t in totals) / 2**20


def comm_mib(run: Run) -> float | None:
    """The most any rank sends through DeepSpeed's collectives in one step, all kinds (summary.accounting)."""
    ranks = (run.summary.get("accounting") or {}).get("per_rank") or []
    per_rank = [r.get("comm_bytes_per_step") for r in ranks]
    if not per_rank or any(c is None for c in per_rank):
        return None
    return max(sum(c.values()) for c in per_rank) / 2**20


def attention(run: Run) -> str | None:
    """The attention path that ran (summary.attention), e.g. 'sdpa per document, documents'; None before it was
    recorded."""
    a = run.summary.get("attention")
    return f"{a['kernel']}, {a['mask']}" if a else None


def _get(run: Run, *keys):
    node = run.summary
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node


def family(run: Run) -> tuple:
    """Runs that form one scaling series: same job and strategy as compared (Run.strategy: ZeRO stage, what the
    engine keeps elsewhere, peft, checkpointing, tiling, compiled); only the GPU count varies."""
    return run.job, run.strategy


def series(runs: list[Run]) -> dict[tuple, list[Run]]:
    """Completed runs by scaling series (family), each ordered by GPUs."""
    out: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.ok:
            out.setdefault(family(r), []).append(r)
    return {key: sorted(members, key=lambda r: (r.gpus, r.name)) for key, members in out.items()}


def scaling_tables(runs: list[Run], baseline_gpus: int | None = None) -> dict[str, list[dict]]:
    """{series title: rows} for the series of completed runs measured at two or more GPU counts (one run scales
    against nothing), one row per run ordered by GPUs; baseline = the series' smallest GPU count (or
    baseline_gpus). The job is the report section's title: a series is named by its strategy alone."""
    out = {}
    for members in series(runs).values():
        if len({r.gpus for r in members}) < 2:
            continue
        base = next((r for r in members if r.gpus == baseline_gpus), None) if baseline_gpus else None
        base = base or members[0]
        dev = "GPU0" if memory_kind(members) == "GPU memory" else "rank 0 RSS"
        rows = []
        for r in members:
            d0 = device0(r)
            rows.append({
                "run": r.name, "GPUs": r.gpus, "batch per GPU": _get(r, "micro_batch_size"),
                "total job time": hms(_get(r, "total_wall_time_s")),
                "train step time (s)": _get(r, "step_time_s", "median"),
                "last train loss": _get(r, "loss", "last"),
                f"{dev} peak (MiB)": d0.get("peak_mib"), f"{dev} avg (MiB)": d0.get("avg_mib"),
                f"{dev} mode (MiB)": d0.get("mode_mib"),
                "time scaling (t_base/t_N)": metrics.ratio(_get(base, "total_wall_time_s"),
                                                           _get(r, "total_wall_time_s")),
                "memory scaling (peak_base/peak_N)": metrics.ratio(device0(base).get("peak_mib"), d0.get("peak_mib")),
            })
        out[f"{members[0].strategy} (baseline {base.gpus} GPU{'s' if base.gpus > 1 else ''})"] = rows
    return out


def weak_scaling_tables(runs: list[Run]) -> dict[str, list[dict]]:
    """{series title: rows} for weak scaling: runs of one model, sequence, data, precision, batching and strategy
    that keep the samples per GPU per step (global batch / GPUs) and grow the global batch with the GPUs, as the
    seeds' data-parallel track does. Each GPU count is then its own job (no job section compares them); here they
    are one series, at two or more GPU counts: tokens/s per GPU and scaling efficiency against the series'
    smallest GPU count (bench/metrics.py scaling_efficiency: tokens/s_N / (tokens/s_base x N / N_base), which for
    a fixed batch per GPU is the per-GPU throughput's ratio)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        model, seq, batch, data, precision, batching = r.job
        if r.ok and r.gpus and batch:
            groups.setdefault((model, seq, data, precision, batching, r.strategy, batch / r.gpus), []).append(r)
    out = {}
    for key, members in groups.items():
        if len({r.gpus for r in members}) < 2:
            continue
        members = sorted(members, key=lambda r: (r.gpus, r.name))
        base, per_gpu = members[0], key[-1]
        job = base.job_title.replace(f"global batch {base.job[2]}, ", "")
        rows = [{"run": r.name, "GPUs": r.gpus, "global batch": r.job[2], "tokens/s": _get(r, "tokens_per_s"),
                 "tokens/s/GPU": _get(r, "tokens_per_s_per_gpu"),
                 "scaling efficiency": metrics.scaling_efficiency(_get(r, "tokens_per_s"), r.gpus,
                                                                  _get(base, "tokens_per_s"), base.gpus),
                 "train step time (s)": _get(r, "step_time_s", "median")} for r in members]
        out[f"{job}: {base.strategy}, {per_gpu:g} samples per GPU per step (baseline {base.gpus} "
            f"GPU{'s' if base.gpus > 1 else ''})"] = rows
    return out


def pick_baseline(runs: list[Run], name: str | None) -> Run | None:
    """The named run if it belongs to these runs, else the smallest completed one."""
    if name:
        for r in runs:
            if r.name == name:
                return r
    done = sorted((r for r in runs if r.ok), key=lambda r: (r.gpus, r.name))
    return done[0] if done else None


def check_baseline(runs: list[Run], name: str | None) -> None:
    if name and not any(r.name == name for r in runs):
        raise ValueError(f"--baseline {name!r} is not one of the runs: {', '.join(r.name for r in runs)}")
    if name and not next(r for r in runs if r.name == name).ok:
        raise ValueError(f"--baseline {name!r} did not complete; choose a completed run")


MODEL_STATES = ("params", "grads", "optimizer")


def comparison(runs: list[Run], baseline: Run | None, calibration: dict | None = None) -> list[dict]:
    """The LoRA study's summary for one model's completed runs: time reduction, throughput increase and memory
    reduction against the baseline (same workload assumed: same steps and global batch), plus efficiency and
    statistical efficiency. With a calibration (bench-plan --calibrate), each run's predicted step beside its
    measured one (predicted_step); without one, the uncalibrated cost model's where a run on a GPU recorded it."""
    rows = []
    predicts = calibration or any(_get(r, "memory_plan", "predicted_step") for r in runs)
    mem = f"peak {memory_kind(runs)} (MiB)"
    for r in sorted(runs, key=lambda r: (r is not baseline, r.gpus, r.label)):  # baseline on top
        b = baseline
        rows.append({
            "run": r.name, "strategy": r.label, "GPUs": r.gpus, "attention": attention(r),
            "slowest / fastest rank": _get(r, "step_time_by_rank", "slowest_over_fastest"),
            "time reduction (x)": metrics.ratio(b and _get(b, "total_wall_time_s"), _get(r, "total_wall_time_s")),
            "throughput increase (x)": metrics.ratio(_get(r, "tokens_per_s"), b and _get(b, "tokens_per_s")),
            "memory reduction (x)": metrics.ratio(b and peak_memory_mib(b), peak_memory_mib(r)),
            "tokens/s/GPU": _get(r, "tokens_per_s_per_gpu"),
            "computed tokens/s/GPU": _get(r, "computed_tokens_per_s_per_gpu"), "MFU": _get(r, "mfu"),
            "HFU": _get(r, "hfu"),
            "goodput (target tokens/s)": _get(r, "goodput", "tokens_per_s"),
            "time to target (s)": _get(r, "time_to_target_s"), mem: peak_memory_mib(r),
            # What the strategy divides, counted from the tensors (on the CPU, RSS hides it under the runtime's own)
            "model-state reduction (x)": metrics.ratio(b and held_mib(b, *MODEL_STATES), held_mib(r, *MODEL_STATES)),
            "model states / rank (MiB)": held_mib(r, *MODEL_STATES),
            "activations / rank (MiB)": held_mib(r, "activation"),
            "communication / rank / step (MiB)": comm_mib(r),
            **(predicted_step(r, calibration) if predicts else {}),
        })
    return rows


EXPLAINED = (0.7, 1.3)  # measured / predicted step inside this: the cost model explains the run


def predicted_step(run: Run, calibration: dict | None) -> dict:
    """The cost model's step beside the measured median and whether their ratio lies in EXPLAINED: the calibrated
    model's for the run's recorded cost features (bench/calibrate.py), or without a calibration the uncalibrated
    model's the run recorded (on a catalog GPU: bench/plan.py check_memory); None where the run recorded neither."""
    from bench import calibrate
    if calibration:
        feats = _get(run, "memory_plan", "cost_features")
        predicted, by = (calibrate.predict(calibration, feats), "calibrated") if feats else (None, None)
    else:
        recorded = _get(run, "memory_plan", "predicted_step") or {}
        predicted = recorded.get("step_s")
        by = f"cost model, {recorded['gpu']} constants (uncalibrated)" if predicted else None
    measured = metrics.ratio(_get(run, "step_time_s", "median"), predicted)
    explained = None if measured is None else (
        "yes" if EXPLAINED[0] <= measured <= EXPLAINED[1] else "no: the model does not explain this run")
    return {"predicted step (s)": predicted, "predicted by": by, "measured / predicted": measured,
            "model explains it": explained}


def write_csv(runs: list[Run], path: str) -> None:
    """Every run, every summary field (nested keys joined with '/', lists as JSON)."""
    flat = [{"run": r.name, "path": r.path, **flatten(r.summary, lists_as_json=True)} for r in runs]
    keys = list(dict.fromkeys(k for row in flat for k in row))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
