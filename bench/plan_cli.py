"""bench-plan: bench/run.py's flags plus --world_size N and --gpu NAME (or --gpu_memory_gib X) -> what each rank
of the layout will hold, move and compute, and whether it fits (bench/estimate.py); with --recommend, the shipped
layouts that fit the job, fastest predicted first (bench/recommend.py). The command line only: bench/plan.py
resolves the plans it prints."""
from __future__ import annotations

import contextlib
import json
import sys

from bench import calibrate, config, estimate, gpus, recommend
from bench.plan import plan_layout
from bench.plan_report import format_table
from bench.log import log, show


def main(argv=None) -> int:
    """bench-plan / python -m bench.plan_cli (the module's docstring says what it prints)."""
    p = config._Parser(prog="bench-plan", add_help=False)
    p.add_argument("--world_size", type=int, default=None)
    p.add_argument("--gpu", default=None)
    p.add_argument("--gpu_memory_gib", type=float, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--recommend", action="store_true")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--calibrate", nargs="+", default=None, metavar="RUN_DIR")
    p.add_argument("--calibration", default=None, metavar="FILE")
    p.add_argument("--out", default="calibration.json")
    p.add_argument("-h", "--help", action="store_true")
    try:
        opts, rest = p.parse_known_args(argv)
        if opts.help:
            show("bench-plan [bench/run.py flags] --world_size N [--gpu " + "|".join(gpus.plannable())
                  + " | --gpu_memory_gib X] [--json] [--recommend [--top N] [--calibration FILE]]\n"
                  "  bench-plan --calibrate RUN_DIR... [--gpu NAME] [--out FILE]\n  the memory, communication and "
                  "FLOPs each rank of the layout will have, and whether it fits the GPU; --recommend: for the job "
                  "(--peft none|lora, default none), the shipped layouts that fit, fastest predicted first "
                  "(docs/planner.md)")
            return 0
        if opts.calibrate:
            show(_calibrate(opts))
            return 0
        if opts.world_size is None or opts.world_size <= 0:
            raise config.BenchError("bench-plan needs --world_size N > 0: the processes the layout will run on")
        capacity = gpus.gpu_capacity(opts.gpu, opts.gpu_memory_gib)
        # DeepSpeed's logger writes to the stdout of its import: import it here, so stdout holds the plan alone
        # (--json is read by programs)
        with contextlib.redirect_stdout(sys.stderr):
            out, code = (_recommend if opts.recommend else _plan)(rest, opts, capacity)
    except config.BenchError as e:
        log.error(str(e))
        return 2
    show(out)
    return code


def _plan(rest: list[str], opts, capacity: int | None) -> tuple[str, int]:
    # A GPU plan resolves the ds_config as a GPU run would (bf16 "auto" on); without one, as this machine does.
    plan = plan_layout(rest, opts.world_size, opts.gpu or ("GPU" if capacity is not None else None))
    est = estimate.estimate(plan, capacity, device="cuda" if capacity is not None else plan.device_type)
    if opts.calibration:  # the fitted model's step for this layout (bench/calibrate.py)
        cal = calibrate.load(opts.calibration)
        est["calibrated_step"] = calibrate.breakdown(cal, calibrate.features(plan, est))
    out = json.dumps(est) if opts.json else plan.table() + "\n" + format_table(est, opts.gpu)
    if opts.calibration and not opts.json:
        step = est["calibrated_step"]
        out += (f"\npredicted step (calibrated, {opts.calibration}): {step['step_s']:.4g} s = compute "
                f"{step['compute_s']:.3g} + communication {step['communication_s']:.3g} + offload "
                f"{step['offload_s']:.3g} + overheads {step['overhead_s']:.3g}")
    return out, 0 if est["fits"] is not False else 1


def _recommend(rest: list[str], opts, capacity: int | None) -> tuple[str, int]:
    if opts.gpu is None:
        raise config.BenchError("--recommend needs --gpu NAME (its peak FLOP/s and links set the cost model)")
    if opts.top <= 0:
        raise config.BenchError(f"--top must be positive, got {opts.top}")
    for flag in ("--strategy", "--ds_config", "--micro_batch_size", "--activation_checkpointing"):
        if flag in rest:
            raise config.BenchError(f"--recommend chooses {flag} itself; leave it out")
    cal = calibrate.load(opts.calibration) if opts.calibration else None
    rows, notes = recommend.recommend(rest, opts.world_size, opts.gpu, capacity, opts.top, cal)
    out = json.dumps({"layouts": rows, "assumptions": notes}) if opts.json else recommend.format_rows(rows, notes)
    return out, 0 if rows else 1


def _calibrate(opts) -> str:
    """--calibrate RUN_DIR...: the fit written to --out; its constants and each run's residual, as text."""
    cal = calibrate.fit(calibrate.read_runs(opts.calibrate), calibrate.default_coefficients(opts.gpu), opts.gpu)
    with open(opts.out, "w") as fh:
        json.dump(cal, fh, indent=1)
    lines = [f"calibration of {len(cal['runs'])} runs on {', '.join(cal['device'])} (world sizes "
             f"{', '.join(map(str, cal['world_sizes']))}) written to {opts.out}; use it with --recommend "
             f"--calibration {opts.out}", *calibrate.describe(cal), "residual per run (measured - fitted, s):",
             *(f"  {run}: {r:+.4f}" for run, r in cal["residual_s"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
