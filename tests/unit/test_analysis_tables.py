"""The report's weak-scaling tables and its calibrated prediction column (analysis/tables.py), on runs built here
whose numbers are known."""
import pytest

from analysis.collect import Run
from analysis.tables import comparison, predicted_step, weak_scaling_tables
from bench import calibrate

pytestmark = pytest.mark.unit


def run(name: str, gpus: int, batch: int, tokens_per_s: float, step_s: float = 1.0, features=None,
        predicted=None) -> Run:
    summary = {"status": "completed", "strategy": "dp", "zero_stage": 2, "peft": "lora", "world_size": gpus,
               "model": "tiny-llama", "seq_len": 128, "global_batch_size": batch, "precision": "fp32",
               "batching": "packed", "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / gpus,
               "step_time_s": {"median": step_s}, "total_wall_time_s": 10.0,
               "memory_plan": {"cost_features": features, "predicted_step": predicted} if features else None}
    return Run(name, summary, {"run": {"data": "/data/train.json"}}, [], None)


def test_weak_scaling_puts_one_batch_per_gpu_at_growing_gpu_counts_in_one_series():
    """Global batch 8 on 1 GPU, 16 on 2, 32 on 4 (8 per GPU): three jobs, one weak-scaling series; efficiency is
    each run's tokens/s per GPU over the baseline's. A strong-scaling pair (the same global batch) is not one."""
    runs = [run("w1", 1, 8, 1000.0), run("w2", 2, 16, 1800.0), run("w4", 4, 32, 3200.0),
            run("strong-w2", 2, 8, 1500.0)]
    tables = weak_scaling_tables(runs)
    (title, rows), = tables.items()
    assert title == "tiny-llama, seq 128, train.json, fp32, packed: dp zero2 lora, 8 samples per GPU per step " \
                    "(baseline 1 GPU)"
    assert [(r["run"], r["global batch"]) for r in rows] == [("w1", 8), ("w2", 16), ("w4", 32)]
    assert [r["scaling efficiency"] for r in rows] == pytest.approx([1.0, 900 / 1000, 800 / 1000])
    assert [r["tokens/s/GPU"] for r in rows] == [1000.0, 900.0, 800.0]


def test_a_calibrated_prediction_sits_beside_the_measured_step_and_flags_what_it_cannot_explain():
    feats = {t: 0 for t in calibrate.TERMS}
    feats.update(flops=1e12, step=1)
    cal = {"constants": {t: {"coefficient": 0.0} for t in calibrate.TERMS}}
    cal["constants"]["flops"]["coefficient"] = 1 / 2e12  # 0.5 s for these features
    cal["constants"]["step"]["coefficient"] = 0.5        # + 0.5 s
    near, far, none = run("near", 2, 8, 1.0, 1.2, feats), run("far", 2, 8, 1.0, 2.0, feats), run("old", 2, 8, 1.0)
    assert predicted_step(near, cal) == {"predicted step (s)": 1.0, "predicted by": "calibrated",
                                         "measured / predicted": 1.2, "model explains it": "yes"}
    assert predicted_step(far, cal)["model explains it"] == "no: the model does not explain this run"
    assert predicted_step(none, cal) == {"predicted step (s)": None, "predicted by": None,
                                         "measured / predicted": None, "model explains it": None}
    rows = comparison([near, far], near, cal)
    assert [r["measured / predicted"] for r in rows] == pytest.approx([1.2, 2.0])
    assert "predicted step (s)" not in comparison([near], near)[0]  # no calibration, no GPU's prediction: no column


def test_without_a_calibration_a_gpu_run_shows_the_uncalibrated_prediction_it_recorded():
    feats = {t: 0 for t in calibrate.TERMS}
    gpu = run("h100", 8, 64, 1.0, 0.5, feats, predicted={"step_s": 0.4, "gpu": "H100-80GB"})
    cpu = run("cpu", 2, 8, 1.0, 0.5, feats)
    rows = {r["run"]: r for r in comparison([gpu, cpu], gpu)}
    assert rows["h100"]["predicted step (s)"] == 0.4 and rows["h100"]["measured / predicted"] == pytest.approx(1.25)
    assert rows["h100"]["predicted by"] == "cost model, H100-80GB constants (uncalibrated)"
    assert rows["h100"]["model explains it"] == "yes"
    assert rows["cpu"]["predicted step (s)"] is None and rows["cpu"]["model explains it"] is None
