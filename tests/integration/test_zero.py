"""ZeRO data parallelism on 2 real processes reproduces the single-process run at the same global batch."""
import json

import pytest

from support import assert_plan_matches, PARITY_ARGS, assert_ok, planned_params_per_rank, run_bench

pytestmark = pytest.mark.multiproc

# fp32 on the CPU; the only difference between layouts is the order of the gradient reduction
# (gloo all-reduce vs local accumulation), which moves the loss in the 7th significant digit (seen: <= 1e-7 relative).
LOSS_RTOL = 1e-5


@pytest.mark.parametrize("layout", ["zero0", "zero1", "zero2", "zero3", "zero2-accelerate"])
def test_world2_matches_world1(zero_runs, layout):
    base, run = zero_runs["w1"], zero_runs[layout]
    assert_ok(base)
    assert_ok(run)
    s = run.summary()
    assert s["world_size"] == 2 and s["layout"]["dp"] == 2 and s["grad_accum"] == 1
    assert base.summary()["grad_accum"] == 2
    assert s["zero_stage"] == int(layout[4])
    a, b = base.losses(), run.losses()
    assert len(a) == len(b) == 5
    assert a[-1] < a[0] - 0.05, f"loss should fall over 5 full fine-tuning steps: {a}"
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=LOSS_RTOL), (a, b)
    assert s["val_loss"] == pytest.approx(base.summary()["val_loss"], rel=LOSS_RTOL)
    # parity is the gradient too: the clipped-before norm DeepSpeed reports at every step
    ga, gb = [r["grad_norm"] for r in base.records()], [r["grad_norm"] for r in run.records()]
    assert None not in ga and None not in gb, (ga, gb)
    assert gb == pytest.approx(ga, rel=1e-4)


def test_zero3_partitions_parameters(zero_runs):
    s = zero_runs["zero3"].summary()
    per_rank = [r["total"] for r in s["params"]["per_rank"]]
    # each rank holds about half of every partitioned parameter (small ones may be kept whole)
    assert all(n < 0.75 * s["params"]["total"] for n in per_rank), per_rank
    assert per_rank == planned_params_per_rank(*PARITY_ARGS, "--ds_config", "ds_configs/dp_zero3.json", world=2)
    s2 = zero_runs["zero2"].summary()
    assert [r["total"] for r in s2["params"]["per_rank"]] == [s2["params"]["total"]] * 2
    assert planned_params_per_rank(*PARITY_ARGS, "--ds_config", "ds_configs/dp_zero2.json", world=2) == \
        [s2["params"]["total"]] * 2


def test_accounting_counts_what_each_zero_stage_holds(zero_runs):
    """summary.accounting against what ZeRO keeps per rank in fp32 (the ZeRO paper's 4 + 4 + 12 bytes per parameter
    on the CPU): parameters whole (stage 1, 2) or halved (3); Adam's two states and the fp32 master copy over half
    of the parameters; gradients reduced into halves; activations untouched by ZeRO."""
    acc = {name: zero_runs[name].summary()["accounting"]["per_rank"] for name in ("w1", "zero1", "zero2", "zero3")}
    n = zero_runs["w1"].summary()["params"]["total"]
    assert [r["rank"] for r in acc["zero2"]] == [0, 1]
    assert acc["w1"][0]["params_bytes"] == 4 * n
    for name in ("zero1", "zero2"):
        for r in acc[name]:
            assert r["params_bytes"] == pytest.approx(4 * n, rel=1e-3)  # one flat buffer, padded for alignment
            assert r["optimizer_bytes"] == pytest.approx(12 * n / 2, rel=1e-3)  # master + exp_avg + exp_avg_sq
    zero3_params = planned_params_per_rank(*PARITY_ARGS, "--ds_config", "ds_configs/dp_zero3.json", world=2)
    # ZeRO-3: each rank's partitions, and every tiny parameter whole besides (all are under DeepSpeed's 1e5-element
    # persistence threshold, so they stay gathered on every rank)
    assert [r["params_bytes"] for r in acc["zero3"]] == [4 * p + 4 * n for p in zero3_params]
    assert all(r["buffers_bytes"] > 0 for r in acc["zero3"])  # its reduction bucket, kept all run
    assert all(r["optimizer_bytes"] < acc["zero2"][0]["optimizer_bytes"] for r in acc["zero3"])
    # one process holds every gradient; on 2 ranks DeepSpeed reduces them into each rank's half at the boundary
    # (stage 1 too, in its implementation), plus its reduction buckets (stage 3: larger ones)
    assert acc["w1"][0]["grads_bytes"] >= 4 * n
    for name in ("zero1", "zero2"):
        assert all(4 * n / 2 <= r["grads_bytes"] < 4 * n for r in acc[name]), (name, acc[name])
    assert all(r["grads_bytes"] >= 4 * n / 2 for r in acc["zero3"])
    # activations depend on the micro-batch, not on ZeRO: two samples packed into one row, 128 wide everywhere
    # (the sample's 59-64 tokens at seq 128)
    act = [r["activation_bytes"] for name in acc for r in acc[name]]
    assert max(act) == pytest.approx(min(act), rel=1e-2) and min(act) > 0
    vocab = json.loads((zero_runs["w1"].run_dir / "config.json").read_text())["model_config"]["vocab_size"]
    assert {r["logits_bytes"] for name in acc for r in acc[name]} == {1 * 128 * vocab * 4}


def test_activation_checkpointing_recomputes_the_same_model(zero_runs, tmp_path):
    """--activation_checkpointing changes what is kept, not what is computed: the same loss and gradient norm as
    the run without it, and far fewer activation bytes kept for backward."""
    base = zero_runs["w1"]
    res = run_bench(tmp_path, *PARITY_ARGS, "--ds_config", "ds_configs/dp_zero2.json", "--activation_checkpointing")
    assert_ok(res)
    assert res.losses() == pytest.approx(base.losses(), rel=1e-6)
    assert [r["grad_norm"] for r in res.records()] == pytest.approx([r["grad_norm"] for r in base.records()], rel=1e-5)
    kept = res.summary()["accounting"]["per_rank"][0]["activation_bytes"]
    assert 0 < kept < 0.5 * base.summary()["accounting"]["per_rank"][0]["activation_bytes"]
    assert json.loads((res.run_dir / "config.json").read_text())["run"]["model"]["activation_checkpointing"] is True


@pytest.mark.parametrize("name", ["w1", "zero0", "zero1", "zero2", "zero3"])
def test_the_planner_predicted_what_each_rank_held_and_moved(zero_runs, name):
    """bench/estimate.py's prediction, made before launch, against what the run counted (docs/planner.md)."""
    assert_plan_matches(zero_runs[name].summary())


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_trains_the_same_model(zero_runs, tmp_path, stage):
    """ZeRO offload (DeepSpeed's CPU Adam updating the offloaded states; install.sh builds it) against the same
    run without offload: the same loss and gradient norm, and the planner's prediction of what it holds."""
    base = zero_runs[f"zero{stage}"]
    res = run_bench(tmp_path, *PARITY_ARGS, "--ds_config", f"ds_configs/dp_zero{stage}_offload.json", nprocs=2,
                    launcher="srun-env")
    assert_ok(res)
    assert res.losses() == pytest.approx(base.losses(), rel=1e-5)
    assert [r["grad_norm"] for r in res.records()] == pytest.approx([r["grad_norm"] for r in base.records()],
                                                                     rel=1e-4)
    ds = json.loads((res.run_dir / "config.json").read_text())["ds_config"]
    assert ds["optimizer"]["params"]["torch_adam"] is False  # CPU Adam, as on a GPU
    assert res.summary()["optimizer"]["name"].endswith("DeepSpeedCPUAdam")
    assert_plan_matches(res.summary())
    plan = res.summary()["memory_plan"]["per_rank"][0]
    assert plan["offloaded_bytes"] >= plan["optimizer_bytes"] > 0  # what the device no longer holds
