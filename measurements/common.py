"""What the benchmark scripts share: the repository root, running a step that must succeed, launching a script
on N local processes, a harness run and the bare loop or Trainer redoing its job, and writing a results page."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str]) -> str:
    """Run cmd in the repository root; its stdout, or exit with the tail of its output when it fails."""
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return out.stdout


def launch(nprocs: int, script: str, *args: str, cores: str | None = None) -> list[str]:
    """The command that runs script on nprocs local processes under torchrun, on a free port (every way a
    benchmark compares gets the same launcher, so the same rendezvous and threads per rank). cores (e.g. "1")
    pins the launcher and everything it starts to those cores; each rank then takes its share of them."""
    sys.path.insert(0, REPO)
    from bench.distributed import free_port
    pin = ["taskset", "-c", cores] if cores else []
    return [*pin, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_port",
            str(free_port()), script, *args]


def harness(nprocs: int, args: list[str], out_dir: str, cores: str | None = None) -> tuple[str, dict, dict]:
    """One bench/run.py run in a fresh output directory. -> (run directory, summary, its steps in
    same_job.merge's shape)."""
    import json
    import same_job
    from bench.loggers import read_records
    run(launch(nprocs, "bench/run.py", "--output_dir", out_dir, *args, cores=cores))
    (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir)]
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    return run_dir, summary, same_job.from_harness(summary, read_records(os.path.join(run_dir, "metrics.jsonl")))


REDO = {"bare": "measurements/bare_deepspeed.py", "trainer": "measurements/hf_trainer.py"}


def redo(way: str, job_dir: str, nprocs: int, out_dir: str, *extra: str, cores: str | None = None) -> dict:
    """The bare loop or the Trainer redoing a harness run's job. -> its steps, merged (same_job.merge)."""
    import same_job
    run(launch(nprocs, REDO[way], job_dir, out_dir, *extra, cores=cores))
    return same_job.merge(out_dir, way)


def host_line() -> str:
    """Hardware and versions, for a results page."""
    import platform
    import deepspeed
    import torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"host: {platform.node()}, {cores} cores available, {platform.machine()}; python "
            f"{platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}")


def add_page_args(p) -> None:
    """--out PAGE (its measurements are kept beside it as PAGE's .json) and --from_json (the page again from
    them, running nothing): what publish_page reads."""
    p.add_argument("--out", default=None, help="results page (docs/results/...); its JSON is written beside it")
    p.add_argument("--from_json", default=None, help="write the page from an earlier run's JSON, running nothing")


def publish_page(opts, measure, page) -> None:
    """The results of measure() (or of --from_json), kept as JSON beside --out, and page(opts, results) printed
    and written."""
    import json
    if opts.from_json:
        with open(opts.from_json) as fh:
            results = json.load(fh)
    else:
        results = measure()
        if opts.out:
            with open(os.path.splitext(opts.out)[0] + ".json", "w") as fh:
                json.dump(results, fh, indent=1)
    write_page(page(opts, results), opts.out)


def write_page(lines: list[str], out: str | None) -> None:
    """Print a results page and, with --out, write it (docs/results/...)."""
    page = "\n".join(lines) + "\n"
    print(page)
    if out:
        with open(out, "w") as fh:
            fh.write(page)
