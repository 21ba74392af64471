"""The cost model fitted to the user's own runs: `bench-plan --calibrate RUN_DIR...` reads completed runs and fits
a step time linear in what each run's plan says it computes and moves; `--recommend --calibration FILE` predicts
with the fit (docs/planner.md, "Calibration").

Every run records, beside its memory plan, the cost model's features (summary.json memory_plan.cost_features,
`features`): the slowest rank's FLOPs per step (a pipeline's slowest stage; activation checkpointing's second
forward included), the bytes its collectives move per step by kind and link (inside a node or beyond: the
planner's count, equal to the accounting's: tests/integration), the calls per step by kind of the collectives a layer or stage waits on (TP's,
EP's, SP's, the pipeline's: each pays the link's latency), the optimizer-state bytes offloaded to the host, the
micro-batches per step, and the share of a device each rank computes on (1 on a GPU; on the CPU, fewer cores than
ranks: bench/distributed.py device_share). The fit is

    step_s = (flops / F + sum_kind calls_kind x l_kind + micro_batches x m) / share
             + sum_kind,link bytes_kind,link / B_kind,link + offloaded / H + s

by non-negative least squares (every term costs time): F the sustained FLOP/s, l_kind the latency of a call of
that kind a layer waits on, m the cost per micro-batch (the work that does not scale with FLOPs: kernel launches,
Python), B_kind,link each collective kind's effective bandwidth on each link (what is not hidden behind compute,
per byte counted),
H the offload bandwidth and s the cost per step. A constant the runs do not exercise (its feature zero, or
constant over the runs) keeps its default and is marked so; one they exercise but whose time the fit cannot see
beside the others' is fitted to zero and marked so; each fitted one carries its standard error and the runs that
exercise it.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from bench.config import BenchError

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send_recv", "broadcast")
INTERNODE = tuple(f"{k}_internode" for k in KINDS)  # the bytes of collectives that reach beyond a node, by kind
CALLS = tuple(f"{k}_calls" for k in KINDS)  # the calls of each kind a layer or stage waits on
TERMS = ("flops", *KINDS, *INTERNODE, *CALLS, "offloaded", "micro_batches", "step")  # a feature each, its
#                                                                                     coefficient a constant
SHARED = ("flops", *CALLS, "micro_batches")  # work a rank does on its device: slower on a share of one
WIDTH = max(map(len, TERMS)) + 1  # describe's name column
VERSION = 2


def features(plan, est: dict) -> dict:
    """What a run of this plan computes and moves per optimizer step, as the fit reads it (module docstring)."""
    from bench.cost_model import spans_nodes
    from bench.estimate import comm_by_source, slowest_share
    recompute = 4 / 3 if plan.cfg.model.activation_checkpointing else 1.0
    per_rank = []  # each rank's bytes by kind, "_internode" where its source's collectives reach beyond a node
    for rank in range(plan.layout.world_size):
        moved = {}
        for source, kinds in comm_by_source(plan, rank).items():
            link = "_internode" if spans_nodes(plan, source) else ""
            for kind, n in kinds.items():
                moved[kind + link] = moved.get(kind + link, 0) + n
        per_rank.append(moved)
    return {"flops": est["flops_per_rank_per_step"] * slowest_share(plan) * recompute,
            **{k: max((r.get(k, 0) for r in per_rank), default=0) for k in (*KINDS, *INTERNODE)},
            **{f"{k}_calls": max((r.get(k, 0) for r in est["critical_calls_per_step_per_rank"]), default=0)
               for k in KINDS},
            "offloaded": max((r["offloaded_bytes"] for r in est["per_rank"]), default=0),
            "micro_batches": plan.batch.grad_accum, "step": 1, "device_share": plan.device_share}


def design(feats: dict) -> list[float]:
    """A run's features as the fit's row, in TERMS' order: the work a rank does on its device divided by the share
    of the device it has."""
    share = float(feats.get("device_share", 1.0))
    return [float(feats.get(t, 0)) / (share if t in SHARED else 1.0) for t in TERMS]


def default_coefficients(gpu: str | None) -> dict:
    """The uncalibrated cost model's constants (bench/cost_model.py) in the fit's linear form, seconds per unit of
    each feature for that GPU: its sustained FLOP/s, each link's bandwidth with the ring bus factors (an
    all-gather's logged shard counted once: the group it gathers from is not a feature), offload's PCIe and CPU
    Adam; no overlap, waves, latencies or overheads (0). What a calibration keeps for a constant its runs do not
    determine (all 0 without a GPU)."""
    from bench import cost_model, gpus
    out = {t: 0.0 for t in TERMS}
    if gpu:
        out["flops"] = 1 / (cost_model.peak_tflops(gpu) * 1e12 * cost_model.EFFICIENCY)
        bus = cost_model.BUS_FACTOR
        out.update({k: bus.get(k, 1.0) / gpus.BY_KEY[gpu].link_bytes_s for k in KINDS})
        out.update({f"{k}_internode": bus.get(k, 1.0) / cost_model.INTER_NODE for k in KINDS})
        out["offloaded"] = 2 / cost_model.PCIE + 1 / cost_model.CPU_ADAM
    return out


def read_runs(paths: list[str]) -> list[dict]:
    """Completed run directories -> read_run's rows; two at least (one per layout at least)."""
    if len(paths) < 2:
        raise BenchError("--calibrate needs two or more completed runs (one per layout at least)")
    return [read_run(path) for path in paths]


def read_run(path: str) -> dict:
    """A completed run directory -> {run, world_size, device, step_s, spread, features}. A run that did not
    complete, or was recorded before its plan carried the cost features, is refused in one line."""
    try:
        with open(os.path.join(path, "summary.json")) as fh:
            s = json.load(fh)
    except (OSError, ValueError) as e:
        raise BenchError(f"--calibrate {path}: no readable summary.json ({e})")
    if s.get("status") != "completed" or not (s.get("step_time_s") or {}).get("median"):
        raise BenchError(f"--calibrate {path}: status {s.get('status')!r}; only completed runs with measured "
                         "steps calibrate")
    found = (s.get("memory_plan") or {}).get("cost_features")
    if not found or set(TERMS) - set(found):
        raise BenchError(f"--calibrate {path}: its memory plan records no cost features, or not all of this "
                         "version's (recorded before them, or the planner could not plan it); rerun it")
    t = s["step_time_s"]
    try:  # the device as the run resolved it (config.json: bench/plan.py Plan.config)
        with open(os.path.join(path, "config.json")) as fh:
            device = json.load(fh).get("device") or {}
    except (OSError, ValueError):
        device = {}
    return {"run": os.path.basename(os.path.normpath(path)), "world_size": s.get("world_size"),
            "device": device.get("name") or device.get("type") or "unknown", "step_s": t["median"],
            "spread": [t.get("p10"), t.get("p90")], "features": found}


def fit(runs: list[dict], defaults: dict | None = None, gpu: str | None = None) -> dict:
    """Non-negative least squares over the runs -> the calibration: each constant's coefficient, standard error,
    whether it was fitted or kept at its default (defaults: {term: coefficient}, bench/cost_model.py
    default_coefficients for a GPU; else 0), and the runs that exercise it."""
    base = {**{t: 0.0 for t in TERMS}, **(defaults or {})}
    X = np.array([design(r["features"]) for r in runs])
    y = np.array([float(r["step_s"]) for r in runs])
    # a term the runs do not vary (or never exercise) cannot be told apart from the per-step constant: it keeps its
    # default, whose time (where its feature is not zero) is taken off the steps before the others are fitted
    varied = [j for j, t in enumerate(TERMS) if t == "step" or np.ptp(X[:, j]) > 0]
    fixed = [j for j in range(len(TERMS)) if j not in varied]
    offset = X[:, fixed] @ np.array([base[TERMS[j]] for j in fixed])
    scale = np.array([max(np.abs(X[:, j]).max(), 1e-30) for j in range(len(TERMS))])
    coef, active = _nnls(X[:, varied] / scale[varied], y - offset)
    coef = coef / scale[varied]
    fitted = {TERMS[j]: float(c) for j, c in zip(varied, coef)}
    used = [j for j, c in zip(varied, coef) if c > 0]
    resid = y - offset - X[:, varied] @ coef
    dof = len(runs) - len(used)
    errors = {}
    if used and dof > 0:  # the covariance of the scaled problem (columns of one magnitude), scaled back
        sigma2 = float(resid @ resid) / dof
        A = X[:, used] / scale[used]
        cov = sigma2 * np.linalg.pinv(A.T @ A)
        errors = {TERMS[j]: float(math.sqrt(max(cov[i, i], 0.0)) / scale[j]) for i, j in enumerate(used)}
    constants = {}
    for j, t in enumerate(TERMS):
        if j in used:  # no standard error where the runs are no more than the constants fitted
            constants[t] = {"coefficient": fitted[t], "stderr": errors.get(t), "source": "fitted",
                            "runs": [r["run"] for r in runs if r["features"].get(t, 0)]}
        elif j in varied:  # exercised, but its time is not seen beside the others': the data says negligible
            constants[t] = {"coefficient": 0.0, "stderr": None, "source": "fitted to zero (not seen beside the "
                            "other terms)", "runs": [r["run"] for r in runs if r["features"].get(t, 0)]}
        else:
            constants[t] = {"coefficient": base[t], "stderr": None, "source": "default (not varied by the runs)",
                            "runs": []}
    return {"version": VERSION, "device": sorted({r["device"] for r in runs}),
            "world_sizes": sorted({r["world_size"] for r in runs}), "runs": [r["run"] for r in runs],
            "gpu_defaults": gpu, "constants": constants,
            "residual_s": {r["run"]: float(e) for r, e in zip(runs, resid)}}


def _nnls(A: np.ndarray, y: np.ndarray, rounds: int = 50) -> tuple[np.ndarray, list[int]]:
    """min |A x - y| with x >= 0 (Lawson and Hanson's active set, small problems): -> (x, the free columns)."""
    n = A.shape[1]
    x, free = np.zeros(n), []
    for _ in range(rounds):
        w = A.T @ (y - A @ x)
        candidates = [j for j in range(n) if j not in free and w[j] > 1e-12]
        if not candidates:
            break
        free.append(max(candidates, key=lambda j: w[j]))
        while True:
            z = np.zeros(n)
            z[free] = np.linalg.lstsq(A[:, free], y, rcond=None)[0]
            if all(z[j] > 0 for j in free):
                x = z
                break
            ratios = [x[j] / (x[j] - z[j]) for j in free if z[j] <= 0]
            alpha = min(ratios)
            x = x + alpha * (z - x)
            free = [j for j in free if x[j] > 1e-15]
    return x, free


def predict(calibration: dict, feats: dict) -> float:
    """Seconds per step the calibration predicts for a plan's features."""
    return breakdown(calibration, feats)["step_s"]


def breakdown(calibration: dict, feats: dict) -> dict:
    """The prediction in the cost model's parts (bench/cost_model.py step_breakdown's keys): compute (the slowest
    rank's FLOPs, checkpointing's recompute and a pipeline's wait for its slowest stage included), communication,
    offload, and the overheads per micro-batch and per step, which the uncalibrated model has not."""
    term = {t: calibration["constants"][t]["coefficient"] * x for t, x in zip(TERMS, design(feats))}
    parts = {"compute_s": term["flops"], "recompute_s": 0.0, "bubble_s": 0.0,
             "communication_s": sum(term[k] for k in (*KINDS, *INTERNODE, *CALLS)), "offload_s": term["offloaded"],
             "overhead_s": term["micro_batches"] + term["step"]}
    return {**parts, "step_s": sum(parts.values())}


def load(path: str) -> dict:
    try:
        with open(path) as fh:
            cal = json.load(fh)
    except (OSError, ValueError) as e:
        raise BenchError(f"--calibration {path}: cannot read it ({e}); write one with bench-plan --calibrate")
    if cal.get("version") != VERSION or set(cal.get("constants", {})) != set(TERMS):
        raise BenchError(f"--calibration {path}: not a calibration of this version; write it again with "
                         "bench-plan --calibrate")
    return cal


def describe(calibration: dict) -> list[str]:
    """One line per constant: its value in its own unit, its standard error, fitted or default."""
    lines = []
    for t, c in calibration["constants"].items():
        k, e = c["coefficient"], c["stderr"]
        if t == "flops":
            value = f"sustained {1 / k / 1e12:.3g} TFLOP/s" if k else "free"
        elif t in KINDS or t in INTERNODE or t == "offloaded":
            where = " beyond a node" if t in INTERNODE else ""
            value = f"{1 / k / 1e9:.3g} GB/s effective{where}" if k else "free (hidden or unused)"
        else:
            per = f"{t[:-6]} call a layer or stage waits on" if t in CALLS else \
                {"micro_batches": "micro-batch"}.get(t, "step")
            value = f"{k * 1e3:.3g} ms per {per}"
        err = f" (coefficient {k:.3g} +/- {e:.2g})" if e is not None else ""
        runs = c["runs"]  # all of them in the file; here the first few
        shown = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
        lines.append(f"{t:<{WIDTH}}{value}{err}; {c['source']}" + (f"; {len(runs)} runs: {shown}" if runs else ""))
    return lines
