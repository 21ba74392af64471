"""Models whose LM head is their embedding (LLaMA 3.2 1B/3B and most small models): every strategy that splits or
stages the model trains the one tied weight as one process does. Under AutoTP the tied head becomes
vocabulary-parallel with DeepSpeed's matching loss (bench/strategies/tp_lora.py hands it to the model under
LoRA); a pipeline keeps a copy on its first and last stage and sums their gradients (TiedLayerSpec)."""
import pytest

from support import assert_ok, assert_plan_matches, layout_args, planned_params_per_rank, run_suite

pytestmark = pytest.mark.multiproc

LOSS_RTOL, GRAD_NORM_RTOL = 1e-5, 1e-4  # fp32 sums reordered, as in test_model_parallel (docs/parity.md)
ARGS = ("--lr", "1e-3", "--max_steps", "4", "--warmup_steps", "1", "--micro_batch_size", "1", "--seq_len", "128",
        "--eval_interval", "0", "--packing", "off")  # padded rows: one width for the planner to compare
LLAMA, MIXTRAL = ("--model", "tiny-llama-tied", "--global_batch_size", "2"), \
    ("--model", "tiny-mixtral-tied", "--global_batch_size", "4")
FULL, LORA = ("--peft", "none"), ("--peft", "lora", "--lr", "1e-2")


# name -> (arguments, processes, the one-process run it must match)
RUNS = {
    "llama-w1": ((*layout_args("dp", "dp_zero1"), *ARGS, *LLAMA, *FULL), 1, None),
    "llama-w1-lora": ((*layout_args("dp", "dp_zero1"), *ARGS, *LLAMA, *LORA), 1, None),
    "mixtral-w1": ((*layout_args("dp", "dp_zero1"), *ARGS, *MIXTRAL, *FULL), 1, None),
    "llama-tp2": ((*layout_args("tp", "tp2"), *ARGS, *LLAMA, *FULL), 2, "llama-w1"),
    "llama-tp2-lora": ((*layout_args("tp", "tp2"), *ARGS, *LLAMA, *LORA), 2, "llama-w1-lora"),
    "llama-pp2": ((*layout_args("pp", "pp2"), *ARGS, *LLAMA, *FULL), 2, "llama-w1"),
    "llama-sp2": ((*layout_args("sp", "sp2"), *ARGS, *LLAMA, *FULL), 2, "llama-w1"),
    "llama-zero3-lora": ((*layout_args("dp", "dp_zero3"), *ARGS, *LLAMA, *LORA), 2, "llama-w1-lora"),
    "mixtral-ep2": ((*layout_args("ep", "ep2"), *ARGS, *MIXTRAL, *FULL), 2, "mixtral-w1"),
    "mixtral-tp2ep2": ((*layout_args("tp_ep", "tp2_ep2"), *ARGS, *MIXTRAL, *FULL), 4, "mixtral-w1"),
}
# Not run, the same code as runs here: PP 2 with LoRA (under LoRA the tied weight is frozen: the pipeline's copies on
# the first and last stage get no gradient to sum; a frozen tied weight under LoRA: llama-tp2-lora, llama-zero3-lora;
# LoRA under PP: test_pipeline.py) and TP x EP with LoRA (the vocabulary-parallel tied head handed to the model under
# LoRA is llama-tp2-lora's, tp_lora.py; EP leaves the tied weight whole, mixtral-ep2)
SPLIT = [name for name, (_, _, ref) in RUNS.items() if ref]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("tied"), RUNS)


@pytest.mark.parametrize("name", SPLIT)
def test_the_tied_weight_trains_as_in_one_process(runs, name):
    _, _, ref = RUNS[name]
    assert_ok(runs[ref])
    assert_ok(runs[name])
    a, b = runs[ref].records(), runs[name].records()
    assert len(a) == len(b) == 4 and a[-1]["loss"] < a[0]["loss"], a
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=LOSS_RTOL)
    assert runs[name].summary()["val_loss"] == pytest.approx(runs[ref].summary()["val_loss"], rel=LOSS_RTOL)


# DeepSpeed 0.19.8 under AutoTP x AutoEP with trained experts: the two ranks of a TP group hold different experts,
# but its norm counts parameters not marked tensor-parallel on TP rank 0 only (zero/stage_1_and_2.py,
# get_grad_norm_direct; runtime/utils.py, clip_grad_norm_ without ZeRO), so the other rank's experts are left out:
# measured, the norm is exactly sqrt(dense + rank 0's experts), 0.4 % low here (docs/parity.md). The update is
# unchanged under Adam (scale-invariant) unless clipping binds. Strict: this fails once DeepSpeed counts them.
EXPERTS_LEFT_OUT = pytest.mark.xfail(strict=True, reason="DeepSpeed's grad norm omits the experts of TP ranks > 0")


@pytest.mark.parametrize("name", [pytest.param(n, marks=EXPERTS_LEFT_OUT) if n == "mixtral-tp2ep2" else n
                                  for n in SPLIT])
def test_the_gradient_norm_is_one_process_s(runs, name):
    a, b = runs[RUNS[name][2]].records(), runs[name].records()
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=GRAD_NORM_RTOL)


@pytest.mark.parametrize("name", SPLIT)
def test_the_planner_predicts_what_each_rank_held_and_moved(runs, name):
    args, procs, _ = RUNS[name]
    s = runs[name].summary()
    assert planned_params_per_rank(*args, world=procs) == [r["total"] for r in s["params"]["per_rank"]]
    assert_plan_matches(s, comm_rel=0.10 if "tp2ep2" in name else 0.05)


def test_autotp_splits_the_tied_weight_by_vocabulary(runs):
    """Embedding and head are one tensor, split along the vocabulary: each TP rank holds half of it once."""
    rows = {r["param"].removeprefix("base_model.model."): r for r in runs["llama-tp2-lora"].summary()["sharding"]}
    assert rows["model.embed_tokens.weight"]["local"] == [256, 64]
    assert rows["model.embed_tokens.weight"]["split_dim"] == 0
