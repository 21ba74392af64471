"""A packed run computes what the unpacked run of the same samples computes: the same loss (1e-5), gradient norm
(1e-4) and validation loss, step by step, under data, tensor, expert, pipeline and sequence parallelism, on real
processes; so does padding each micro-batch to its longest sample. Both count the same real tokens, and packing
computes fewer. The document path packed rows take (bench/attention.py) computes what transformers' dense
block-diagonal mask computes (--attn_mask dense, the path before it) under every way attention runs (the plain engine,
the pipeline's stages, Ulysses' gathered row, AutoTP's split heads under TP x EP), and every strategy records the same
attention path for the same batching."""
import pytest

from support import assert_ok, run_many

pytestmark = pytest.mark.multiproc

# test_model_parallel's and test_sequence_parallel's settings (5 steps, the default 8 validation batches): the padded
# TP, EP and SP runs here are then launches those modules make too, made once per session (support.run_many share)
ARGS = ("--peft", "none", "--lr", "1e-3", "--max_steps", "5", "--warmup_steps", "1", "--micro_batch_size", "2",
        "--seq_len", "128", "--eval_interval", "0")
LAYOUTS = {  # name -> (strategy, ds_config, extra arguments)
    "dp": ("dp", "dp_zero2", ("--global_batch_size", "4")),
    "tp": ("tp", "tp2", ("--global_batch_size", "2")),
    "ep": ("ep", "ep2", ("--global_batch_size", "4", "--model", "tiny-mixtral")),
    "pp": ("pp", "pp2", ("--global_batch_size", "4")),  # two micro-batches through the two stages
    "sp": ("sp", "sp2", ("--global_batch_size", "2")),
}
BATCHING = {"packed": ("--packing", "on"), "padded": ("--packing", "off"),
            "longest": ("--packing", "off", "--padding", "longest")}
LAYOUTS["tp_ep"] = ("tp_ep", "tp2_ep2", ("--global_batch_size", "4", "--model", "tiny-mixtral"))  # 4 processes
BATCHING["dense"] = ("--packing", "on", "--attn_mask", "dense")  # packed rows under transformers' dense mask
# The document path against the dense mask where attention differs: the plain engine, the pipeline's stages,
# Ulysses' gathered row and TP x EP, whose attention is AutoTP's split heads on Mixtral. TP alone (the same split
# heads on LLaMA) and EP alone (attention as under DP, only the experts sharded) are the same attention as those.
DENSE = ("dp", "pp", "sp", "tp_ep")
RUNS = {f"{layout}-{way}": (layout, way) for layout in LAYOUTS for way in BATCHING
        if (way != "longest" or layout in ("dp", "pp"))  # longest: the plain engine and the pipeline's shapes
        and (way != "dense" or layout in DENSE)
        and (layout != "tp_ep" or way in ("packed", "dense"))}  # TP x EP: the document path's parity only
PROCESSES = {"tp_ep": 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    launches = {}
    for name, (layout, way) in RUNS.items():
        strategy, config, extra = LAYOUTS[layout]
        args = ("--strategy", strategy, "--ds_config", f"ds_configs/{config}.json", *ARGS, *extra, *BATCHING[way])
        launches[name] = (root / name, args, {"nprocs": PROCESSES.get(layout, 2), "launcher": "srun-env"})
    return run_many(launches, share=True)


@pytest.mark.parametrize("layout", DENSE)
def test_the_document_path_computes_what_the_dense_mask_computes(runs, layout):
    """Packed rows: per-sample attention through the collator's offsets against transformers' block-diagonal
    mask (Ulysses: over the gathered row; pipeline: on every stage), loss and gradient norm step by step."""
    run, dense = runs[f"{layout}-packed"], runs[f"{layout}-dense"]
    assert_ok(run)
    assert_ok(dense)
    a, b = dense.records(), run.records()
    assert len(a) == len(b) == 5
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4)
    assert run.summary()["val_loss"] == pytest.approx(dense.summary()["val_loss"], rel=1e-5)
    assert run.summary()["attention"]["mask"] == "documents" and dense.summary()["attention"]["mask"] == "dense"
    # the document path computes each sample's attention pairs only
    assert [r["computed_tokens"] for r in b] == [r["computed_tokens"] for r in a]


@pytest.mark.parametrize("way", ["packed", "padded", "longest"])
def test_every_strategy_records_the_same_attention_path_for_the_same_batching(runs, way):
    recorded = {name: runs[name].summary()["attention"] for name, (_, w) in RUNS.items() if w == way}
    expected = {"implementation": "sdpa", "kernel": "sdpa per document" if way == "packed" else "sdpa (causal)",
                "mask": "documents" if way == "packed" else "causal"}
    assert recorded and all(a == expected for a in recorded.values()), recorded


@pytest.mark.parametrize("name", [n for n, (lay, way) in RUNS.items()
                                  if way in ("packed", "longest") and f"{lay}-padded" in RUNS])
def test_same_loss_and_gradient_norm_as_the_padded_run(runs, name):
    layout, way = RUNS[name]
    run, padded = runs[name], runs[f"{layout}-padded"]
    assert_ok(run)
    assert_ok(padded)
    a, b = padded.records(), run.records()
    assert len(a) == len(b) == 5
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4)
    assert run.summary()["val_loss"] == pytest.approx(padded.summary()["val_loss"], rel=1e-5)
    assert [r["real_tokens"] for r in b] == [r["real_tokens"] for r in a]
    assert all(x["computed_tokens"] < y["computed_tokens"] for x, y in zip(b, a))  # less padding computed
    assert (run.summary()["batching"], padded.summary()["batching"]) == ({"packed": "packed"}.get(way, way), "max")


@pytest.mark.parametrize("layout", ["dp", "sp", "pp"])
def test_the_planner_counts_a_packed_micro_batchs_activations(runs, layout):
    """What the first micro-batch of a packed run saved for backward on each rank (summary.accounting), against the
    planner's count at that micro-batch's shape, found here by collating it again: within 1 %. Under Ulysses SP
    each layer's mask over the gathered row is saved in the query's dtype (SDPA converts a bool mask), which the
    plan missed by 12-23 % (docs/results/planner_cpu.md). A pipeline stage counts 1.1 % more than planned (15 KiB
    on tiny-llama: not itemized yet), hence its 2 %."""
    from bench import data, estimate
    from bench.plan import plan_layout
    run = runs[f"{layout}-packed"]
    assert_ok(run)
    strategy, config, extra = LAYOUTS[layout]
    plan = plan_layout(["--strategy", strategy, "--ds_config", f"ds_configs/{config}.json", *ARGS, *extra,
                        *BATCHING["packed"]], 2)
    counted = run.summary()["accounting"]["per_rank"]
    for rank, got in enumerate(counted):
        stream = plan.layout.coords(rank).data
        first = data.ShardedBatches(plan.train_data, plan.batch.micro, plan.batch.grad_accum,
                                    plan.layout.data_parallel, stream, plan.cfg.training.seed,
                                    plan.collate).step_batches(0)[0]
        planned = estimate.activation_bytes(plan, rank, *first["input_ids"].shape)["activation_bytes"]
        assert planned == pytest.approx(got["activation_bytes"], rel=0.02 if layout == "pp" else 0.01), (
            rank, tuple(first["input_ids"].shape))
