"""The planner (bench/estimate.py, bench-plan): its activation formula against the bytes autograd really saves,
its command line, and the refusal of a layout predicted not to fit. The prediction of model states and
communication is checked against real runs in test_zero, test_model_parallel and test_pipeline."""
import json
import sys

import pytest
import torch

from bench import estimate, gpus, models
from bench.accounting import ActivationCounter
from bench.config import BenchError
from bench.plan import check_memory, plan_layout
from bench.plan_cli import main as bench_plan

pytestmark = pytest.mark.unit


def _saved_bytes(plan, dtype, micro, seq) -> int:
    """What one forward of the Hugging Face model (peft-wrapped for LoRA) saves for backward, counted by the
    harness's own ActivationCounter, on the attention path the plan's run takes (bench/attention.py): a padded
    batch without a mask, or with its attention mask under dense masks."""
    from transformers import AutoModelForCausalLM
    from bench.attention import model_implementation
    from bench.strategies.common import apply_lora
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        plan.model_config, dtype=dtype,
        attn_implementation=model_implementation(plan.cfg.model.attn_implementation, plan.cfg.model.attn_mask))
    if plan.peft == "lora":
        model = apply_lora(model, plan.cfg)
        if plan.zero_stage < 3:  # as deepspeed.initialize does: the whole module, adapters too, in the training
            model.to(dtype)      # dtype (ZeRO-3 leaves the adapters fp32: tests/integration/test_bf16.py checks that plan)
    model.train()
    ids = torch.randint(0, plan.model_config.vocab_size, (micro, seq))
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    held = {(p.untyped_storage().data_ptr(), "cpu", None) for p in model.parameters()}
    masks = {"attention_mask": mask} if plan.attention["mask"] == "dense" else {}
    with ActivationCounter(exclude=held) as counter:
        model(input_ids=ids, labels=ids, **masks)
    return counter.bytes


@pytest.mark.parametrize("model,peft", [("tiny-llama", "none"), ("tiny-llama", "lora"), ("tiny-mixtral", "none"),
                                        ("tiny-mixtral", "lora")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_bytes_match_what_autograd_saves(model, peft, dtype):
    """Two sequence lengths and two micro-batch sizes, fp32 and bf16 (the GPU's dtype, on the CPU here)."""
    plan = plan_layout(["--model", model, "--peft", peft, "--strategy", "dp", "--ds_config",
                        "ds_configs/dp_zero2.json"], 1)
    if dtype == torch.bfloat16:
        plan.ds["bf16"] = {"enabled": True}
    for micro, seq in ((1, 64), (2, 128)):
        predicted = estimate.activation_bytes(plan, 0, micro, seq)["activation_bytes"]
        assert predicted == pytest.approx(_saved_bytes(plan, dtype, micro, seq), rel=0.15), (micro, seq)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_packed_rows_are_planned_as_autograd_saves_them(peft):
    """A packed micro-batch (one row, position ids restarting per sample, no attention mask: the collator's
    document offsets confine attention to each sample, bench/attention.py) against the bytes its forward saves, at
    the width it was packed to; and a micro-batch padded to its longest sample planned at that width."""
    from transformers import AutoModelForCausalLM
    from bench.attention import model_implementation
    from bench.strategies.common import apply_lora
    args = ["--peft", peft, "--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json"]
    plan = plan_layout([*args, "--packing", "on"], 1)
    assert plan.collate.mode == "packed"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(plan.model_config, attn_implementation=model_implementation("sdpa",
                                                                                                         "auto"))
    model.config.use_cache = False  # as bench/models.py trains: transformers finds packing only without a cache
    model = apply_lora(model, plan.cfg) if peft == "lora" else model
    model.train()
    batch = plan.collate(plan.train_data, torch.arange(4))  # the first four samples in one row
    held = {(p.untyped_storage().data_ptr(), "cpu", None) for p in model.parameters()}
    with ActivationCounter(exclude=held) as counter:
        model(**batch)
    rows, width = batch["input_ids"].shape
    assert rows == 1 and "attention_mask" not in batch
    assert estimate.activation_bytes(plan, 0, rows, width)["activation_bytes"] == pytest.approx(counter.bytes,
                                                                                               rel=0.15)
    longest = plan_layout([*args, "--packing", "off", "--padding", "longest"], 1)
    padded = longest.collate(longest.train_data, torch.arange(4))
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] < longest.cfg.data.seq_len
    rows, width = padded["input_ids"].shape
    assert estimate.activation_bytes(longest, 0, rows, width)["activation_bytes"] == pytest.approx(
        _saved_bytes(longest, torch.float32, rows, width), rel=0.15)


@pytest.mark.parametrize("layout,batching", [
    ("dp_zero2", ("--packing", "on")), ("dp_zero2", ("--packing", "off", "--padding", "longest")),
    ("dp_zero2", ("--packing", "off")), ("sp2", ("--packing", "on", "--tiled_loss"))])
def test_the_peak_is_planned_at_the_micro_batch_that_holds_the_most(layout, batching):
    """Packed and longest-padded micro-batches vary in width from one to the next: throughput and FLOPs are
    planned at the mean one, the memory peak at the one that holds the most, found here by collating every
    micro-batch of every data-parallel rank the run will train on and counting each one's activations, logits and
    loss; the peak grows by what that one holds beyond the mean."""
    from bench import data
    strategy = "sp" if layout.startswith("sp") else "dp"
    plan_args = ["--strategy", strategy, "--ds_config", f"ds_configs/{layout}.json", "--micro_batch_size", "2",
                 "--global_batch_size", "4" if strategy == "sp" else "8", "--max_steps", "6", *batching]
    plan = plan_layout(plan_args, 2)
    streams = plan.layout.data_parallel
    samples = plan.train_data
    if samples is None:  # rows padded to --seq_len: the plan read no data (reads_data); the run will
        assert plan.collate.mode == "max"
        samples = plan_layout([*plan_args[:-1], "on"], 2).train_data
    shapes = []
    for rank in range(streams):
        sharded = data.ShardedBatches(samples, 2, plan.batch.grad_accum, streams, rank, plan.cfg.training.seed,
                                      plan.collate)
        shapes += [tuple(b["input_ids"].shape) for step in range(6) for b in sharded.step_batches(step)]
    assert plan.micro_shapes == sorted(set(shapes))
    mean = (round(sum(r for r, _ in shapes) / len(shapes)), round(sum(w for _, w in shapes) / len(shapes)))
    assert plan.micro_shape == mean

    def ulysses_loss_slice(plan, shape):  # SP's own term (its module), imported only where SP runs
        from bench.strategies.ulysses import loss_slice_bytes
        return loss_slice_bytes(plan, shape)

    def held(shape):  # one micro-batch's saved tensors, its logits, and the loss's fp32 copy and gradient of them
        act = estimate.activation_bytes(plan, 0, *shape)
        loss = (ulysses_loss_slice(plan, shape) if plan.cfg.parallelism.tiled_loss
                else 2 * act["logits_bytes"] * 4 // estimate._width(plan))
        return act["activation_bytes"] + act["recompute_bytes"] + act["logits_bytes"] + loss

    extra = max(held(s) for s in shapes) - held(mean)
    r = estimate.estimate(plan, None, device="cpu")["per_rank"][0]
    assert r["peak_micro_batch_bytes"] == max(0, extra)
    if plan.collate.mode == "max":
        assert extra == 0 and shapes == [(2, plan.cfg.data.seq_len)] * len(shapes)
    else:
        assert len(set(shapes)) > 1 and extra > 0
    states = sum(r[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes"))
    assert r["total_bytes"] == states + max(r["activation_bytes"] + r["transient_bytes"] + extra,
                                            r["step_transient_bytes"])


@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_attention_keeps_its_score_matrices(peft, dtype):
    """--attn_implementation eager keeps the fp32 softmax and its copy in the training dtype (the score matrices
    SDPA recomputes, though it keeps no mask, output or log-sum-exp): planned as autograd saves them."""
    args = ["--peft", peft, "--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json"]
    plan, sdpa = (plan_layout([*args, "--attn_implementation", impl], 1) for impl in ("eager", "sdpa"))
    if dtype == torch.bfloat16:
        plan.ds["bf16"] = sdpa.ds["bf16"] = {"enabled": True}
    for micro, seq in ((1, 64), (2, 128)):
        predicted = estimate.activation_bytes(plan, 0, micro, seq)["activation_bytes"]
        assert predicted == pytest.approx(_saved_bytes(plan, dtype, micro, seq), rel=0.15), (micro, seq)
    assert estimate.activation_bytes(plan, 0, 2, 128)["activation_bytes"] > \
        estimate.activation_bytes(sdpa, 0, 2, 128)["activation_bytes"]


def test_bench_plan_prints_a_verdict_and_json(capsys):
    args = ["--model", "llama3.1-8b", "--init", "random", "--strategy", "dp", "--ds_config",
            "ds_configs/dp_zero3.json", "--peft", "none", "--micro_batch_size", "1", "--seq_len", "2048",
            "--world_size", "8", "--gpu", "H100-80GB"]
    assert bench_plan(args) == 0
    out = capsys.readouterr().out
    assert "memory plan per rank" in out and "fits, headroom" in out
    assert bench_plan([*args, "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["fits"] is True and est["capacity_bytes"] == gpus.capacity_bytes("H100-80GB")
    assert [r["rank"] for r in est["per_rank"]] == list(range(8))
    for r in est["per_rank"]:
        parts = sum(r[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes",
                                   "activation_bytes", "transient_bytes", "peak_micro_batch_bytes",
                                   "overhead_bytes"))
        assert r["total_bytes"] == parts and r["step_transient_bytes"] == 0  # ZeRO-3: no fp32 copy at the step
        # ZeRO-3 over 8 ranks, for 1/8 of 8.03 B parameters each: Adam's two fp32 states, and the gradients'
        # bf16 reduce-scatter target and fp32 partition (16 bytes per parameter with the bf16 weights)
        assert r["optimizer_bytes"] == pytest.approx(8 * 8.03e9 / 8, rel=0.01)
        assert r["grads_bytes"] == pytest.approx(6 * 8.03e9 / 8, rel=0.01)
    assert set(est["comm_bytes_per_step"]) == {"reduce_scatter", "all_gather", "all_reduce"}
    assert est["flops_per_rank_per_step"] > 0
    # 80 GB cannot hold a full fine-tune of 8 B parameters on two GPUs without ZeRO-3 (16 bytes each)
    args[args.index("--ds_config") + 1], args[args.index("--world_size") + 1] = "ds_configs/dp_zero1.json", "2"
    assert bench_plan(args) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_bench_plan_refuses_bad_input_in_one_line(capfd):
    assert bench_plan(["--world_size", "2", "--gpu", "V100"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --gpu 'V100'" in err[0] and "H100-80GB" in err[0]
    assert bench_plan(["--gpu", "H100-80GB"]) == 2
    assert "needs --world_size" in capfd.readouterr().err
    assert bench_plan(["--world_size", "two"]) == 2
    assert "--world_size" in capfd.readouterr().err
    assert bench_plan(["--world_size", "2", "--gpu_memory_gib", "0"]) == 2
    assert "must be positive" in capfd.readouterr().err
    assert bench_plan(["--recommend", "--world_size=2", "--gpu", "H100-80GB", "--model", "no-such-model"]) == 2
    assert "no layout could be planned" in capfd.readouterr().err
    # an impossible layout: refused as bench/run.py refuses it (the same resolve)
    assert bench_plan(["--strategy", "tp", "--ds_config", "ds_configs/tp2.json", "--world_size", "3"]) == 2
    assert "layout does not fit" in capfd.readouterr().err


def test_the_fp32_gradient_partition_at_the_step_is_planned_after_backward():
    """ZeRO-1/2 in bf16 copy each group's gradient partition to fp32 at the optimizer step (stage_1_and_2.py
    step, flat_grad_partition.to(fp32)), after backward freed its activations: a full fine-tune of LLaMA 3.1 8B on 8
    ranks under ZeRO-2 holds 8.03 B / 8 x 4 bytes more at the step, which at a short sequence is the peak. fp32
    training converts nothing; ZeRO-3 and offload keep no such copy on the device."""
    args = ["--model", "llama3.1-8b", "--init", "random", "--peft", "none", "--micro_batch_size", "1",
            "--seq_len", "128", "--strategy", "dp"]
    zero2 = plan_layout([*args, "--ds_config", "ds_configs/dp_zero2.json"], 8, "NVIDIA H100 80GB HBM3")
    est = estimate.estimate(zero2, None)
    r = est["per_rank"][0]
    copy = -(-zero2.total_params // 8) * 4  # one fp32 element per parameter of the rank's partition
    assert r["step_transient_bytes"] == pytest.approx(copy, rel=1e-3)
    states = sum(r[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes"))
    backward = states + r["activation_bytes"] + r["transient_bytes"] + r["peak_micro_batch_bytes"]
    assert r["step_transient_bytes"] > backward - states  # the step is the peak here
    assert r["total_bytes"] == max(backward, states + r["step_transient_bytes"]) + r["overhead_bytes"]
    for config in ("dp_zero3", "dp_zero2_offload"):
        other = plan_layout([*args, "--ds_config", f"ds_configs/{config}.json"], 8, "NVIDIA H100 80GB HBM3")
        assert estimate.estimate(other, None)["per_rank"][0]["step_transient_bytes"] == 0, config
    fp32 = plan_layout([*args, "--ds_config", "ds_configs/dp_zero2.json", "--precision", "fp32"], 8)
    assert estimate.estimate(fp32, None)["per_rank"][0]["step_transient_bytes"] == 0


def test_the_load_is_planned_per_rank_and_the_guard_refuses_on_the_larger_peak():
    """A model-parallel rank loads its shard plus one transient (bench/loading.py): Mixtral 8x7B under EP2 with
    LoRA loads one layer's local experts three times over beside its half of the experts, which at a small batch is
    more than training holds; a layout without model parallelism loads the whole model. A capacity between the two
    peaks is refused, naming the load."""
    args = ["--model", "mixtral-8x7b", "--init", "random", "--peft", "lora", "--micro_batch_size", "1",
            "--seq_len", "128", "--global_batch_size", "2"]
    ep = plan_layout([*args, "--strategy", "ep", "--ds_config", "ds_configs/ep2.json"], 2, "NVIDIA H100 80GB HBM3")
    est = estimate.estimate(ep, None)
    c = models.count_params_from_config(ep.model_config)
    layer_experts = c["layer"]["experts"] * c["layer"]["mlp"]
    shard = ep.total_params - c["layers"] * layer_experts // 2  # half the experts, everything else whole
    device = shard * 2 + 3 * (layer_experts // 2) * 2  # bf16
    assert est["per_rank"][0]["load_bytes"] == int(device + estimate.CONTEXT_BYTES + estimate.FRAGMENTATION * device)
    assert est["load_peak_bytes"] > est["training_peak_bytes"] and est["peak_bytes"] == est["load_peak_bytes"]
    whole = plan_layout([*args, "--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json"], 1,
                        "NVIDIA H100 80GB HBM3")
    assert estimate.load_bytes(whole, 0)["device"] == whole.total_params * 2
    between = (est["training_peak_bytes"] + est["load_peak_bytes"]) // 2
    with pytest.raises(BenchError, match=r"predicted loading peak .* GiB per GPU"):
        check_memory(ep, capacity=between)


def test_a_layout_predicted_not_to_fit_is_refused_on_a_gpu_unless_ignored():
    """check_memory is what bench/run.py calls before any weight is loaded (the CPU never refuses)."""
    cpu = plan_layout(["--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json"], 1)
    assert check_memory(cpu)["fits"] is None
    args = ("--model", "llama3.1-8b", "--init", "random", "--strategy", "dp", "--ds_config",
            "ds_configs/dp_zero1.json", "--peft", "none", "--micro_batch_size", "2", "--seq_len", "2048")
    gpu = plan_layout(list(args), 2, "NVIDIA H100 80GB HBM3")
    with pytest.raises(BenchError, match=r"predicted training peak .* GiB per GPU against 79\.1 GiB .*ZeRO-3"):
        check_memory(gpu, capacity=gpus.capacity_bytes("H100-80GB"))
    ignored = plan_layout([*args, "--ignore_memory_plan"], 2, "NVIDIA H100 80GB HBM3")
    assert check_memory(ignored, capacity=gpus.capacity_bytes("H100-80GB"))["fits"] is False


def test_recommend_lists_fitting_layouts_fastest_first(capfd):
    args = ["--recommend", "--world_size", "2", "--gpu", "A100-40GB", "--seq_len", "128", "--global_batch_size", "8"]
    assert bench_plan([*args, "--json", "--top", "1000"]) == 0
    # the last line: DeepSpeed, imported earlier in this test process, logs to the stdout it found (bench-plan
    # itself imports it with stdout sent to stderr; test_bench_plan_json_is_all_stdout checks that)
    out = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    rows = out["layouts"]
    assert rows and all(r["peak_bytes"] <= gpus.capacity_bytes("A100-40GB") for r in rows)
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    # every 2-rank layout of the tiny LLaMA (ZeRO data parallel, TP, the pipeline, SP, PyTorch's DDP and FSDP2)
    # for one job: the full fine-tune unless --peft says otherwise
    assert {r["strategy"] for r in rows} == {"dp", "tp", "pp", "sp", "ddp", "fsdp2"}
    assert {r["peft"] for r in rows} == {"none"}
    # 8 samples per step: a micro batch of 8 only where one data stream takes them all (TP, pipeline, SP)
    assert {r["strategy"] for r in rows if r["micro_batch_size"] == 8} == {"tp", "pp", "sp"}
    assert any("bf16 peak" in n for n in out["assumptions"])
    for r in rows:  # the step in parts: recompute only under checkpointing, a bubble only in a pipeline
        parts = ("compute_s", "recompute_s", "communication_s", "bubble_s", "offload_s")
        assert r["step_s"] == pytest.approx(sum(r[k] for k in parts))
        assert (r["recompute_s"] > 0) is r["activation_checkpointing"]
        assert r["recompute_s"] == pytest.approx(r["compute_s"] / 3 if r["activation_checkpointing"] else 0)
        assert (r["bubble_s"] > 0) is (r["strategy"] == "pp")
    assert bench_plan([*args, "--json", "--peft", "lora"]) == 0
    assert {r["peft"] for r in json.loads(capfd.readouterr().out.strip().splitlines()[-1])["layouts"]} == {"lora"}
    assert bench_plan(args) == 0 and "fastest predicted first (--peft none)" in capfd.readouterr().out
    assert bench_plan(["--recommend", "--world_size", "2", "--gpu_memory_gib", "40"]) == 2
    assert "needs --gpu NAME" in capfd.readouterr().err
    assert bench_plan([*args, "--strategy", "tp"]) == 2
    assert "chooses --strategy itself" in capfd.readouterr().err


def test_bench_plan_json_is_all_stdout():
    """A program reading --json gets nothing else on stdout (a fresh process: DeepSpeed imported inside)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "bench.plan_cli", "--world_size", "2", "--gpu", "H100-80GB",
                          "--strategy", "tp", "--ds_config", "ds_configs/tp2.json", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["fits"] is True


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy: bench.plan imported already
def test_a_padded_plan_reads_no_data_and_python_m_bench_plan_runs_the_cli(capfd, monkeypatch):
    """Rows padded to --seq_len plan the same whatever the data holds: planning them needs no data file (a run that
    trains still reads it); `python -m bench.plan` is bench-plan."""
    import runpy
    args = ["--model", "llama3.1-8b", "--init", "random", "--ds_config", "ds_configs/dp_zero3.json",
            "--world_size", "8", "--gpu", "H100-80GB", "--data", "/nonexistent/file.json"]
    monkeypatch.setattr(sys, "argv", ["bench.plan", *args, "--packing", "off", "--json"])
    with pytest.raises(SystemExit) as ended:
        runpy.run_module("bench.plan", run_name="__main__")
    assert ended.value.code == 0 and json.loads(capfd.readouterr().out)["fits"] is True
    assert bench_plan([*args, "--packing", "on"]) == 2  # packed rows take their shapes from the samples
    assert "data file not found: /nonexistent/file.json" in capfd.readouterr().err


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_fsdp2_shards_every_parameter_by_its_rows_as_torch_chunk_does(peft):
    """Each rank's FSDP2 shard (bench/strategies/torch_dp.py) against torch.chunk of every parameter of the model
    peft builds, on 3 ranks (uneven rows: the last rank gets fewer); DDP holds the whole model on every rank."""
    from peft import LoraConfig, get_peft_model
    from bench.architecture import meta_model, target_names
    args = ["--model", "tiny-llama", "--peft", peft, "--packing", "off", "--ds_config"]
    plan = plan_layout([*args, "ds_configs/fsdp2.json"], 3)
    model = meta_model(plan.model_config)
    if peft == "lora":
        model = get_peft_model(model, LoraConfig(r=plan.cfg.model.lora_r, target_modules=target_names(plan.cfg)))
    params = list(model.parameters())
    counted = [sum(torch.chunk(p, 3)[r].numel() if r < len(torch.chunk(p, 3)) else 0 for p in params)
               for r in range(3)]
    assert plan.strategy.params_per_rank(plan) == counted and counted[0] > counted[2]
    ddp = plan_layout([*args, "ds_configs/ddp.json"], 3)
    assert ddp.strategy.params_per_rank(ddp) == [sum(p.numel() for p in params)] * 3
