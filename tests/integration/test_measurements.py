"""The benchmark scripts users rerun to reproduce docs/results/ still run end to end (tiny settings)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

sys.path.insert(0, str(REPO / "measurements"))
import common  # noqa: E402 - measurements/common.py
import same_job  # noqa: E402 - measurements/same_job.py

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
    # each strategy at one GPU count: no scaling table
    assert "_None: no strategy of this job was measured at two or more GPU counts._" in text
    comparison = [ln.split(" | ") for ln in text.splitlines() if ln.startswith("| tiny-llama-dp-")]
    # the baseline (the matrix's first entry) comes first
    assert [c[0] for c in comparison] == ["| tiny-llama-dp-dp_zero1-1g", "| tiny-llama-dp-dp_zero2-2g"]
    assert comparison[0][3] == "sdpa per document, documents"  # the attention path that ran, the same for both
    assert comparison[1][3] == comparison[0][3]
    assert comparison[0][5] == "1"  # time reduction of the baseline against itself: 1x
    s = json.loads((tmp_path / "t" / "runs" / "tiny-llama-dp-dp_zero2-2g" / "summary.json").read_text())
    assert s["steps"] == 4 and s["world_size"] == 2 and s["peft"] == "none"


def redo(way: str, run, nprocs: int, out: Path, *extra: str) -> dict:
    """measurements/bare_deepspeed.py or hf_trainer.py redoing a harness run's job -> same_job.merge's record
    (common.redo's launch, with a timeout and the output on failure)."""
    cmd = common.launch(nprocs, common.REDO[way], str(run.run_dir), str(out), *extra)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return same_job.merge(str(out), way)


def test_bare_loop_and_trainer_compute_what_the_harness_computes(zero_runs, tmp_path):
    """measurements/side_by_side.py's premise: the three ways train the same thing. ZeRO-3 on 2 processes, and
    one process with 2 accumulated micro-batches per step, against the harness's own records."""
    for name, nprocs, ways in (("zero3", 2, ("bare", "trainer")), ("w1", 1, ("trainer",))):
        harness = zero_runs[name].records()
        for way in ways:
            m = redo(way, zero_runs[name], nprocs, tmp_path / f"{name}-{way}")
            assert m["loss"] == pytest.approx([r["loss"] for r in harness], rel=1e-4), (name, way)
            assert m["grad_norm"] == pytest.approx([r["grad_norm"] for r in harness], rel=1e-4), (name, way)
            assert len(m["step_time_s"]) == len(harness) and min(m["step_time_s"]) > 0
    # The Trainer's own default weights the loss by target tokens across the accumulated micro-batches
    # (docs/parity.md): with answer-only labels, micro-batches hold different numbers of them, so it differs.
    m = redo("trainer", zero_runs["w1"], 1, tmp_path / "w1-token-weighted", "--token_weighted")
    harness = [r["loss"] for r in zero_runs["w1"].records()]
    assert max(abs(a - b) / b for a, b in zip(m["loss"], harness)) > 1e-3


def test_gpu_check_runs_its_sequence_on_the_cpu(tmp_path):
    """measurements/gpu_check.py, the first thing to run on a GPU machine, runs its whole sequence here on the CPU
    (small settings) and writes its page: every check, the bare loop's ratio, the layouts within tolerance."""
    page = tmp_path / "gpu.md"
    # one of section 6's layouts: each layout's parity has its own suite; this checks the script (one layout runs
    # its loop, its reference and its row as two would)
    out = subprocess.run([sys.executable, "measurements/gpu_check.py", "--out", str(page), "--layouts", "PP2"],
                         cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = page.read_text()
    for heading in ("## 1. The default job", "## 2. One device", "## 3. The bare DeepSpeed loop",
                    "## 3b. Job 2 compiled (aot_eager)", "## 4. ZeRO-2 offload", "## 5. Packed and padded rows",
                    "## 6. Layouts on 2 devices", "## 7. ZeRO-3 vs FSDP2 on job 2, 2 devices"):
        assert heading in text, heading
    assert "Every check that ran passed; 1 skipped (above)." in text and "DeepSpeedCPUAdam" in text
    assert "- SKIPPED 6. layout parity (TP2, EP2, SP2): not chosen by --layouts" in text
    assert "| packed | sdpa per document, documents |" in text and "| padded | sdpa (causal), causal |" in text
    ratio = float(text.split("Median step time, harness / bare loop")[1].split("**")[1])
    assert 0.3 < ratio < 3, ratio
    parity = [ln for ln in text.splitlines() if ln.startswith(("| TP2", "| EP2", "| PP2", "| SP2"))]
    assert len(parity) == 1 and all(ln.endswith("| yes |") for ln in parity), parity
    engines = [ln for ln in text.splitlines() if ln.startswith(("| ZeRO-3 |", "| FSDP2 |"))]
    assert len(engines) == 2 and not any("n/a" in ln for ln in engines), engines


def test_fault_soak_short_seeded(tmp_path):
    """measurements/fault_soak.py, two seeded trials (with seed 94: the same command again on a completed run, then
    a hang with every rank alive at step 7, resumed from step 6's checkpoint): no hang left to the bound, no run left
    `running`, every resumed run's losses equal to the uninterrupted run's, no negative duration in any summary
    the trials wrote, no completed record rewritten. Each fault's own handling has its test in
    test_reliability.py and test_signals.py; this checks the soak's loop, its resumes and its page."""
    page = tmp_path / "soak.md"
    out = subprocess.run([sys.executable, "measurements/fault_soak.py", "--trials", "2", "--seed", "94", "--out",
                          str(page)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = page.read_text()
    assert "**hangs: 0; runs left `running`: 0; final losses equal to the uninterrupted run: 2/2" in text, text
    assert "negative durations: 0; completed records rewritten: 0**" in text, text
    assert "| resume_completed nothing changed |" in text and "hung at step" in text, text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(rows) == 2 and all("| completed | yes |" in ln for ln in rows), rows


def test_data_scaling_records_before_and_after(tmp_path):
    """measurements/data_scaling.py on a small file: both ranks report for each way, and after tokenizing only
    the consumed samples once per node the largest rank's memory grows less than when each tokenized all."""
    page = tmp_path / "page.md"
    out = subprocess.run([sys.executable, "measurements/data_scaling.py", "--samples", "4000", "--out", str(page)],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [ln.split("|")[1:-1] for ln in page.read_text().splitlines() if ln.startswith("| before")
            or ln.startswith("| after")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (way, rank) for way in ("before", "after, cold cache", "after, warm cache") for rank in ("0", "1")]
    growth = {(r[0].strip(), r[1].strip()): float(r[3]) for r in rows}
    tokenized = {int(r[4].replace(",", "")) for r in rows if r[0].startswith("| after") or "after" in r[0]}
    assert tokenized == {1600 + 32}  # 50 steps x 32 and the 32 validation samples, on both ranks
    assert max(growth[("after, cold cache", r)] for r in "01") < max(growth[("before", r)] for r in "01")
