"""What a run leaves behind: summary.json (the metrics contract), metrics.jsonl, device_monitor.csv, config.json
and the W&B offline run, read back with wandb's own reader."""
import csv
import json
import math

import pytest

from bench import summary
from bench.config import recorded_flags
from support import assert_ok

pytestmark = pytest.mark.multiproc

# Every key bench/summary.py writes for every run (strategy sections come only with their strategies).
CONTRACT = [k for k in summary.KEYS if k not in summary.STRATEGY_SECTIONS]


@pytest.fixture(scope="module")
def run(zero_runs):
    res = zero_runs["zero2"]
    assert_ok(res)
    return res


def test_tokens_per_s_counts_the_real_tokens_of_the_measured_steps(run):
    """Recomputed from the data: the measured steps' global batches, their attention masks summed (padding out),
    over the sum of those steps' times; the SQuAD sample at seq 128 is partly padding, which MFU does not count."""
    from bench import data, models
    s, cfg = run.summary(), recorded_flags(json.loads((run.run_dir / "config.json").read_text())["run"])
    _, source, _ = models.load_config(cfg["model"], cfg["init"])
    train, _ = data.load_dataset(cfg["data"], models.load_tokenizer(source), cfg["seq_len"], cfg["val_fraction"],
                                 cfg["seed"])
    whole = data.ShardedBatches(train, s["global_batch_size"], 1, 1, 0, cfg["seed"],  # one global batch per step
                                data.Collate(dense=True))  # its rows with their attention masks
    measured = [r for r in run.records() if not r["warmup"]]
    real = sum(int(whole.step_batches(r["step"] - 1)[0]["attention_mask"].sum()) for r in measured)
    assert len(measured) == s["measured_steps"] > 0 and [r["real_tokens"] for r in measured] == [
        int(whole.step_batches(r["step"] - 1)[0]["attention_mask"].sum()) for r in measured]
    assert s["tokens_per_s"] == pytest.approx(real / sum(r["step_time_s"] for r in measured))
    assert real < s["global_batch_size"] * s["seq_len"] * len(measured)
    # computed: the data's default for QA, packed: each rank's micro-batch of samples is one row of their tokens,
    # padded up to a multiple of 64
    assert s["batching"] == "packed"
    ranks = [data.ShardedBatches(train, s["micro_batch_size"], s["grad_accum"], 2, r, cfg["seed"]) for r in (0, 1)]
    computed = [sum(-(-int(train.attention_mask[idx].sum()) // 64) * 64
                    for b in ranks for idx in b.step_indices(r["step"] - 1)) for r in measured]
    assert [r["computed_tokens"] for r in measured] == computed
    assert s["computed_tokens_per_s"] == pytest.approx(sum(computed) / sum(r["step_time_s"] for r in measured))
    assert s["tokens_per_s"] <= s["computed_tokens_per_s"] and s["hfu"] is None  # no peak on the CPU


def test_summary_has_every_contract_key_with_sane_values(run):
    s = run.summary()
    missing = [k for k in CONTRACT if k not in s]
    assert not missing, missing
    assert s["status"] == "completed" and s["error"] is None
    assert (s["strategy"], s["model"], s["peft"], s["world_size"]) == ("dp", "tiny-llama", "none", 2)
    assert s["layout"] == {"dp": 2, "tp": 1, "ep": 1, "pp": 1, "sp": 1}
    assert s["global_batch_size"] == s["micro_batch_size"] * s["grad_accum"] * 2 == 4
    st = s["step_time_s"]
    assert 0 < st["median"] <= st["p90"] and st["mean"] > 0
    assert s["steps"] == 5
    # throughput is consistent with the step time (independent arithmetic)
    assert s["samples_per_s"] == pytest.approx(4 / st["mean"])
    measured = [r for r in run.records() if not r["warmup"]]  # every position, the packed rows' padding too
    assert s["computed_tokens_per_s"] == pytest.approx(sum(r["computed_tokens"] for r in measured)
                                                      / sum(r["step_time_s"] for r in measured))
    assert s["computed_tokens_per_s_per_gpu"] == pytest.approx(s["computed_tokens_per_s"] / 2)
    assert s["tokens_per_s_per_gpu"] == pytest.approx(s["tokens_per_s"] / 2)
    assert s["tflops_per_gpu"] > 0 and s["mfu"] is None  # CPU: no known peak, so no invented MFU
    assert s["goodput"]["updates_per_s"] == pytest.approx(5 / s["train_wall_time_s"])
    assert 0 < s["goodput"]["tokens_per_s"] < s["tokens_per_s"]  # padding and prompts are not useful tokens
    assert s["time_to_target_s"] is not None and s["steps_to_target"] == 1  # target 100 is met at once
    assert 0 < s["time_to_first_step_s"] < s["total_wall_time_s"]
    assert math.isfinite(s["loss"]["first"]) and math.isfinite(s["val_loss"])
    assert [r["rank"] for r in s["memory"]["per_rank"]] == [0, 1]
    assert all(r["peak_rss_mib"] > 50 for r in s["memory"]["per_rank"])
    devs = s["memory"]["device"]
    assert [d["index"] for d in devs] == [0, 1]
    assert all(d["peak_mib"] >= d["avg_mib"] > 0 for d in devs)
    assert s["params"]["total"] == s["params"]["trainable"] > 100_000
    assert s["versions"]["deepspeed"] and s["versions"]["torch"]
    # what ran: the device's versions (null on the CPU), the MFU peak's source, the optimizer
    assert {"cuda", "nccl", "cuda_driver", "gpu_name", "gpu_count"} <= set(s["versions"])
    assert s["versions"]["gpu_count"] == 0 and s["peak_tflops_source"].startswith("unknown")
    assert s["optimizer"] == {"name": "torch.optim.adamw.AdamW", "fused": True, "wrapper": "DeepSpeedZeroOptimizer"}


def test_memory_is_recorded_by_phase(run):
    """The training peak is the measured steps', not the model load's; every phase has its own."""
    s = run.summary()
    assert s["measured_steps"] == 3, "5 steps, the first two untimed"
    for r in s["memory"]["per_rank"]:
        assert set(r["phases"]) == {"load", "warmup", "training"}
        assert r["peak_rss_mib"] == r["phases"]["training"]["peak_rss_mib"] > 0
        assert 0 < r["rss_before_model_mib"] <= r["phases"]["load"]["peak_rss_mib"]
        assert r["peak_allocated_mib"] is None, "the CPU has no allocator"
    assert s["memory"]["plan_check"] is None, "no allocator peak to compare the plan with on the CPU"


def test_startup_phases_add_up_to_time_to_first_step(run):
    s = run.summary()
    phases = s["startup_s"]
    assert list(phases) == ["imports_s", "resolve_s", "data_s", "process_group_s", "run_records_s", "model_build_s",
                            "ds_initialize_s", "setup_s", "first_step_s"]
    assert all(v >= 0 for v in phases.values()), phases
    assert sum(phases.values()) == pytest.approx(s["time_to_first_step_s"], abs=1e-3)
    # the last phase is step 1 itself, which the loop timed on its own clock
    assert phases["first_step_s"] == pytest.approx(run.records()[0]["elapsed_s"], abs=0.5)
    assert s["cpu_threads"]["local_ranks"] == 2 and s["cpu_threads"]["per_rank"] >= 1


def test_metrics_jsonl_has_one_line_per_step(run):
    recs = run.records()
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    for r in recs:
        for key in ("loss", "lr", "step_time_s", "tokens_per_s", "memory/rss_mib"):
            assert key in r, key
    assert "val_loss" in recs[-1]
    s = run.summary()
    assert s["loss"]["first"] == recs[0]["loss"] and s["loss"]["last"] == recs[-1]["loss"]
    measured = [r["step_time_s"] for r in recs if not r["warmup"]]
    # --warmup_steps 1, but steps 1-2 are instrumented (bench/accounting.py): never timed
    assert [r["warmup"] for r in recs] == [True, True, False, False, False]
    assert len(measured) == 3 and s["step_time_s"]["mean"] == pytest.approx(sum(measured) / 3)


def test_config_json_records_resolved_ds_config(run):
    c = json.loads((run.run_dir / "config.json").read_text())
    ds = c["ds_config"]
    assert "train_batch_size" not in ds and ds["gradient_accumulation_steps"] == 1
    assert c["batch"] == {"global": 4, "micro": 2, "grad_accum": 1}
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["bf16"]["enabled"] is False  # "auto" on CPU
    assert ds["optimizer"]["params"]["lr"] == 1e-3  # CLI beats the ds_config's "auto"
    assert "auto" not in json.dumps(ds)
    assert c["run"]["parallelism"]["strategy"] == "dp" and c["versions"]["transformers"]


def test_device_monitor_csv(run):
    rows = list(csv.DictReader((run.run_dir / "device_monitor.csv").open()))
    assert {r["device"] for r in rows} == {"0", "1"}
    assert all(float(r["memory_used_mib"]) > 0 for r in rows)
    times = [float(r["time_s"]) for r in rows if r["device"] == "0"]
    assert times == sorted(times) and len(times) >= 2


def test_wandb_offline_run_holds_the_metrics(run):
    records = run.wandb_records()
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in history] == pytest.approx(run.losses())
    run_rec = next(r["run"] for r in records if r["type"] == "run")
    assert run_rec["project"] == "ds-parallel-bench" and run_rec["run_id"] == run.summary()["wandb_run_id"]
    assert run_rec["config"]["update"]["ds_config"]["zero_optimization"]["stage"] == 2
    summary = run.wandb_summary()
    assert summary["status"] == "completed"
    assert summary["tokens_per_s"] == pytest.approx(run.summary()["tokens_per_s"])
    assert summary["step_time_s/median"] == pytest.approx(run.summary()["step_time_s"]["median"])
    metrics = [r["metric"] for r in records if r["type"] == "metric"]
    assert any(m.get("glob_name") == "*" and m.get("step_metric") == "step" for m in metrics)


def test_every_rank_starts_its_timed_step_together(tmp_path):
    """Rank 0 spends 0.6 s between steps (what its metrics.jsonl, W&B and console writes do, exaggerated: the slow
    step fault sleeps before the clock starts). Every rank starts its clock after a barrier, so no rank times
    that wait: without it, rank 1 would start its clock and wait for rank 0 in its first collective, and every
    step would read >= 0.6 s. Each rank's own statistics are recorded."""
    from support import PARITY_ARGS, run_bench
    res = run_bench(tmp_path, *PARITY_ARGS, "--ds_config", "ds_configs/dp_zero2.json", "--max_steps", "6",
                    nprocs=2, launcher="srun-env", env={"BENCH_FAULT_SLOW_STEP_S": "0.6", "BENCH_FAULT_RANK": "0"})
    assert_ok(res)
    s = res.summary()
    assert s["measured_steps"] == 4
    assert all(r["step_time_s"] < 0.3 for r in res.records() if not r["warmup"]), res.records()
    by_rank = s["step_time_by_rank"]
    assert [r["rank"] for r in by_rank["per_rank"]] == [0, 1]
    for r in by_rank["per_rank"]:
        assert r["min"] <= r["median"] <= r["max"] < 0.3
    # the slowest rank's own times are the step times the run reports (each step's maximum over ranks)
    slowest = max(r["max"] for r in by_rank["per_rank"])
    assert slowest == pytest.approx(max(r["step_time_s"] for r in res.records() if not r["warmup"]))
    assert by_rank["slowest_over_fastest"] >= 1.0
