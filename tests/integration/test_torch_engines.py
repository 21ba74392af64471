"""PyTorch's DDP and FSDP2 behind the engine seam on the same job as DeepSpeed: the same loss and gradient norm as
one process, step for step (so DDP equals ZeRO-0 and FSDP2 ZeRO-3, which match the same process in their own
suites), with and without LoRA, under the deepspeed launcher, torchrun, accelerate and srun alike; what each rank
holds and moves counted from the tensors and the collectives; an exact resume from the engine's own checkpoint."""
import json

import pytest

from support import assert_ok, assert_resumes_exactly, run_bench, run_many

pytestmark = pytest.mark.multiproc

LOSS_RTOL, GRAD_NORM_RTOL = 1e-6, 1e-5  # fp32, data parallelism only: the same sums in another order
ARGS = ("--peft", "none", "--lr", "1e-3", "--max_steps", "5", "--warmup_steps", "1", "--micro_batch_size", "2",
        "--global_batch_size", "8", "--seq_len", "128", "--eval_interval", "0", "--eval_batches", "2",
        "--packing", "off")
LORA = ("--peft", "lora", "--lr", "1e-2")  # later flags win
ONE = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json")

# name -> (arguments, processes, launcher, the one-process run it must match)
RUNS = {
    "w1": ((*ONE, *ARGS), 1, "python", None),
    "w1-lora": ((*ONE, *ARGS, *LORA), 1, "python", None),
    "ddp": (("--ds_config", "ds_configs/ddp.json", *ARGS), 2, "deepspeed", "w1"),
    "fsdp2": (("--ds_config", "ds_configs/fsdp2.json", *ARGS), 2, "torchrun", "w1"),
    "fsdp2-no-reshard": (("--ds_config", "ds_configs/fsdp2_no_reshard.json", *ARGS), 2, "srun-env", "w1"),
    "ddp-lora": (("--strategy", "ddp", "--ds_config", "ds_configs/ddp.json", *ARGS, *LORA), 2, "accelerate",
                 "w1-lora"),
    "fsdp2-lora": (("--strategy", "fsdp2", "--ds_config", "ds_configs/fsdp2.json", *ARGS, *LORA), 2, "srun-env",
                   "w1-lora"),
}


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
    assert len(a) == len(b) == 5 and a[-1]["loss"] < a[0]["loss"]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=LOSS_RTOL)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=GRAD_NORM_RTOL)
    assert runs[name].summary()["val_loss"] == pytest.approx(ref.summary()["val_loss"], rel=LOSS_RTOL)


def test_the_record_names_the_engine_and_counts_what_it_holds_and_moves(runs):
    """summary.json: the engine and strategy, no ZeRO stage; per rank, DDP holds the whole model and all-reduces
    its gradients once per step (one bucket), FSDP2 holds half of each and reduce-scatters the gradients once
    per step, all-gathering the parameters twice per micro-batch (forward and backward) when it reshards after
    forward and once when it does not."""
    full = {n: runs[n].summary() for n in ("ddp", "fsdp2", "fsdp2-no-reshard")}
    for name, s in full.items():
        assert (s["strategy"], s["engine"], s["zero_stage"]) == (name.split("-")[0], name.split("-")[0], None)
        assert s["optimizer"]["name"] == "torch.optim.adamw.AdamW" and s["memory_plan"] is None
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
        assert comm == {"all_gather": gathers * params, "reduce_scatter": params}, (name, comm)


def test_an_engine_config_refuses_what_it_cannot_run(tmp_path):
    """DeepSpeed's sections in another engine's config, bf16 (not built yet) and a strategy its config does not
    name are refused in one line each, before anything starts."""
    bad = tmp_path / "fsdp2_zero.json"
    bad.write_text(json.dumps({**json.loads(open("ds_configs/fsdp2.json").read()),
                               "zero_optimization": {"stage": 3}}))
    for args, expected in [(("--ds_config", str(bad)), "the fsdp2 engine does not read 'zero_optimization'"),
                           (("--ds_config", "ds_configs/ddp.json", "--precision", "bf16"), "fp32 only so far"),
                           (("--strategy", "ddp", "--ds_config", "ds_configs/dp_zero0.json"),
                            "--strategy ddp needs \"engine\": \"ddp\"")]:
        res = run_bench(tmp_path / "r", *args)
        assert res.returncode == 2 and expected in res.output, res.output[-2000:]


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_an_engine_checkpoint_resumes_exactly(runs, tmp_path, name):
    """A rank killed as step 4 starts; the same command again resumes from step 2's checkpoint (DDP: rank 0's
    states file; FSDP2: torch.distributed.checkpoint's shards) and ends where the uninterrupted run did."""
    assert_resumes_exactly(tmp_path, RUNS[name][0], 2, runs[name])
