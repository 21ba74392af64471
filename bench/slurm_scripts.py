"""The sbatch scripts: one template for the shipped experiments (slurm/, generated from the table
slurm/experiments.json) and for the sweep's jobs (bench/sweep.py).

    python -m bench.slurm_scripts           rewrite slurm/ from the table
    python -m bench.slurm_scripts --check   exit 1 and name every script that differs from what the table makes

Each shipped script's header states the planner's predicted peak per GPU for the 80 GB GPUs it was written for
(bench/estimate.py, with the script's own arguments), so a script whose layout stops fitting shows it here.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import textwrap

from bench.gpus import GPUS_PER_NODE
from bench.log import note, show

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join("slurm", "experiments.json")
GPU = "H100-80GB"  # what the shipped scripts' headers are planned for
WIDTH = 118

HEADER = """#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={per_node}
#SBATCH --gpus-per-node={per_node}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --output={log_dir}/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${{BENCH_ROOT:-$SLURM_SUBMIT_DIR}}/slurm/common.sh"
"""


def nodes_for(gpus: int) -> tuple[int, int]:
    """-> (nodes, GPUs per node): whole nodes of GPUS_PER_NODE beyond one node."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    nodes = -(-gpus // GPUS_PER_NODE)
    if gpus % nodes:
        raise ValueError(f"{gpus} GPUs do not split evenly over {nodes} nodes")
    return nodes, gpus // nodes


def render(name: str, gpus: int, args: list[str], log_dir: str = "logs", comments: list[str] = (),
           cpus: int = 8, time_limit: str = "02:00:00") -> str:
    """One sbatch script: comment lines, the directives (one task per GPU, requeued on preemption with USR1 300 s
    before the limit), and bench/run.py through slurm/common.sh with the submitter's overrides appended."""
    nodes, per_node = nodes_for(gpus)
    run = textwrap.wrap(" ".join(["bench_run", *map(shlex.quote, args), '"$@"']), WIDTH - 2, break_long_words=False,
                        break_on_hyphens=False, subsequent_indent="    ")
    return "#!/bin/bash\n" + "".join(f"{c}\n" for c in comments) + HEADER.format(
        name=name, nodes=nodes, per_node=per_node, cpus=cpus, time=time_limit, log_dir=log_dir) + \
        " \\\n".join(run) + "\n"


@functools.lru_cache(maxsize=None)
def planned_peaks(args: tuple, gpus: int) -> tuple[float, float, bool]:
    """-> (training peak GiB, load peak GiB, fits) of these bench/run.py arguments on `gpus` GPUs of GPU."""
    from bench import estimate
    from bench.gpus import gpu_capacity
    from bench.plan import plan_layout
    plan = plan_layout([*args, "--init", "random"], gpus, GPU)
    est = estimate.estimate(plan, gpu_capacity(GPU, None))
    return est["training_peak_bytes"] / estimate.GIB, est["load_peak_bytes"] / estimate.GIB, bool(est["fits"])


def experiment_script(entry: dict) -> str:
    """A table entry -> its script's text."""
    train, load, fits = planned_peaks(tuple(entry["args"]), entry["gpus"])
    comments = [f"# {line}" for line in textwrap.wrap(entry["about"], WIDTH - 2)]
    comments += [f"# Predicted peak per GPU (bench-plan, {GPU}): {train:.1f} GiB training, {load:.1f} GiB loading, "
                 f"{'fits' if fits else 'DOES NOT FIT'}",
                 f"# Submit from the repository root: mkdir -p logs && sbatch slurm/{entry['script']} "
                 "[bench/run.py overrides...]"]
    comments += [f"# {line}" for line in textwrap.wrap(entry.get("note", ""), WIDTH - 2)]
    return render(entry["name"], entry["gpus"], entry["args"], comments=comments)


def table(root: str = REPO) -> list[dict]:
    with open(os.path.join(root, TABLE)) as fh:
        return json.load(fh)


def generate(root: str = REPO, check: bool = False) -> list[str]:
    """Write (or, with check, compare) every script of the table. -> the scripts that differed."""
    differ = []
    for entry in table(root):
        path = os.path.join(root, "slurm", entry["script"])
        text = experiment_script(entry)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            differ.append(os.path.relpath(path, root))
            if not check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as fh:
                    fh.write(text)
    return differ


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slurm_scripts", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare only; exit 1 if a script differs")
    opts = p.parse_args(argv)
    os.chdir(REPO)  # the planner reads the ds_configs and the bundled data relative to the repository
    differ = generate(check=opts.check)
    for path in differ:
        show(f"{'differs' if opts.check else 'wrote'}: {path}")
    if opts.check and differ:
        note("regenerate with: python -m bench.slurm_scripts")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
