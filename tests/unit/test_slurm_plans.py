"""Every shipped SLURM script is generated from slurm/experiments.json (bench/slurm_scripts.py) and planned with its
exact arguments for the 80 GB GPUs it was written for: the header's stated peak is the planner's, and what does
not fit is known and flagged (docs/planner.md)."""
import glob
import os
import re

import pytest

from bench import slurm_scripts

pytestmark = pytest.mark.unit

GPU = slurm_scripts.GPU
# Scripts 80 GB cannot hold as written, shipped on purpose (none: the LLaMA 8B full fine-tune under TP2, 93.8 GiB,
# and the Mixtral full fine-tunes were replaced by LoRA runs; a GPU run refuses such a layout before loading).
DOES_NOT_FIT: set[str] = set()


def test_the_shipped_scripts_are_what_the_table_generates():
    """slurm/experiments.json is the one table: regenerating every script from it (the planner's peaks in each
    header included) changes nothing, and every training script in slurm/ comes from it (import_model.sh, a
    download job, is written by hand)."""
    assert slurm_scripts.generate(check=True) == [], "run: python -m bench.slurm_scripts"
    listed = {os.path.join("slurm", e["script"]) for e in slurm_scripts.table()}
    shipped = {p for p in glob.glob("slurm/**/*.sh", recursive=True) if "\nbench_run " in open(p).read()}
    assert listed == shipped and len(listed) >= 20


def test_a_script_whose_layout_stops_fitting_shows_it_in_its_header(tmp_path):
    entry = {"script": "x/1_gpus.sh", "name": "x", "gpus": 1, "about": "A full fine-tune that cannot fit.",
             "args": ["--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json", "--model", "llama3.1-8b",
                      "--peft", "none", "--seq_len", "2048"]}
    text = slurm_scripts.experiment_script(entry)
    assert re.search(r"^# Predicted peak per GPU \(bench-plan, H100-80GB\): [\d.]+ GiB training, [\d.]+ GiB "
                     r"loading, DOES NOT FIT$", text, re.M), text


@pytest.mark.parametrize("entry", slurm_scripts.table(), ids=lambda e: e["script"])
def test_each_script_fits_unless_known(entry):
    """Planned with its exact arguments on the 80 GB GPUs it was written for (the load's peak too: a
    model-parallel rank materializes only its shard, bench/loading.py); the GPU guard refuses on the larger."""
    train, load, fits = slurm_scripts.planned_peaks(tuple(entry["args"]), entry["gpus"])
    assert fits is (os.path.join("slurm", entry["script"]) not in DOES_NOT_FIT), (entry["script"], train, load)


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
