"""Submit a whole matrix of runs to SLURM and follow it: one generated sbatch script per (model, strategy,
ds_config, GPUs), and a status per job that can be listed at any time.

    python -m bench.sweep submit MATRIX.json --name NAME [--dry_run] [-- extra bench/run.py args]
    python -m bench.sweep local MATRIX.json --name NAME [-- extra bench/run.py args]
    python -m bench.sweep status NAME
    python -m bench.sweep local|submit MATRIX.json --name NAME --calibrate [--calibration_steps 10] ...
    python -m bench.sweep rank NAME

MATRIX.json is a list of {"model", "strategy", "ds_config", "gpus", optional "args": [...], "sbatch": [...],
"name"}. Everything lands in sweeps/NAME/: jobs/<job>.sh (the scripts, which source slurm/common.sh like the
hand-written ones), runs/<job>*/ (each run's directory), sweep.json (job ids) and status.json (the last listing).
`local` runs the same matrix on this machine, one job after another under the deepspeed launcher (one node, no
SLURM: a workstation, or the CPU), with each job's output in logs/<job>.log and the same status listing.
A job's status comes from its run's summary.json where one exists, corrected by SLURM's own job state (a job
killed at its time limit leaves a summary that still says "running"). With --calibrate, a few short runs of the
matrix's own layouts come first and the cost model fitted from them ranks the matrix (bench/sweep_calibration.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import slurm_scripts, sweep_calibration
from bench.log import log, show
from bench.distributed import free_port
from bench.gpus import GPUS_PER_NODE
from bench.loggers import read_records
from bench.liveness import run_state

# SLURM job states -> the sweep's statuses
SLURM_STATES = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "RUNNING": "running",
                "COMPLETING": "running", "COMPLETED": "completed", "FAILED": "failed", "NODE_FAIL": "failed",
                "BOOT_FAIL": "failed", "OUT_OF_MEMORY": "oom", "TIMEOUT": "timeout", "DEADLINE": "timeout",
                "PREEMPTED": "preempted", "CANCELLED": "cancelled"}


def job_name(entry: dict) -> str:
    """The entry's job and run name: model, strategy, ds_config, the --peft its args choose (LoRA and a full
    fine-tune of one layout are different experiments), "compiled" when they say --compile on, and GPUs; or its
    own "name"."""
    model = entry["model"].replace("/", "-").replace(".", "")
    cfg = os.path.splitext(os.path.basename(entry["ds_config"]))[0]
    args = entry.get("args", [])
    peft = f"-{args[args.index('--peft') + 1]}" if "--peft" in args[:-1] else ""
    compiled = "-compiled" if "--compile" in args[:-1] and args[args.index("--compile") + 1] == "on" else ""
    return entry.get("name") or f"{model}-{entry['strategy']}-{cfg}{peft}{compiled}-{entry['gpus']}g"


def check_names(matrix: list[dict]) -> None:
    """Two entries with one name would share a run directory (and resume each other): refuse."""
    seen = {}
    for entry in matrix:
        name = job_name(entry)
        if name in seen:
            raise ValueError(f"matrix entries {seen[name]} and {entry} have the same job name {name!r}; give one a "
                             "\"name\" or different args")
        seen[name] = entry


def render(entry: dict, sweep_dir: str, extra: list[str], cpus: int = 8, time_limit: str = "02:00:00") -> str:
    """The entry's job script, from the template the shipped scripts use (bench/slurm_scripts.py)."""
    try:
        return slurm_scripts.render(job_name(entry), int(entry["gpus"]), run_args(entry, sweep_dir, extra),
                                    log_dir=os.path.join(sweep_dir, "logs"), cpus=cpus, time_limit=time_limit)
    except ValueError as e:
        raise ValueError(f"{job_name(entry)}: {e}") from None


def run_args(entry: dict, sweep_dir: str, extra: list[str]) -> list[str]:
    """bench/run.py's arguments for one matrix entry: the entry's own, then the sweep-wide extras (which win)."""
    return ["--strategy", entry["strategy"], "--ds_config", entry["ds_config"], "--model", entry["model"],
            "--output_dir", os.path.join(sweep_dir, "runs"), "--run_name", job_name(entry), *entry.get("args", []),
            *extra]


def check_fits(matrix: list[dict], extra: list[str], gpu: str) -> None:
    """Every entry planned on its GPUs before anything is queued (bench/estimate.py): an entry predicted not to
    fit is refused with the same line a GPU run would give, so a matrix never waits in the queue to fail."""
    from bench.gpus import gpu_capacity
    from bench.config import BenchError
    from bench.plan import check_memory, plan_layout
    for entry in matrix:
        try:
            plan = plan_layout([*run_args(entry, "sweeps", extra), "--init", "random"], int(entry["gpus"]), gpu)
            check_memory(plan, gpu_capacity(gpu, None))
        except BenchError as e:
            raise ValueError(f"{job_name(entry)}: {e}") from None


def submit(matrix: list[dict], sweep_dir: str, extra: list[str], dry_run: bool, prior: list[dict] = (),
           after: list[str] = (), gpu: str | None = None) -> list[dict]:
    """One sbatch job per entry; sweep.json lists the prior jobs (a calibration set) and these. after: job ids
    every one of these waits for (SLURM's --dependency=afterany); gpu: the --gpu the matrix was planned on, kept
    for `rank`."""
    os.makedirs(os.path.join(sweep_dir, "jobs"), exist_ok=True)
    os.makedirs(os.path.join(sweep_dir, "logs"), exist_ok=True)
    jobs = []
    wait = [f"--dependency=afterany:{':'.join(after)}"] if after else []
    for entry in matrix:
        name = job_name(entry)
        path = os.path.join(sweep_dir, "jobs", f"{name}.sh")
        with open(path, "w") as fh:
            fh.write(render(entry, sweep_dir, extra))
        job = {"name": name, "script": path, "entry": entry, "extra": list(extra), "gpu": gpu, "job_id": None,
               "submitted": time.time()}
        if not dry_run:
            out = subprocess.run(["sbatch", "--parsable", *wait, *entry.get("sbatch", []), path],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"sbatch {path} failed: {out.stderr.strip()}")
            job["job_id"] = out.stdout.strip().split(";")[0]
        jobs.append(job)
        show(f"{'wrote' if dry_run else 'submitted ' + job['job_id']}: {path}")
    _write_jobs(sweep_dir, [*prior, *jobs])
    return jobs


def run_local(matrix: list[dict], sweep_dir: str, extra: list[str], poll_s: float = 5.0,
              prior: list[dict] = ()) -> list[dict]:
    """Run every entry here, one after another; sweep.json (the prior jobs, then these) is rewritten after each
    job so `status` can follow, and a progress line (job i of N, its status and step) is printed while each job
    runs."""
    os.makedirs(os.path.join(sweep_dir, "logs"), exist_ok=True)
    check_one_node(matrix)
    jobs = [{"name": job_name(e), "script": None, "entry": e, "extra": list(extra), "job_id": None,
             "returncode": None} for e in matrix]
    entry_point = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")
    for i, job in enumerate(jobs, 1):
        job["submitted"] = time.time()
        _write_jobs(sweep_dir, [*prior, *jobs])
        log = os.path.join(sweep_dir, "logs", f"{job['name']}.log")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(job["entry"]["gpus"]),
               "--master_port", str(free_port()), entry_point, *run_args(job["entry"], sweep_dir, extra)]
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                show(f"[{i}/{len(jobs)}] {job['name']}: {_progress(sweep_dir, job)}")
                try:
                    proc.wait(timeout=poll_s)
                except subprocess.TimeoutExpired:
                    pass
            job["returncode"] = proc.returncode
        summary = run_summary(sweep_dir, job["name"], since=job["submitted"])
        show(f"[{i}/{len(jobs)}] {job['name']}: {combine(summary and summary.get('status'), local_state(job))} "
             f"(exit {job['returncode']}, log: {log})")
    _write_jobs(sweep_dir, [*prior, *jobs])
    return jobs


def planned_features(matrix: list[dict], extra: list[str], gpu: str | None) -> dict:
    """{job name: its planned cost features, or why it cannot be planned} (bench/sweep_calibration.py)."""
    return sweep_calibration.plan_features(matrix, lambda e: (job_name(e), run_args(e, "sweeps", extra)), gpu)


def check_one_node(matrix: list[dict]) -> None:
    """`local` runs on this one machine: an entry that needs more GPUs than a node has is refused before anything
    runs."""
    for entry in matrix:
        if int(entry["gpus"]) > GPUS_PER_NODE:
            raise ValueError(f"{job_name(entry)}: {entry['gpus']} GPUs need more than one node; use `submit`")


def calibration_entries(matrix: list[dict], extra: list[str], gpu: str | None) -> tuple[list[dict], dict]:
    """(the calibration set's entries, renamed calibrate-<job>; every entry's planned cost features)."""
    features = planned_features(matrix, extra, gpu)
    chosen = set(sweep_calibration.choose(features))
    return [{**e, "name": sweep_calibration.PREFIX + job_name(e)} for e in matrix if job_name(e) in chosen], features


def calibrate_and_rank(sweep_dir: str, matrix: list[dict], extra: list[str], gpu: str | None,
                       features: dict | None = None) -> list[dict]:
    """The calibration from the sweep's completed calibration jobs, and the matrix ranked by it (unchanged when
    fewer than two completed)."""
    with open(os.path.join(sweep_dir, "sweep.json")) as fh:
        names = [j["name"] for j in json.load(fh) if j["name"].startswith(sweep_calibration.PREFIX)]
    if not names:
        raise ValueError(f"{sweep_dir} has no calibration jobs (it was run without --calibrate, or had fewer than "
                         "two layouts to calibrate on); nothing to rank by")

    def run_dir(name):  # where the sweep keeps it (a run's own run_dir is relative to where it was launched)
        found = run_directory(sweep_dir, name)
        return found and found[0]
    cal = sweep_calibration.fit(sweep_dir, names, run_dir, gpu)
    if cal is None:
        return matrix
    order = sweep_calibration.rank(sweep_dir, features or planned_features(matrix, extra, gpu), cal)
    return sorted(matrix, key=lambda e: order.index(job_name(e)))


def _progress(sweep_dir: str, job: dict) -> str:
    """'starting', or 'running, step k/N' from the run's own records while it trains."""
    summary = run_summary(sweep_dir, job["name"], since=job["submitted"])
    if summary is None or not summary.get("run_dir"):
        return "starting"
    try:
        steps = len(read_records(os.path.join(summary["run_dir"], "metrics.jsonl")))
    except OSError:
        steps = 0
    return f"{summary.get('status')}, step {steps}/{summary.get('max_steps')}"


def _write_jobs(sweep_dir: str, jobs: list[dict]) -> None:
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as fh:
        json.dump(jobs, fh, indent=2)


def local_state(job: dict) -> str | None:
    """A local job's state from its process (pending, running, exited 0 or not), in the terms `combine` reads."""
    if "returncode" not in job:
        return None
    if job["returncode"] is None:
        return "RUNNING" if "submitted" in job else "PENDING"
    return "COMPLETED" if job["returncode"] == 0 else "FAILED"


def slurm_state(job_id: str | None) -> str | None:
    """The job's SLURM state from the controller (None once it has forgotten the job)."""
    if not job_id:
        return None
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    for token in out.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return None


def run_summary(sweep_dir: str, name: str, since: float | None = None) -> dict | None:
    """The summary of this job's newest run directory (run_directory)."""
    found = run_directory(sweep_dir, name, since)
    return found and found[1]


def run_directory(sweep_dir: str, name: str, since: float | None = None) -> tuple[str, dict] | None:
    """(the newest run directory of this job with a readable summary.json, that summary): a requeued job's rerun
    adds name-2, ...; with `since`, only one written since then (not a directory an earlier sweep of the same name
    left)."""
    runs = os.path.join(sweep_dir, "runs")
    dirs = [os.path.join(runs, d) for d in os.listdir(runs)] if os.path.isdir(runs) else []
    dirs = [d for d in dirs if (os.path.basename(d) == name or os.path.basename(d).startswith(name + "-"))
            and (since is None or os.path.getmtime(d) >= since)]
    for d in sorted(dirs, key=os.path.getmtime, reverse=True):
        try:
            with open(os.path.join(d, "summary.json")) as fh:
                return d, json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
    return None


def _status(summary: dict | None) -> str | None:
    """The run's own status, `lost` when it says running but no rank has beaten for a while (bench/liveness.py)."""
    if not summary:
        return None
    return run_state(summary["run_dir"], summary.get("status"))[0] if summary.get("run_dir") else summary.get("status")


def combine(summary_status: str | None, state: str | None) -> str:
    """One status from the run's own record and SLURM's view of the job."""
    slurm = SLURM_STATES.get((state or "").split("+")[0]) if state else None
    if summary_status == "lost" and slurm in ("pending", "running"):
        return slurm  # a requeued job: its next attempt resumes the lost run
    if slurm in ("timeout", "oom", "cancelled") and summary_status in (None, "running", "lost"):
        return slurm  # killed from outside: the run could not write its own ending
    if summary_status and summary_status != "running":
        return summary_status
    if slurm in ("pending", "running"):
        return slurm
    if summary_status == "running" or slurm in ("completed", "failed"):
        return "failed"  # the job ended without the run recording an ending
    return slurm or "unknown"


def status(sweep_dir: str) -> list[dict]:
    with open(os.path.join(sweep_dir, "sweep.json")) as fh:
        jobs = json.load(fh)
    rows = []
    for job in jobs:
        summary = run_summary(sweep_dir, job["name"])
        local = not job["job_id"]
        state = local_state(job) if local else slurm_state(job["job_id"])
        rows.append({"name": job["name"], "job_id": job["job_id"], "runner": "local" if local else "slurm",
                     "slurm_state": None if local else state,
                     "exit_code": job.get("returncode") if local else None,
                     "status": combine(_status(summary), state),
                     "error": summary and summary.get("error"), "run_dir": summary and summary.get("run_dir")})
    with open(os.path.join(sweep_dir, "status.json"), "w") as fh:
        json.dump(rows, fh, indent=2)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", help="write and submit one sbatch job per matrix entry")
    s.add_argument("matrix")
    s.add_argument("--name", required=True)
    s.add_argument("--sweeps_dir", default="sweeps")
    s.add_argument("--dry_run", action="store_true", help="write the scripts, submit nothing")
    s.add_argument("--gpu", default=None, help="plan every entry on this GPU first (bench-plan's names) and refuse "
                   "the matrix if one is predicted not to fit")
    lo = sub.add_parser("local", help="run every matrix entry on this machine, one after another (no SLURM)")
    lo.add_argument("matrix")
    lo.add_argument("--name", required=True)
    lo.add_argument("--sweeps_dir", default="sweeps")
    for parser in (s, lo):
        parser.add_argument("--calibrate", action="store_true", help="first run a few short runs of the matrix's "
                            "layouts that exercise every cost-model constant, fit it, and rank the matrix by it")
        parser.add_argument("--calibration_steps", type=int, default=10)
    st = sub.add_parser("status", help="list every job's status")
    st.add_argument("name")
    st.add_argument("--sweeps_dir", default="sweeps")
    rk = sub.add_parser("rank", help="fit the cost model to a --calibrate sweep's calibration runs and rank its "
                        "matrix by it")
    rk.add_argument("name")
    rk.add_argument("--sweeps_dir", default="sweeps")
    rk.add_argument("--gpu", default=None, help="plan the matrix on this GPU (bench-plan's names; default: the "
                    "one `submit --gpu` planned it on)")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    sweep_dir = os.path.join(args.sweeps_dir, args.name)
    try:
        if args.cmd in ("submit", "local"):
            with open(args.matrix) as fh:
                matrix = json.load(fh)
            check_names(matrix)
            if args.cmd == "submit" and args.gpu:
                check_fits(matrix, extra, args.gpu)
            if args.cmd == "local":
                check_one_node(matrix)
            gpu, prior = (args.gpu if args.cmd == "submit" else None), []
            if args.calibrate and args.cmd == "submit" and not gpu:
                raise ValueError("submit --calibrate needs --gpu NAME (bench-plan's names): the matrix is planned "
                                 "on the GPUs its jobs will run on, as the calibration runs record theirs")
            cal_matrix, features = calibration_entries(matrix, extra, gpu) if args.calibrate else ([], None)
            if args.calibrate and len(cal_matrix) < 2:  # a fit needs two runs that differ
                log.warning(f"--calibrate: {len(cal_matrix)} of the matrix's layouts could calibrate the cost model "
                            "(it needs two that can be planned and differ); the matrix runs in its own order")
            elif args.calibrate:
                check_names([*cal_matrix, *matrix])
                cal_extra = [*extra, *sweep_calibration.calibration_args(args.calibration_steps)]
                if args.cmd == "submit":  # the matrix waits: the calibration's steps are timed on idle nodes
                    prior = submit(cal_matrix, sweep_dir, cal_extra, args.dry_run, gpu=gpu)
                    show(f"the matrix waits for the {len(prior)} calibration jobs; rank it once they end: "
                         f"python -m bench.sweep rank {args.name} --sweeps_dir {args.sweeps_dir}")
                else:
                    prior = run_local(cal_matrix, sweep_dir, cal_extra)
                    matrix = calibrate_and_rank(sweep_dir, matrix, extra, gpu, features)
            if args.cmd == "submit":
                submit(matrix, sweep_dir, extra, args.dry_run, prior, [j["job_id"] for j in prior if j["job_id"]],
                       gpu)
            else:
                run_local(matrix, sweep_dir, extra, prior=prior)
        if args.cmd == "rank":
            with open(os.path.join(sweep_dir, "sweep.json")) as fh:
                jobs = json.load(fh)
            ranked = [j for j in jobs if not j["name"].startswith(sweep_calibration.PREFIX)]
            gpu = args.gpu or next((j["gpu"] for j in jobs if j.get("gpu")), None)  # as submit planned it
            calibrate_and_rank(sweep_dir, [j["entry"] for j in ranked], ranked[0].get("extra", []) if ranked else [],
                               gpu)
        if args.cmd in ("status", "local"):
            for r in status(sweep_dir):
                show(f"{r['name']:<40} {r['job_id'] or '-':>8}  {r['status']:<10} {r['error'] or ''}")
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        log.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
