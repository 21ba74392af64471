"""install.sh --with-test-deps installs exactly the missing system packages: its decision, run with stand-in
commands on PATH (nothing on the system is touched)."""
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALL = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge",
       "chromium": "chromium"}


def missing_with(tmp_path, commands) -> list[str]:
    for name in commands:
        stand_in = tmp_path / name
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    out = subprocess.run(["/bin/bash", str(REPO / "scripts/missing_test_deps.sh")], env={"PATH": str(tmp_path)},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.unit
@pytest.mark.parametrize("present,expected", [
    (list(ALL), []),                                                           # all present
    ([], list(ALL.values())),                                                  # none present
    (["slurmctld", "slurmd", "sbatch", "munged"], ["chromium"]),               # a cluster node without Chromium
    (["chromium-browser", "sbatch"], ["slurmctld", "slurmd", "munge"]),        # some present, other browser name
])
def test_installs_exactly_what_is_missing(tmp_path, present, expected):
    assert missing_with(tmp_path, present) == expected


@pytest.mark.unit
def test_install_script_uses_the_decision():
    text = (REPO / "scripts/install.sh").read_text()
    assert "missing=$(bash scripts/missing_test_deps.sh)" in text and "apt-get install -y -qq $missing" in text


@pytest.mark.unit
@pytest.mark.parametrize("spec,expected", [
    (None, ["-m", "pip", "install", "-q", "torch==2.13.0"]),
    ("torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130",
     ["-m", "pip", "install", "-q", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu130"]),
])
def test_torch_spec_may_carry_an_index(tmp_path, spec, expected):
    """The CUDA build comes from another index: TORCH_SPEC's words reach pip as separate arguments."""
    args = tmp_path / "args"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {args}\n')
    python.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **({"TORCH_SPEC": spec} if spec else {})}
    subprocess.run(["/bin/bash", str(REPO / "scripts/install_torch.sh")], env=env, check=True)
    assert args.read_text().split("\n")[:-1] == expected
    assert "bash scripts/install_torch.sh" in (REPO / "scripts/install.sh").read_text()
