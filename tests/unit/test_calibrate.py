"""The cost model's calibration (bench/calibrate.py) on synthetic runs whose constants are known: the fit recovers
them, says which it could not determine, and predicts a layout it did not see."""
import json
import random

import pytest

from bench import calibrate, cost_model
from bench.config import BenchError

pytestmark = pytest.mark.unit

# seconds per unit of each feature: 2 TFLOP/s sustained, all-reduce at 20 GB/s, all-gather at 50 GB/s, 0.2 ms per
# all-reduce and 0.5 ms per all-to-all a layer waits on, 3 ms per micro-batch, 40 ms per step
TRUE = {"flops": 1 / 2e12, "all_reduce": 1 / 20e9, "all_gather": 1 / 50e9, "all_reduce_calls": 2e-4,
        "all_to_all_calls": 5e-4, "micro_batches": 3e-3, "step": 40e-3}


def synthetic(n: int, seed: int, noise: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    runs = []
    for i in range(n):
        feats = {t: 0 for t in calibrate.TERMS}
        feats.update(flops=rng.uniform(1e11, 2e12), all_reduce=rng.choice([0, rng.uniform(1e8, 4e9)]),
                     all_gather=rng.choice([0, rng.uniform(1e8, 4e9)]), micro_batches=rng.choice([1, 2, 4, 8]),
                     all_reduce_calls=rng.choice([0, rng.randrange(10, 400)]),
                     all_to_all_calls=rng.choice([0, rng.randrange(10, 100)]), step=1,
                     device_share=rng.choice([1.0, 1.0, 0.5]))  # some runs on half a device (CPU ranks > cores)
        # what a rank computes takes 1 / share longer on a share of its device; the bytes and the step do not
        own = TRUE["flops"] * feats["flops"] + TRUE["all_reduce_calls"] * feats["all_reduce_calls"] \
            + TRUE["all_to_all_calls"] * feats["all_to_all_calls"] + TRUE["micro_batches"] * feats["micro_batches"]
        moved = TRUE["all_reduce"] * feats["all_reduce"] + TRUE["all_gather"] * feats["all_gather"]
        step = (own / feats["device_share"] + moved + TRUE["step"]) * (1 + rng.gauss(0, noise))
        runs.append({"run": f"r{i}", "world_size": 8, "device": "test", "step_s": step, "spread": [None, None],
                     "features": feats})
    return runs


def test_the_fit_recovers_known_constants_and_marks_what_it_could_not_see():
    defaults = calibrate.default_coefficients("H100-80GB")
    cal = calibrate.fit(synthetic(12, seed=1), defaults, "H100-80GB")
    c = cal["constants"]
    for term, value in TRUE.items():
        assert c[term]["source"] == "fitted" and c[term]["coefficient"] == pytest.approx(value, rel=1e-6), term
    assert c["all_to_all"]["source"].startswith("default") and c["all_to_all"]["runs"] == []
    assert c["all_to_all"]["coefficient"] == defaults["all_to_all"] > 0
    assert set(c["all_reduce"]["runs"]) == {r["run"] for r in synthetic(12, seed=1) if r["features"]["all_reduce"]}
    held_out = synthetic(1, seed=99)[0]
    assert calibrate.predict(cal, held_out["features"]) == pytest.approx(held_out["step_s"], rel=1e-6)


def test_a_constant_the_runs_do_not_vary_keeps_its_default_and_is_not_counted_twice():
    """Every run with the same FLOPs: the FLOP term cannot be told from the per-step constant, keeps the GPU's
    default, and its time is taken off the steps before the rest is fitted, so each run's prediction is its
    measured step less its residual."""
    defaults = calibrate.default_coefficients("H100-80GB")
    runs = [r for r in synthetic(24, seed=4) if r["features"]["device_share"] == 1.0]  # a whole device each
    for r in runs:
        r["step_s"] += TRUE["flops"] * (1e12 - r["features"]["flops"])  # as if every run computed 1e12 FLOPs
        r["features"]["flops"] = 1e12
    cal = calibrate.fit(runs, defaults, "H100-80GB")
    assert cal["constants"]["flops"]["source"].startswith("default")
    assert cal["constants"]["flops"]["coefficient"] == defaults["flops"] > 0
    for r in runs:
        assert calibrate.predict(cal, r["features"]) == pytest.approx(r["step_s"] - cal["residual_s"][r["run"]])
        assert abs(cal["residual_s"][r["run"]]) < 1e-9  # the rest is exact: the step absorbs the difference


def test_with_noise_each_constant_carries_an_error_that_covers_it():
    cal = calibrate.fit(synthetic(40, seed=2, noise=0.02))
    for term, value in TRUE.items():
        c = cal["constants"][term]
        assert abs(c["coefficient"] - value) <= 4 * c["stderr"], (term, c, value)
        if term in ("flops", "all_reduce", "all_gather"):  # the terms that make most of each step
            assert c["stderr"] < 0.2 * value, (term, c)


def test_the_file_round_trips_and_a_bad_one_is_refused_in_one_line(tmp_path):
    cal = calibrate.fit(synthetic(12, seed=3))
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    assert calibrate.load(str(path)) == cal
    assert any("TFLOP/s" in line and "fitted" in line for line in calibrate.describe(cal))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BenchError, match="not a calibration of this version"):
        calibrate.load(str(tmp_path / "bad.json"))
    with pytest.raises(BenchError, match="two or more completed runs"):
        calibrate.read_runs([])


def test_a_gpu_run_records_the_uncalibrated_step_and_every_run_its_features():
    """What a run records for the report and for --calibrate (bench/plan.py check_memory): on a catalog GPU the
    uncalibrated model's step, its compute the slowest rank's FLOPs at no more than the model's sustained rate; on
    the CPU no step (no constants) but the features, with the share of the cores each of 4 ranks has here."""
    import os
    from bench import gpus
    from bench.plan import plan_layout
    args = ["--model", "tiny-llama", "--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "none",
            "--seq_len", "128", "--micro_batch_size", "2", "--global_batch_size", "16", "--packing", "off"]
    on_gpu = plan_layout(args, 4, "H100-80GB").memory_plan
    step = on_gpu["predicted_step"]
    assert step["gpu"] == "H100-80GB" and step["step_s"] == pytest.approx(sum(
        v for k, v in step.items() if k.endswith("_s") and k != "step_s"))
    flops = on_gpu["cost_features"]["flops"]
    # at best the model's sustained share of the peak; tiny GEMMs leave most of the last wave's SMs idle
    assert step["compute_s"] >= flops / (gpus.BY_KEY["H100-80GB"].bf16_tflops * 1e12 * cost_model.EFFICIENCY)
    two_nodes = plan_layout([*args, "--global_batch_size", "32"], 16, "H100-80GB").memory_plan["cost_features"]
    assert two_nodes["all_reduce_internode"] > 0 and two_nodes["all_reduce"] == 0  # ZeRO's reduction spans both
    assert on_gpu["cost_features"]["all_reduce"] > 0 and on_gpu["cost_features"]["all_reduce_internode"] == 0
    on_cpu = plan_layout(args, 4).memory_plan
    assert "predicted_step" not in on_cpu
    cores = len(os.sched_getaffinity(0))
    assert on_cpu["cost_features"]["device_share"] == pytest.approx(min(1.0, cores / 4))
    assert on_gpu["cost_features"]["device_share"] == 1.0


def test_a_sweep_calibrates_on_a_few_layouts_that_see_every_constant_and_ranks_by_the_fit(tmp_path):
    """bench/sweep_calibration.py: the cheapest layout first, then few that let the fit see every constant some
    layout of the matrix shows it (its feature differs between the chosen runs); a layout that cannot be planned
    is left out and ranked last."""
    from bench import sweep_calibration

    def feats(flops, share=1.0, **kinds):
        return {**{t: 0 for t in calibrate.TERMS}, "flops": flops, "micro_batches": 4, "step": 1,
                "device_share": share, **kinds}
    matrix = {"dp-1": feats(2e9), "dp-2": feats(1e9, all_reduce=1e6), "zero3-2": feats(1e9, all_gather=1e6,
              reduce_scatter=2e6), "tp-2": feats(1e9, all_reduce=8e6, all_gather=1e6, all_reduce_calls=120),
              "tp-4": feats(5e8, 0.5, all_reduce=8e6, all_gather=1e6, all_reduce_calls=120),
              "ep-2": feats(1e9, all_to_all=2e6, all_to_all_calls=20), "zero1-2": feats(1e9, all_reduce=1e6),
              "zero2-2": feats(1e9, all_reduce=2e6), "bad": "global batch 3 is not a multiple"}
    chosen = sweep_calibration.choose(matrix)

    def varied(names):  # the terms whose fit the runs allow: written out again
        cols = {t: {calibrate.design(matrix[n])[j] for n in names} for j, t in enumerate(calibrate.TERMS)}
        return {t for t, values in cols.items() if len(values) > 1}
    assert chosen[0] == "dp-2"  # the cheapest: least compute per device share (tp-4 has half a device)
    assert varied(chosen) == varied([n for n in matrix if n != "bad"]) == {
        "flops", "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_reduce_calls", "all_to_all_calls",
        "micro_batches"}
    assert "bad" not in chosen and {"zero1-2", "zero2-2"}.isdisjoint(chosen), chosen  # they add nothing
    for name in chosen[1:]:  # none is there for nothing
        assert varied([n for n in chosen if n != name]) != varied(chosen), (name, chosen)
    cal = {"constants": {t: {"coefficient": 0.0} for t in calibrate.TERMS}}
    cal["constants"]["flops"]["coefficient"] = 1e-9  # 1 s per 1e9 FLOPs on a whole device
    cal["constants"]["all_reduce_calls"]["coefficient"] = cal["constants"]["all_to_all_calls"]["coefficient"] = 1e-3
    #                                                                             1 ms per call a layer waits on
    order = sweep_calibration.rank(str(tmp_path), matrix, cal)
    # 1.0 four times (the matrix's order between equals), 1.02, 1.12, (0.5 + 0.12) / 0.5 = 1.24 on half a
    # device, 2.0
    assert order == ["dp-2", "zero3-2", "zero1-2", "zero2-2", "ep-2", "tp-2", "tp-4", "dp-1", "bad"]
    rows = json.loads((tmp_path / "ranking.json").read_text())
    assert rows[-1]["not_planned"].startswith("global batch") and rows[0]["predicted_step_s"] == pytest.approx(1.0)
