"""python -m analysis report RUN_DIR_OR_GLOB... --out DIR  (also installed as `bench-report`, where the
`report` subcommand may be left out: `bench-report 'runs/*' --out DIR`)."""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from analysis import collect, plots, report, tables
from bench.config import BenchError
from bench.log import log, show


def build_parser():
    p = argparse.ArgumentParser(prog="python -m analysis", description="Turn benchmark runs into a comparison.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="tables, plots, report.md/html, CSV (and W&B table/report)")
    r.add_argument("runs", nargs="*", help="run directories, directories of runs, or globs")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--baseline", help="run name its job's comparison is relative to (default: each job's "
                                      "smallest completed run)")
    r.add_argument("--baseline-gpus", type=int, help="GPU count the scaling tables are relative to")
    r.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead of disk")
    r.add_argument("--group", help="with --wandb: only this W&B group")
    r.add_argument("--wandb-table", action="store_true", help="log the comparison as a wandb.Table + artifact")
    r.add_argument("--wandb-report", action="store_true", help="save a W&B Report (online) ")
    r.add_argument("--project", default="ds-parallel-bench", help="[ENTITY/]PROJECT for the W&B table and report")
    r.add_argument("--title", default="Parallelism strategy comparison")
    r.add_argument("--calibration", metavar="FILE", help="bench-plan --calibrate's file: each run's predicted step "
                                                          "beside its measured one")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("report", "-h", "--help"):
        argv = ["report", *argv]  # `report` is the only subcommand: bench-report RUNS --out DIR works as well
    args = build_parser().parse_args(argv)
    try:
        if args.wandb:
            runs = collect.from_wandb(args.wandb, args.group)
        elif args.runs:
            runs = collect.from_dirs(args.runs)
        else:
            raise ValueError("give run directories (or --wandb ENTITY/PROJECT)")
        os.makedirs(args.out, exist_ok=True)
        tables.check_baseline(runs, args.baseline)
        calibration = None
        if args.calibration:
            from bench.calibrate import load
            calibration = load(args.calibration)
        sections, everything = [], []
        for job, done in tables.by_job(runs).items():  # one section and one baseline per job
            baseline = tables.pick_baseline(done, args.baseline)
            comparison = tables.comparison(done, baseline, calibration)
            images, notes = plots.job_plots(done, args.out)
            sections.append({"job": job, "baseline": baseline.name, "comparison": comparison,
                             "scaling": tables.scaling_tables(done, args.baseline_gpus), "plots": images,
                             "notes": notes})
            everything += [{**row, "baseline": baseline.name} for row in comparison]  # W&B: one table
        tables.write_csv(runs, os.path.join(args.out, "runs.csv"))
        statuses = ", ".join(f"{n} {s}" for s, n in Counter(r.status for r in runs).items())
        intro = (f"{len(runs)} runs ({statuses}); {len(sections)} job(s) (model, sequence length, global batch, "
                 "data, precision, packing), each compared only with itself.")
        md, html_path = report.write(args.out, args.title, intro, sections, tables.incomplete(runs),
                                     tables.weak_scaling_tables(runs))
        show(f"wrote {md}, {html_path}, runs.csv and {sum(len(s['plots']) for s in sections)} plots to {args.out}")
        entity, _, project = args.project.rpartition("/")
        mode = os.environ.get("WANDB_MODE", "offline")
        if args.wandb_table:
            from analysis import wandb_export
            run_id = wandb_export.log_table(everything, project, entity or None, mode, args.out)
            show(f"W&B ({mode}): comparison table logged in run {run_id}")
        if args.wandb_report or args.wandb_table:
            from analysis import wandb_export
            rep = wandb_export.build_report(entity or os.environ.get("WANDB_ENTITY", ""), project, args.group,
                                            args.title)
            where = wandb_export.publish_or_save(rep, args.out, online=args.wandb_report and mode == "online")
            show(f"W&B report: {where}")
    except (OSError, ValueError, KeyError, BenchError) as e:
        log.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
