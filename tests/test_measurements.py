"""The benchmark scripts users rerun to reproduce docs/results/ still run end to end (tiny settings)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.multiproc


def test_strategy_matrix_records_a_results_page(tmp_path):
    matrix = [{"model": "tiny-llama", "strategy": "dp", "ds_config": "ds_configs/dp_zero1.json", "gpus": 1},
              {"model": "tiny-llama", "strategy": "dp", "ds_config": "ds_configs/dp_zero2.json", "gpus": 2}]
    (tmp_path / "m.json").write_text(json.dumps(matrix))
    page = tmp_path / "page.md"
    out = subprocess.run([sys.executable, "measurements/strategy_matrix.py", "--matrix", str(tmp_path / "m.json"),
                          "--name", "t", "--sweeps_dir", str(tmp_path), "--out", str(page),
                          "--", "--max_steps", "4", "--warmup_steps", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    text = page.read_text()
    assert "deepspeed 0." in text and "--max_steps 4" in text  # hardware/versions and the rerun command
    rows = [ln for ln in text.splitlines() if ln.startswith("| tiny-llama-dp-")]
    comparison = [ln.split(" | ") for ln in rows if " | tiny-llama | " in ln]
    # the baseline (the matrix's first entry) comes first
    assert [c[0] for c in comparison] == ["| tiny-llama-dp-dp_zero1-1g", "| tiny-llama-dp-dp_zero2-2g"]
    assert comparison[0][4] == "1"  # time reduction of the baseline against itself: 1x
    s = json.loads((tmp_path / "t" / "runs" / "tiny-llama-dp-dp_zero2-2g" / "summary.json").read_text())
    assert s["steps"] == 4 and s["world_size"] == 2 and s["peft"] == "none"
