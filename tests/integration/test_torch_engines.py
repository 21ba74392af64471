"""PyTorch's DDP and FSDP2 behind the engine seam on the same job as DeepSpeed: the same loss and gradient norm as
one process, step for step (so DDP equals ZeRO-0 and FSDP2 ZeRO-3, which match the same process in their own
suites), with and without LoRA, in fp32 and bf16, under the deepspeed launcher, torchrun, accelerate and srun
alike; what each rank holds and moves counted from the tensors and the collectives, and predicted by the planner;
an exact resume from the engine's own checkpoint after a kill and after a preemption."""
import json

import pytest

from support import assert_ok, assert_plan_matches, assert_resumes_exactly, run_bench, run_many

pytestmark = pytest.mark.multiproc

LOSS_RTOL, GRAD_NORM_RTOL = 1e-6, 1e-5  # fp32, data parallelism only: the same sums in another order
ARGS = ("--peft", "none", "--lr", "1e-3", "--max_steps", "5", "--warmup_steps", "1", "--micro_batch_size", "2",
        "--global_batch_size", "8", "--seq_len", "128", "--eval_interval", "0", "--eval_batches", "2",
        "--packing", "off")
LORA = ("--peft", "lora", "--lr", "1e-2")  # later flags win
ONE = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json")
# bf16: against one DeepSpeed bf16 process, within the bf16 suite's bounds (tests/integration/test_bf16.py: 2u in
# the loss, 4u in the gradient norm); the engines keep fp32 master weights and reduce in fp32 as DeepSpeed does
BF16 = ("--precision", "bf16")
U = 2.0 ** -8

# name -> (arguments, processes, launcher, the one-process run it must match)
RUNS = {
    "w1": ((*ONE, *ARGS), 1, "python", None),
    "w1-lora": ((*ONE, *ARGS, *LORA), 1, "python", None),
    "ddp": (("--ds_config", "ds_configs/ddp.json", *ARGS), 2, "deepspeed", "w1"),
    "fsdp2": (("--ds_config", "ds_configs/fsdp2.json", *ARGS), 2, "torchrun", "w1"),
    "fsdp2-no-reshard": (("--ds_config", "ds_configs/fsdp2_no_reshard.json", *ARGS), 2, "srun-env", "w1"),
    "ddp-lora": (("--strategy", "ddp", "--ds_config", "ds_configs/ddp.json", *ARGS, *LORA), 2, "accelerate",
                 "w1-lora"),
    # with activation checkpointing (recomputing the same forward: the same numbers as the reference without it)
    "fsdp2-lora": (("--strategy", "fsdp2", "--ds_config", "ds_configs/fsdp2.json", *ARGS, *LORA,
                    "--activation_checkpointing"), 2, "srun-env", "w1-lora"),
    # CPUOffloadPolicy: on the CPU the host is the device, so this runs its code path, not its transfers
    "fsdp2-offload": (("--ds_config", "ds_configs/fsdp2_offload.json", *ARGS), 2, "srun-env", "w1"),
    "w1-bf16": ((*ONE, *ARGS, *BF16), 1, "python", None),
    "ddp-bf16": (("--ds_config", "ds_configs/ddp.json", *ARGS, *BF16), 2, "srun-env", "w1-bf16"),
    "fsdp2-bf16": (("--ds_config", "ds_configs/fsdp2.json", *ARGS, *BF16), 2, "srun-env", "w1-bf16"),
    "w1-bf16-lora": ((*ONE, *ARGS, *LORA, *BF16), 1, "python", None),
    "fsdp2-bf16-lora": (("--strategy", "fsdp2", "--ds_config", "ds_configs/fsdp2.json", *ARGS, *LORA, *BF16), 2,
                        "srun-env", "w1-bf16-lora"),  # fp32 adapters and bf16 frozen weights in one FSDP2 unit
}
FP32_RUNS = [n for n, spec in RUNS.items() if spec[3] and "bf16" not in n]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_engines")
    return run_many({name: (root / name, args, {"nprocs": n, "launcher": launcher})
                     for name, (args, n, launcher, _) in RUNS.items()})


@pytest.mark.parametrize("name", [n for n, spec in RUNS.items() if spec[3]])
def test_each_engine_matches_one_process(runs, name):
    ref = runs[RUNS[name][3]]
    assert_ok(ref)
    assert_ok(runs[name])
    a, b = ref.records(), runs[name].records()
    loss_rtol, norm_rtol = (2 * U, 4 * U) if "bf16" in name else (LOSS_RTOL, GRAD_NORM_RTOL)
    assert len(a) == len(b) == 5 and a[-1]["loss"] < a[0]["loss"]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=loss_rtol)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=norm_rtol)
    assert runs[name].summary()["val_loss"] == pytest.approx(ref.summary()["val_loss"], rel=loss_rtol)


def test_bf16_keeps_fp32_master_weights_and_says_what_computed(runs):
    """summary.json dtypes: the trained parameters (fp32 master weights), their gradients and the compute dtype."""
    for name, frozen in (("ddp-bf16", None), ("fsdp2-bf16", None), ("fsdp2-bf16-lora", "bfloat16")):
        s = runs[name].summary()
        assert s["precision"] == "bf16"
        assert s["dtypes"] == {"trainable": "float32", "frozen": frozen, "grad_accum": "float32",
                               "compute": "bfloat16"}


# not fsdp2-lora: it checkpoints, and the planner's saved bytes under checkpointing with LoRA are 18 % under the
# count (the final norm keeps inputs the last layer no longer holds; docs/planner.md), whatever the engine
@pytest.mark.parametrize("name", [*[n for n in FP32_RUNS if n != "fsdp2-lora"], "fsdp2-bf16", "fsdp2-bf16-lora"])
def test_the_planner_predicts_what_each_engine_holds_and_moves(runs, name):
    """The planner's prediction before launch (bench/strategies/torch_dp.py's terms) against the accounting's
    count: model states per rank within 2 %, activations within 15 %, communication per step within 5 %."""
    assert_plan_matches(runs[name].summary())


def test_the_record_names_the_engine_and_counts_what_it_holds_and_moves(runs):
    """summary.json: the engine and strategy, no ZeRO stage; per rank, DDP holds the whole model and all-reduces
    its gradients once per step (one bucket), FSDP2 holds half of each and reduce-scatters the gradients once
    per step, all-gathering the parameters twice per micro-batch (forward and backward) when it reshards after
    forward and once when it does not: each all-gather counted by the shard it sends, as DeepSpeed's logger
    counts ZeRO-3's (bench/accounting.py)."""
    full = {n: runs[n].summary() for n in ("ddp", "fsdp2", "fsdp2-no-reshard")}
    for name, s in full.items():
        assert (s["strategy"], s["engine"], s["zero_stage"]) == (name.split("-")[0], name.split("-")[0], None)
        assert s["optimizer"]["name"] == "torch.optim.adamw.AdamW" and s["memory_plan"]["per_rank"]
    ddp = [r for r in full["ddp"]["accounting"]["per_rank"]]
    params = ddp[0]["params_bytes"]
    assert all(r["params_bytes"] == params and r["grads_bytes"] == params for r in ddp)
    assert ddp[0]["optimizer_bytes"] >= 2 * params  # Adam's two moments
    assert ddp[0]["comm_bytes_per_step"] == {"all_reduce": params}
    accum = 8 // (2 * 2)  # global / (micro x ranks): micro-batches per step
    for name, gathers in (("fsdp2", 2 * accum), ("fsdp2-no-reshard", accum)):
        ranks = full[name]["accounting"]["per_rank"]
        assert sum(r["params_bytes"] for r in ranks) == params  # each parameter split over the two ranks
        comm = ranks[0]["comm_bytes_per_step"]
        assert comm == {"all_gather": gathers * params // 2, "reduce_scatter": params}, (name, comm)


def test_an_engine_config_refuses_what_it_cannot_run(tmp_path):
    """DeepSpeed's sections in another engine's config, --compile on, and a strategy its config does not name are
    refused in one line each, before anything starts."""
    bad = tmp_path / "fsdp2_zero.json"
    bad.write_text(json.dumps({**json.loads(open("ds_configs/fsdp2.json").read()),
                               "zero_optimization": {"stage": 3}}))
    for args, expected in [(("--ds_config", str(bad)), "the fsdp2 engine does not read 'zero_optimization'"),
                           (("--ds_config", "ds_configs/fsdp2.json", "--compile", "on"),
                            "the fsdp2 engine is not compiled yet"),
                           (("--strategy", "ddp", "--ds_config", "ds_configs/dp_zero0.json"),
                            "--strategy ddp needs \"engine\": \"ddp\"")]:
        res = run_bench(tmp_path / "r", *args)
        assert res.returncode == 2 and expected in res.output, res.output[-2000:]


@pytest.mark.parametrize("name, stop", [("ddp", "kill"), ("fsdp2", "sigterm")])
def test_an_engine_checkpoint_resumes_exactly(runs, tmp_path, name, stop):
    """DDP: a rank killed as step 4 starts, resumed from step 2's checkpoint (rank 0's states file); FSDP2:
    preempted by SIGTERM, saved where it stopped (torch.distributed.checkpoint's shards), requeued (exit 75) and
    resumed. Either ends where the uninterrupted run did."""
    assert_resumes_exactly(tmp_path, RUNS[name][0], 2, runs[name], stop)


def test_the_report_puts_deepspeed_and_pytorch_engines_of_one_job_in_one_table(runs):
    """The analysis step groups runs by job (the engine changes how, not what): one DeepSpeed process, DDP and
    FSDP2 of the same job land in one comparison table, each labelled by its strategy."""
    from analysis import collect, tables
    loaded = [collect.load_dir(str(runs[n].run_dir)) for n in ("w1", "ddp", "fsdp2", "fsdp2-no-reshard")]
    (job, members), = tables.by_job(loaded).items()
    rows = {r["strategy"]: r for r in tables.comparison(members, loaded[0])}
    assert set(rows) == {"dp zero1 none (single)", "ddp none (dp2)", "fsdp2 none (dp2)",
                         "fsdp2 no-reshard none (dp2)"}, rows
    assert all(r["throughput increase (x)"] > 0 for r in rows.values())
