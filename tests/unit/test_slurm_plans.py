"""Every shipped SLURM script, planned with its exact arguments for the 80 GB GPUs it was written for: the
header's stated peak is the planner's, and what does not fit is known and flagged (docs/planner.md)."""
import glob
import re
import shlex

import pytest

from bench import estimate
from bench.plan import plan_layout

pytestmark = pytest.mark.unit

SCRIPTS = sorted(glob.glob("slurm/*/*/*.sh"))
GPU = "H100-80GB"
# Scripts 80 GB cannot hold as written, shipped on purpose (none: the LLaMA 8B full fine-tune under TP2, 93.8 GiB,
# and the Mixtral full fine-tunes were replaced by LoRA runs; a GPU run refuses such a layout before loading).
DOES_NOT_FIT: set[str] = set()


def planned(path: str) -> tuple[dict, str]:
    """The plan of a script's bench_run line on its GPUs. -> (estimate, the script's text)."""
    text = open(path).read()
    joined = text.replace("\\\n", " ")
    args = shlex.split(re.search(r'^bench_run (.*?)"\$@"', joined, re.M).group(1))
    world = int(re.search(r"--nodes=(\d+)", text).group(1)) * int(re.search(r"--gpus-per-node=(\d+)", text).group(1))
    plan = plan_layout([*args, "--init", "random"], world, GPU)
    return estimate.estimate(plan, estimate.gpu_capacity(GPU, None)), text


def test_every_script_is_planned():
    assert len(SCRIPTS) >= 19 and DOES_NOT_FIT <= set(SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS)
def test_each_script_states_its_planned_peaks_and_fits_unless_known(path):
    """The header states the training peak and the load's (a model-parallel rank materializes only its shard,
    bench/loading.py), both re-planned here; the GPU guard refuses on the larger."""
    est, text = planned(path)
    stated = re.search(r"^# Predicted peak per GPU \(bench-plan, H100-80GB\): ([\d.]+) GiB training, ([\d.]+) GiB "
                       r"loading, (fits|DOES NOT FIT)$", text, re.M)
    assert stated, f"{path}: the header states no predicted peaks (run bench-plan with its arguments)"
    assert float(stated.group(1)) == pytest.approx(est["training_peak_bytes"] / estimate.GIB, abs=0.15), path
    assert float(stated.group(2)) == pytest.approx(est["load_peak_bytes"] / estimate.GIB, abs=0.15), path
    assert est["peak_bytes"] == max(est["training_peak_bytes"], est["load_peak_bytes"])
    assert est["fits"] is (path not in DOES_NOT_FIT) is (stated.group(3) == "fits"), path


def test_shipped_sweep_matrix_fits_and_a_matrix_that_does_not_is_refused_before_the_queue(tmp_path, capfd):
    """`bench.sweep submit --gpu G` plans every entry first: the shipped matrix (the CPU one, whose tiny models
    fit anywhere) passes; an entry predicted not to fit stops the whole matrix with one line, nothing written."""
    import json
    from bench import sweep
    with open("measurements/cpu_matrix.json") as fh:
        sweep.check_fits(json.load(fh), ["--peft", "none"], GPU)
    too_big = {"model": "llama3.1-8b", "strategy": "dp", "ds_config": "ds_configs/dp_zero1.json", "gpus": 2,
               "args": ["--peft", "none", "--seq_len", "2048"]}
    matrix = tmp_path / "m.json"
    matrix.write_text(json.dumps([too_big]))
    code = sweep.main(["submit", str(matrix), "--name", "s", "--sweeps_dir", str(tmp_path), "--dry_run", "--gpu", GPU])
    assert code == 2 and not (tmp_path / "s").exists()
    err = capfd.readouterr().err
    assert "llama31-8b-dp-dp_zero1-none-2g: predicted training peak" in err and "will not fit" in err
