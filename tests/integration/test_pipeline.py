"""Pipeline (PP 2, PP 4) and pipeline x data parallelism (PP 2 x DP 2) reproduce the single-process run, PP 2 with LoRA
and without; per-stage parameters add up to the model; the bubble is recorded next to its theoretical value."""
import pytest

from bench import models
from support import assert_plan_matches, assert_ok, planned_params_per_rank, run_many

pytestmark = pytest.mark.multiproc

LOSS_RTOL = 1e-5  # fp32: only the order of sums changes (see docs/parity.md)
ARGS = ("--lr", "1e-3", "--max_steps", "5", "--warmup_steps", "1", "--micro_batch_size", "1",
        "--global_batch_size", "4", "--seq_len", "128", "--eval_interval", "0", "--eval_batches", "4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    specs = {}
    for peft in ("none", "lora"):
        extra = ("--peft", peft) + (("--lr", "1e-2") if peft == "lora" else ())
        # the reference under transformers' dense masks (the path before bench/attention.py), the stages on the
        # document path
        specs[f"w1-{peft}"] = (root / f"w1-{peft}", ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json",
                                                     *ARGS, *extra, "--attn_mask", "dense"), {})
        specs[f"pp2-{peft}"] = (root / f"pp2-{peft}", ("--strategy", "pp", "--ds_config", "ds_configs/pp2.json",
                                                       *ARGS, *extra), {"nprocs": 2, "launcher": "srun-env"})
    # PP x DP with full fine-tuning only: LoRA under the pipeline is pp2-lora's, and the data-parallel all-reduce
    # over a stage's replicas is the same for adapters as for the weights hybrid-none trains
    specs["hybrid-none"] = (root / "hy-none", ("--strategy", "hybrid", "--ds_config", "ds_configs/pp2_dp2.json",
                                               *ARGS, "--peft", "none"), {"nprocs": 4, "launcher": "srun-env"})
    specs["pp4-none"] = (root / "pp4", ("--strategy", "pp", "--ds_config", "ds_configs/pp4.json", *ARGS,
                                        "--peft", "none"), {"nprocs": 4, "launcher": "srun-env"})  # a layer/stage
    specs["pp2uniform-none"] = (root / "uni", ("--strategy", "pp", "--ds_config", "ds_configs/pp2_uniform.json",
                                               *ARGS, "--peft", "none"), {"nprocs": 2, "launcher": "srun-env"})
    return run_many(specs)  # srun-style ranks: see test_model_parallel.py


@pytest.mark.parametrize("layout,peft", [("pp2", "none"), ("pp2", "lora"), ("hybrid", "none"),
                                         ("pp2uniform", "none"), ("pp4", "none")])  # full fine-tune is enough
def test_loss_matches_single_process(runs, layout, peft):
    ref, run = runs[f"w1-{peft}"], runs[f"{layout}-{peft}"]
    assert_ok(ref)
    assert_ok(run)
    a, b = ref.losses(), run.losses()
    assert len(a) == len(b) == 5 and a[-1] < a[0], a
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=LOSS_RTOL), (a, b)
    assert run.summary()["val_loss"] == pytest.approx(ref.summary()["val_loss"], rel=LOSS_RTOL)


@pytest.mark.parametrize("name", ["hybrid-none", "pp2-lora"])
def test_stage_params_add_up_and_bubble_is_recorded(runs, name):
    s = runs[name].summary()
    dp = 2 if name.startswith("hybrid") else 1
    m = 4 // dp  # micro-batches per step through each stage: global batch 4 / (micro 1 x dp)
    assert s["layout"] == {"dp": dp, "tp": 1, "ep": 1, "pp": 2, "sp": 1} and s["grad_accum"] == m
    pipe = s["pipeline"]
    assert pipe["stages"] == 2 and pipe["micro_batches"] == m
    assert pipe["theoretical_bubble"] == pytest.approx(1 / (m + 1))  # (p-1)/(m+p-1): 1/3 for PP x DP, 1/5 for PP
    stages = pipe["per_stage"]
    assert [st["ranks"] for st in stages] == ([[0, 1], [2, 3]] if dp == 2 else [[0], [1]])
    assert sum(st["params"] for st in stages) == s["params"]["total"]
    assert sum(st["trainable"] for st in stages) == s["params"]["trainable"]
    assert all(0 <= st["measured_idle_fraction"] < 1 for st in stages)
    per_rank = [r["total"] for r in s["params"]["per_rank"]]
    if dp == 2:  # data-parallel replicas of a stage hold the same parameters
        assert per_rank[0] == per_rank[1] and per_rank[2] == per_rank[3]
    base = models.count_params_from_config(models.make_config(models.PRESETS["tiny-llama"]))["total"]
    assert s["params"]["before_peft"] == base
    if name.endswith("lora"):
        assert s["params"]["trainable"] < s["params"]["total"] - base + 1  # adapters only


@pytest.mark.parametrize("name,args,procs", [
    ("pp2-lora", ("--strategy", "pp", "--ds_config", "ds_configs/pp2.json", "--peft", "lora"), 2),
    ("hybrid-none", ("--strategy", "hybrid", "--ds_config", "ds_configs/pp2_dp2.json", "--peft", "none"), 4),
    ("pp4-none", ("--strategy", "pp", "--ds_config", "ds_configs/pp4.json", "--peft", "none"), 4),
    ("pp2uniform-none", ("--strategy", "pp", "--ds_config", "ds_configs/pp2_uniform.json", "--peft", "none"), 2)])
def test_the_dry_run_predicts_each_stages_parameters(runs, name, args, procs):
    recorded = [r["total"] for r in runs[name].summary()["params"]["per_rank"]]
    assert planned_params_per_rank(*args, *ARGS, world=procs) == recorded


def test_four_stages_one_decoder_layer_each(runs):
    s = runs["pp4-none"].summary()
    c = models.make_config(models.PRESETS["tiny-llama"])
    h, v = c.hidden_size, c.vocab_size
    total = models.count_params_from_config(c)["total"]
    layer = (total - 2 * v * h - h) // c.num_hidden_layers  # untied embedding and head, final norm
    assert s["params"]["total"] == total
    pipe = s["pipeline"]
    assert pipe["stages"] == 4 and pipe["micro_batches"] == 4
    assert pipe["theoretical_bubble"] == pytest.approx(3 / 7)  # (p-1)/(m+p-1)
    # parameter-balanced: the embedding rides with the first layer, norm + head with the last
    assert [st["params"] for st in pipe["per_stage"]] == [v * h + layer, layer, layer, layer + h + v * h]


@pytest.mark.parametrize("name", ["pp2-none", "pp2-lora", "hybrid-none", "pp4-none", "pp2uniform-none"])
def test_the_planner_predicted_each_stages_model_states(runs, name):
    """What each stage holds and sends, against the planner (activations: one micro-batch's)."""
    assert_plan_matches(runs[name].summary())
