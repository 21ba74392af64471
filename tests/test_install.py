"""install.sh --with-test-deps installs exactly the missing system packages: its decision, run with stand-in
commands on PATH (nothing on the system is touched)."""
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
