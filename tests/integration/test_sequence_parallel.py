"""Sequence parallelism (DeepSpeed Ulysses, strategy sp) on real processes computes the same model as one process:
the same loss (1e-5), gradient norm (1e-4) and validation loss, under ZeRO-1, 2 and 3, with LoRA under ZeRO-1 (tiled)
and ZeRO-3, SP alone, SP x DP and SP 4 (fewer key/value heads than ranks), for LLaMA and Mixtral (AutoEP folded over
the SP ranks); the planner predicts what each rank holds and moves.

Left out as the same code as a run here: LoRA under ZeRO-1 and 2 without tiling (LoRA changes which parameters
train, not how Ulysses or ZeRO reduce them; the loss scale that depends on the stage is ZeRO-3's, run with LoRA),
Mixtral under SP x DP with ZeRO-1 (SP x DP: sp2-dp2-zero3; the MoE under SP: mixtral-sp2-ep2) and Mixtral's SP x EP
with LoRA (its adapters sit on the attention, replicated as mixtral-sp2-ep2's attention weights are)."""
import pytest

from bench.data import ShardedBatches
from bench.plan import plan_layout
from support import assert_ok, assert_plan_matches, planned_params_per_rank, run_many

pytestmark = pytest.mark.multiproc

ARGS = ("--peft", "none", "--lr", "1e-3", "--max_steps", "5", "--warmup_steps", "1", "--micro_batch_size", "2",
        "--seq_len", "128", "--eval_interval", "0", "--packing", "off")  # padded rows: packed ones are
# test_packing_parity.py's, and the planner plans their mean width, which no single counted micro-batch has
LORA = ("--peft", "lora", "--lr", "1e-2")  # later flags win over ARGS'
# the one-process references under transformers' dense padding mask (the path before bench/attention.py); Ulysses
# runs padded rows causal, without one
ZERO1 = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json", "--attn_mask", "dense")


def sp(config: str) -> tuple:
    return ("--strategy", "sp", "--ds_config", f"ds_configs/{config}.json")


TILED, MLP_TARGETS = ("--tiled_mlp", "--tiled_loss"), ("--lora_targets", "q_proj,v_proj,gate_proj,down_proj")
G2, G4, MIXTRAL = ("--global_batch_size", "2"), ("--global_batch_size", "4"), ("--model", "tiny-mixtral")
# name -> (bench/run.py arguments, processes, the one-process reference)
RUNS = {
    "w1": ((*ZERO1, *ARGS, *G2), 1, None),
    "w1-lora": ((*ZERO1, *ARGS, *LORA, *G2), 1, None),
    "w1-g4": ((*ZERO1, *ARGS, *G4), 1, None),  # two micro-batches accumulated: the two SP x DP data streams
    "sp2-zero1": ((*sp("sp2_zero1"), *ARGS, *G2), 2, "w1"),
    "sp2-zero2": ((*sp("sp2_zero2"), *ARGS, *G2), 2, "w1"),
    "sp2-zero3": ((*sp("sp2"), *ARGS, *G2), 2, "w1"),
    "sp2-zero3-lora": ((*sp("sp2"), *ARGS, *LORA, *G2), 2, "w1-lora"),
    "sp4-zero3": ((*sp("sp4"), *ARGS, *G2), 4, "w1"),  # 2 key/value heads on 4 ranks: DeepSpeed repeats them
    "sp2-dp2-zero3": ((*sp("sp2"), *ARGS, *G4), 4, "w1-g4"),
    # AutoEP under SP: the expert groups fold over the SP ranks (2 ranks hold 2 experts each)
    "mixtral-w1": ((*ZERO1, *ARGS, *MIXTRAL, *G2), 1, None),
    "mixtral-sp2-ep2": ((*sp("sp2_ep2"), *ARGS, *MIXTRAL, *G2), 2, "mixtral-w1"),
    # DeepSpeed's tiled MLP and tiled loss (ALST): full fine-tune with two micro-batches accumulated, and LoRA with
    # adapters inside the tiled MLP
    "sp2-zero3-tiled": ((*sp("sp2"), *ARGS, *G4, *TILED), 2, "w1-g4"),
    "w1-lora-mlp": ((*ZERO1, *ARGS, *LORA, *G2, *MLP_TARGETS), 1, None),
    "sp2-zero1-lora-tiled": ((*sp("sp2_zero1"), *ARGS, *LORA, *G2, *MLP_TARGETS, *TILED), 2, "w1-lora-mlp"),
}
PAIRS = [(name, ref) for name, (_, _, ref) in RUNS.items() if ref]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    # share: w1, w1-lora and mixtral-w1 are test_model_parallel's references, sp2-zero3 is test_packing_parity's
    # padded SP run: the same launches, made once per session (support.run_many)
    return run_many({name: (root / name, args, {"nprocs": n, "launcher": "srun-env" if n > 1 else "python"})
                     for name, (args, n, _) in RUNS.items()}, share=True)


@pytest.mark.parametrize("run,ref", PAIRS)
def test_sequence_parallel_matches_single_process(runs, run, ref):
    """Same loss and gradient norm at every step, same validation loss. Under ZeRO-3 this holds only because each
    rank's loss is scaled by the SP size before backward (its reduce-scatter divides by the world, not by the
    data-parallel ranks; without the scale the gradient norm comes out halved, measured)."""
    assert_ok(runs[ref])
    assert_ok(runs[run])
    a, b = runs[ref].records(), runs[run].records()
    assert len(a) == len(b) == 5 and a[-1]["loss"] < a[0]["loss"]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4)
    assert runs[run].summary()["val_loss"] == pytest.approx(runs[ref].summary()["val_loss"], rel=1e-5)
    s = runs[run].summary()
    assert s["layout"]["sp"] == (4 if "sp4" in run else 2)
    assert s["layout"]["dp"] * s["layout"]["sp"] == s["world_size"]
    if "ep2" in run:  # the experts split, not replicated
        assert s["experts_per_rank"] == 2 and s["layout"]["ep"] == 2
    assert s["params"]["trainable"] == runs[ref].summary()["params"]["trainable"]


def test_a_slice_without_target_tokens_is_handled():
    """The answer-only SQuAD loss at this length puts every target token in the first half of each sequence, so
    the second rank of an SP2 group holds none in any step: the parity above includes that case."""
    plan = plan_layout([*sp("sp2_zero1"), *ARGS, *G2], 2)
    # a dry-run plan of rows padded to --seq_len reads no data (bench/plan.py reads_data): the same samples, as a
    # plan of packed rows reads them, padded here as the run pads them
    samples = plan_layout([*sp("sp2_zero1"), *ARGS, *G2, "--packing", "on"], 2).train_data
    batches = ShardedBatches(samples, plan.batch.micro, plan.batch.grad_accum, 1, 0, plan.cfg.training.seed)
    half = plan.cfg.data.seq_len // 2
    for step in range(5):
        for b in batches.step_batches(step):
            shifted = b["labels"][:, 1:]  # targets of positions 0..seq-2
            assert (shifted[:, :half] != -100).sum() > 0 and (shifted[:, half:] != -100).sum() == 0


@pytest.mark.parametrize("name", [n for n, (_, procs, _) in RUNS.items() if procs > 1])
def test_the_planner_predicted_what_each_rank_held_and_moved(runs, name):
    args, procs, _ = RUNS[name]
    s = runs[name].summary()
    assert [r["total"] for r in s["params"]["per_rank"]] == planned_params_per_rank(*args, world=procs)
    # Mixtral: routing differs between ranks, so the MoE's activations move with the data (within 15 %)
    assert_plan_matches(s)
    counted = s["accounting"]["per_rank"][0]["comm_bytes_per_step"]
    assert counted["all_to_all"] > 0, counted  # Ulysses' exchange, counted by DeepSpeed's comms logger


def test_tiling_keeps_what_it_promises(runs):
    """Per micro-batch (same shapes), the tiled run keeps no MLP intermediates (gate, up, act, act*up: 4 b s I w
    per layer) and no fp32 log-probabilities (4 b s V), and never makes the logits."""
    from bench import models
    c = models.make_config(models.PRESETS["tiny-llama"])
    bs = 2 * 128 // 2  # micro x this rank's slice
    plain, tiled = (runs[n].summary()["accounting"]["per_rank"][0] for n in ("sp2-zero3", "sp2-zero3-tiled"))
    saved = c.num_hidden_layers * 4 * bs * c.intermediate_size * 4 + bs * c.vocab_size * 4
    assert plain["activation_bytes"] - tiled["activation_bytes"] == pytest.approx(saved, rel=1e-2)
    assert tiled["logits_bytes"] == 0 < plain["logits_bytes"]
