"""A sweep that calibrates itself (`python -m bench.sweep local|submit MATRIX --calibrate`): before the matrix, a
few short runs of its own layouts, chosen so that between them they exercise every constant of the cost model the
matrix's layouts need (bench/calibrate.py); the calibration fitted from them then ranks the whole matrix by its
predicted step, fastest first. `local` runs the matrix in that order; `submit` queues the matrix behind the
calibration jobs, and `python -m bench.sweep rank NAME` fits and ranks once they have ended.

Everything lands beside the sweep's own files: the calibration runs are jobs named calibrate-<job> (in
sweep.json, status and runs/ like the others), the fit in calibration.json, the ranking in ranking.json.
"""
from __future__ import annotations

import json
import os

from bench import calibrate
from bench.config import BenchError
from bench.log import log, show

PREFIX = "calibrate-"


def calibration_args(steps: int) -> list[str]:
    """What a calibration run adds after the sweep's own arguments: few steps, the first three untimed (the
    harness's warm-up), no evaluation."""
    if steps < 5:
        raise ValueError(f"--calibration_steps must be 5 or more (3 are warm-up), got {steps}")
    return ["--max_steps", str(steps), "--warmup_steps", "3", "--eval_interval", "0"]


def plan_features(matrix: list[dict], args_of, gpu: str | None = None) -> dict:
    """{job name: the cost features its plan predicts, as its run will record them (its memory plan's, bench/plan.py
    check_memory), or the one line saying why it cannot be planned}; args_of(entry) -> (job name, bench/run.py's
    arguments)."""
    from bench.plan import plan_layout
    out = {}
    for entry in matrix:
        name, args = args_of(entry)
        try:
            planned = plan_layout([*args, "--init", "random"], int(entry["gpus"]), gpu).memory_plan
        except BenchError as e:
            out[name] = str(e)
            continue
        out[name] = planned["cost_features"] if planned else "the planner cannot plan it (bench-plan says why)"
    return out


def choose(features: dict) -> list[str]:
    """The calibration set: the cheapest layout (least compute per device share), then, greedily, the layout that
    lets the fit see most of the constants still unseen (the cheaper among equals), until it sees every constant
    the matrix's layouts could show it: its feature differs between the chosen runs (bench/calibrate.py fit).
    Few runs, so fewer than the constants they show: the fit sets some to zero where its runs cannot tell them
    apart, and gives no standard error where they are no more than the constants it fits (a longer set: pass
    more runs to bench-plan --calibrate). Layouts that cannot be planned are left out."""
    rows = {n: calibrate.design(f) for n, f in features.items() if isinstance(f, dict)}
    if not rows:
        return []

    def seen(names):
        return {t for j, t in enumerate(calibrate.TERMS) if t != "step" and len({rows[n][j] for n in names}) > 1}

    def cost(name):
        return rows[name][calibrate.TERMS.index("flops")]
    chosen = [min(rows, key=cost)]
    wanted = seen(rows)
    while wanted - seen(chosen):  # each pick sees one more at least: a wanted constant differs from chosen[0]'s
        chosen.append(max((n for n in rows if n not in chosen),
                          key=lambda n: (len(seen([*chosen, n]) & wanted), -cost(n))))
    return chosen


def fit(sweep_dir: str, names: list[str], run_dir_of, gpu: str | None = None) -> dict | None:
    """The calibration from the calibration jobs that completed (run_dir_of(name) -> its run directory or None;
    gpu: whose uncalibrated constants the unseen ones keep), written to calibration.json; None, with a warning,
    when fewer than two completed."""
    dirs = [d for d in (run_dir_of(n) for n in names) if d]
    runs = []
    for d in dirs:
        try:
            runs.append(calibrate.read_run(d))
        except BenchError as e:
            log.warning(str(e))
    if len(runs) < 2:
        log.warning(f"{len(runs)} of {len(names)} calibration runs completed; a calibration needs two: the matrix "
                    "keeps its own order")
        return None
    cal = calibrate.fit(runs, calibrate.default_coefficients(gpu), gpu)
    with open(os.path.join(sweep_dir, "calibration.json"), "w") as fh:
        json.dump(cal, fh, indent=1)
    show(f"calibration from {len(runs)} runs written to {os.path.join(sweep_dir, 'calibration.json')}:")
    for line in calibrate.describe(cal):
        show(f"  {line}")
    return cal


def rank(sweep_dir: str, features: dict, cal: dict) -> list[str]:
    """Job names by the calibrated model's predicted step, fastest first (those that cannot be planned last),
    written to ranking.json and shown."""
    predicted = {n: calibrate.predict(cal, f) for n, f in features.items() if isinstance(f, dict)}
    order = sorted(predicted, key=predicted.get) + [n for n in features if n not in predicted]
    rows = [{"rank": i, "name": n, "predicted_step_s": predicted.get(n),
             "not_planned": None if n in predicted else features[n]} for i, n in enumerate(order, 1)]
    with open(os.path.join(sweep_dir, "ranking.json"), "w") as fh:
        json.dump(rows, fh, indent=2)
    show("the matrix by the calibrated model's predicted step, fastest first:")
    for r in rows:
        show(f"  {r['rank']:>3}. {r['name']:<40} " + (f"{r['predicted_step_s']:.4g} s" if r["predicted_step_s"]
                                                       is not None else f"not planned: {r['not_planned']}"))
    return order
