"""bf16, as every GPU run trains, proven on the CPU (DeepSpeed's CPU accelerator supports bf16): each layout
against one bf16 process with the same micro-batches, in loss and gradient norm, within tolerances derived from
bf16's precision (docs/parity.md), and the planner checked against the bf16 runs as against fp32 ones."""
import pytest

from support import assert_ok, assert_plan_matches, layout_args, planned_params_per_rank, run_suite

pytestmark = pytest.mark.multiproc

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. Two bf16 computations of the same step differ where
# their roundings differ (TP's partial sums rounded before the all-reduce, gradients reduced in another order),
# each within u of the exact value: the mean loss over the batch within 2u, the gradient norm (one more rounded
# tensor, the gradients, on the way) within 4u. Fixed from the precision, not fitted to the runs.
U = 2.0 ** -8
LOSS_RTOL, GRAD_NORM_RTOL = 2 * U, 4 * U
# --attn_mask dense: every run here on transformers' dense padding mask, as this suite was derived and measured;
# on the default causal path (bench/attention.py) TP 2 with LoRA measured 4.1u in the gradient norm at one step
# (the 4u bound counts rounded tensors, not the kernel's blockwise softmax), an open question (docs/parity.md)
ARGS = ("--precision", "bf16", "--lr", "1e-3", "--max_steps", "3", "--warmup_steps", "1", "--micro_batch_size",
        "1", "--seq_len", "128", "--eval_interval", "0", "--packing", "off",  # padded rows: one width to plan
        "--attn_mask", "dense")
LLAMA, MIXTRAL = ("--global_batch_size", "2"), ("--model", "tiny-mixtral", "--global_batch_size", "4")
FULL, LORA = ("--peft", "none"), ("--peft", "lora", "--lr", "1e-2")


# name -> (arguments, processes, the one-process run it must match)
RUNS = {
    "llama-w1": ((*layout_args("dp", "dp_zero1"), *ARGS, *LLAMA, *FULL), 1, None),
    "llama-w1-lora": ((*layout_args("dp", "dp_zero1"), *ARGS, *LLAMA, *LORA), 1, None),
    "mixtral-w1": ((*layout_args("dp", "dp_zero1"), *ARGS, *MIXTRAL, *FULL), 1, None),
    # ZeRO-2 with LoRA only (the default job): ZeRO-1 and ZeRO-2 run one optimizer here (summary.json
    # optimizer.wrapper DeepSpeedZeroOptimizer, gradients accumulated in bf16) with the same gradient hooks, ZeRO-2
    # keeping a partition of each gradient; a full fine-tune through it in bf16: zero1
    **{f"zero{z}{peft}": ((*layout_args("dp", f"dp_zero{z}"), *ARGS, *LLAMA, *flags), 2, f"llama-w1{peft}")
       for z in (1, 2, 3) for peft, flags in (("", FULL), ("-lora", LORA)) if (z, peft) != (2, "")},
    "tp2": ((*layout_args("tp", "tp2"), *ARGS, *LLAMA, *FULL), 2, "llama-w1"),
    "tp2-lora": ((*layout_args("tp", "tp2"), *ARGS, *LLAMA, *LORA), 2, "llama-w1-lora"),  # bf16 adapters, split
    # Not here yet: the DDP baseline (ZeRO-0) in bf16 with LoRA drifts from one process (grad norm 8 % off by step
    # 3, loss within 2u) and holds bf16 gradients where the planner expects fp32 accumulators (docs/parity.md).
    "pp2": ((*layout_args("pp", "pp2"), *ARGS, *LLAMA, *FULL), 2, "llama-w1"),
    "sp2": ((*layout_args("sp", "sp2"), *ARGS, *LLAMA, *FULL), 2, "llama-w1"),
    "ep2": ((*layout_args("ep", "ep2"), *ARGS, *MIXTRAL, *FULL), 2, "mixtral-w1"),
    # Not TP x EP: its bf16 roundings are TP's partial sums (tp2) and EP's exchange (ep2), each bounded here; its
    # fp32 parity: test_model_parallel.py
}
SPLIT = [name for name, (_, _, ref) in RUNS.items() if ref]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("bf16"), RUNS)


@pytest.mark.parametrize("name", SPLIT)
def test_bf16_matches_one_bf16_process(runs, name):
    ref = runs[RUNS[name][2]]
    assert_ok(ref)
    assert_ok(runs[name])
    a, b = ref.records(), runs[name].records()
    assert len(a) == len(b) == 3 and a[-1]["loss"] < a[0]["loss"], a
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=LOSS_RTOL)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=GRAD_NORM_RTOL)


@pytest.mark.parametrize("name", SPLIT)
def test_the_planner_predicts_bf16_runs(runs, name):
    args, procs, _ = RUNS[name]
    s = runs[name].summary()
    assert planned_params_per_rank(*args, world=procs) == [r["total"] for r in s["params"]["per_rank"]]
    assert_plan_matches(s)


def test_precision_and_dtypes_are_recorded(runs):
    """bf16 weights everywhere; the LoRA adapters bf16 under ZeRO-1/2 (DeepSpeed casts the whole module) but fp32
    under ZeRO-3 (built under zero.Init, never cast): recorded as held."""
    for name in ("zero1-lora", "zero2-lora", "zero3-lora", "tp2", "tp2-lora"):
        s = runs[name].summary()
        assert s["precision"] == "bf16", name
    assert runs["zero1-lora"].summary()["dtypes"]["trainable"] == "bfloat16"
    assert runs["zero2-lora"].summary()["dtypes"]["trainable"] == "bfloat16"
    assert runs["zero3-lora"].summary()["dtypes"]["trainable"] == "float32"
    assert runs["zero3-lora"].summary()["dtypes"]["frozen"] == "bfloat16"
    assert runs["tp2"].summary()["dtypes"]["trainable"] == "bfloat16"
    assert runs["tp2-lora"].summary()["dtypes"]["trainable"] == "bfloat16"
