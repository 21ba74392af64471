"""What the benchmark scripts share: the repository root and running a step that must succeed."""
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


def host_line() -> str:
    """Hardware and versions, for a results page."""
    import platform
    import deepspeed
    import torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"host: {platform.node()}, {cores} cores available, {platform.machine()}; python "
            f"{platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}")


def write_page(lines: list[str], out: str | None) -> None:
    """Print a results page and, with --out, write it (docs/results/...)."""
    page = "\n".join(lines) + "\n"
    print(page)
    if out:
        with open(out, "w") as fh:
            fh.write(page)
