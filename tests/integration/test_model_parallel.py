"""AutoTP, AutoEP and TP x EP on real processes compute the same model as one process: same loss trajectory
at the same model, data and global batch, and each rank holds exactly its share of the parameters."""
import json

import pytest

from bench import models
from bench.config import recorded_flags
from support import assert_plan_matches, assert_ok, assert_resumes_exactly, planned_params_per_rank, run_many

pytestmark = pytest.mark.multiproc

# fp32 on the CPU. TP splits each GEMM's reduction (row-parallel all-reduce) and EP moves tokens through an
# all-to-all and back; both only reorder floating-point sums, which moves the loss in the 6th-7th significant
# digit. Routing ties (two experts with equal scores) could flip top-k choices between layouts; random fp32
# router logits make exact ties practically impossible. See docs/parity.md.
LOSS_RTOL = 1e-5
ARGS = ("--peft", "none", "--lr", "1e-3", "--max_steps", "5", "--warmup_steps", "1", "--micro_batch_size", "2",
        "--seq_len", "128", "--eval_interval", "0", "--packing", "off")  # padded rows: packed ones are
# test_packing_parity.py's, and the planner plans their mean width, which no single counted micro-batch has
# The one-process references run transformers' dense padding mask (--attn_mask dense), the path every strategy
# took before bench/attention.py; the model-parallel runs take the default (no mask, causal): their parity is
# also the new path's parity with the dense one under TP, EP and TP x EP
ZERO1 = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json", "--attn_mask", "dense")
# LoRA on the attention, the experts frozen (later flags win over ARGS')
LORA = (*ARGS, "--model", "tiny-mixtral", "--peft", "lora", "--lr", "1e-2")
LLAMA_LORA = (*ARGS, "--peft", "lora", "--lr", "1e-2")
TP2, TP2EP2 = ("--strategy", "tp", "--ds_config", "ds_configs/tp2.json"), ("--strategy", "tp_ep", "--ds_config",
                                                                         "ds_configs/tp2_ep2.json")
EP2 = ("--strategy", "ep", "--ds_config", "ds_configs/ep2.json")


# name -> (bench/run.py arguments, processes); references run as one process, the rest under deepspeed
RUNS = {
    # references: one process; global 2 = one data stream (TP), global 4 = two data streams (EP, TP x EP)
    "llama-w1": ((*ZERO1, *ARGS, "--global_batch_size", "2"), 1),
    "mixtral-w1-g2": ((*ZERO1, *ARGS, "--model", "tiny-mixtral", "--global_batch_size", "2"), 1),
    "mixtral-w1-g4": ((*ZERO1, *ARGS, "--model", "tiny-mixtral", "--global_batch_size", "4"), 1),
    "mixtral-w1-g8": ((*ZERO1, *ARGS, "--model", "tiny-mixtral", "--global_batch_size", "8"), 1),
    "llama-tp2": (("--strategy", "tp", "--ds_config", "ds_configs/tp2.json", *ARGS, "--global_batch_size", "2"), 2),
    "mixtral-tp2": (("--strategy", "tp", "--ds_config", "ds_configs/tp2.json", *ARGS, "--model", "tiny-mixtral",
                     "--global_batch_size", "2"), 2),
    "mixtral-ep2": (("--strategy", "ep", "--ds_config", "ds_configs/ep2.json", *ARGS, "--model", "tiny-mixtral",
                     "--global_batch_size", "4"), 2),
    "mixtral-tp2ep2": (("--strategy", "tp_ep", "--ds_config", "ds_configs/tp2_ep2.json", *ARGS, "--model",
                        "tiny-mixtral", "--global_batch_size", "4"), 4),
    # one expert per rank, four data streams
    "mixtral-ep4": (("--strategy", "ep", "--ds_config", "ds_configs/ep4.json", *ARGS, "--model", "tiny-mixtral",
                     "--global_batch_size", "8"), 4),
    # the seeds' "Mixtral + LoRA + expert parallelism", against one process with the same adapters (EP 4 with LoRA
    # is not run: the adapters sit on the attention, which EP 4 replicates as EP 2 does; EP 4 itself: mixtral-ep4)
    "mixtral-w1-g4-lora": ((*ZERO1, *LORA, "--global_batch_size", "4"), 1),
    "mixtral-ep2-lora": ((*EP2, *LORA, "--global_batch_size", "4"), 2),
    # LoRA under TP: adapters split with their layers (bench/strategies/tp_lora.py). Mixtral TP 2 with LoRA is not
    # run: its adapters are the same q/k/v/o ones split as llama-tp2-lora's are, and Mixtral's TP with LoRA is
    # mixtral-tp2ep2-lora's
    "llama-w1-lora": ((*ZERO1, *LLAMA_LORA, "--global_batch_size", "2"), 1),
    "llama-tp2-lora": ((*TP2, *LLAMA_LORA, "--global_batch_size", "2"), 2),
    "mixtral-tp2ep2-lora": ((*TP2EP2, *LORA, "--global_batch_size", "4"), 4),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    # srun-style ranks: real DeepSpeed processes without a launcher's own two Python processes per run (the
    # deepspeed launcher itself is exercised by test_zero, test_signals, test_rendezvous and the sweeps).
    # share: the one-process references and some layouts are test_sequence_parallel's and test_packing_parity's
    # launches too, made once per session (support.run_many)
    return run_many({name: (root / name, args, {"nprocs": n, "launcher": "srun-env" if n > 1 else "python"})
                     for name, (args, n) in RUNS.items()}, share=True)


@pytest.mark.parametrize("name", [n for n, (_, procs) in RUNS.items() if procs > 1])
def test_the_dry_run_predicts_what_each_rank_holds(runs, name):
    args, procs = RUNS[name]
    recorded = [r["total"] for r in runs[name].summary()["params"]["per_rank"]]
    assert planned_params_per_rank(*args, world=procs) == recorded


@pytest.mark.parametrize("run,ref", [("llama-tp2", "llama-w1"), ("mixtral-tp2", "mixtral-w1-g2"),
                                     ("mixtral-ep2", "mixtral-w1-g4"), ("mixtral-tp2ep2", "mixtral-w1-g4"),
                                     ("mixtral-ep4", "mixtral-w1-g8")])
def test_loss_matches_single_process(runs, run, ref):
    assert_ok(runs[ref])
    assert_ok(runs[run])
    a, b = runs[ref].losses(), runs[run].losses()
    assert len(a) == len(b) == 5 and a[-1] < a[0], a
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=LOSS_RTOL), (a, b)
    assert runs[run].summary()["val_loss"] == pytest.approx(runs[ref].summary()["val_loss"], rel=LOSS_RTOL)


def _counts(name):
    c = models.make_config(models.PRESETS[name])
    h, L, hd = c.hidden_size, c.num_hidden_layers, c.hidden_size // c.num_attention_heads
    attn = 2 * h * c.num_attention_heads * hd + 2 * h * c.num_key_value_heads * hd
    expert = 3 * h * c.intermediate_size
    return c, models.count_params_from_config(c)["total"], L, attn, expert


def test_layout_and_params_per_rank(runs):
    c, total, L, attn, mlp = _counts("tiny-llama")
    s = runs["llama-tp2"].summary()
    assert s["layout"] == {"dp": 1, "tp": 2, "ep": 1, "pp": 1, "sp": 1} and s["peft"] == "none"
    # LLaMA TP2: every attention and MLP weight halves, and so does the LM head (column parallel, HF tp_plan);
    # embeddings and norms stay whole
    head = c.vocab_size * c.hidden_size
    assert [r["total"] for r in s["params"]["per_rank"]] == [total - (L * (attn + mlp) + head) // 2] * 2

    c, total, L, attn, expert = _counts("tiny-mixtral")
    E = c.num_local_experts
    s = runs["mixtral-tp2"].summary()  # attention only
    assert [r["total"] for r in s["params"]["per_rank"]] == [total - L * attn // 2] * 2
    s = runs["mixtral-ep2"].summary()  # half of the experts per rank
    assert s["layout"] == {"dp": 1, "tp": 1, "ep": 2, "pp": 1, "sp": 1} and s["experts_per_rank"] == E // 2
    assert [r["total"] for r in s["params"]["per_rank"]] == [total - L * (E // 2) * expert] * 2
    s = runs["mixtral-tp2ep2"].summary()
    assert s["layout"] == {"dp": 1, "tp": 2, "ep": 2, "pp": 1, "sp": 1} and s["world_size"] == 4
    assert [r["total"] for r in s["params"]["per_rank"]] == [total - L * attn // 2 - L * (E // 2) * expert] * 4
    s = runs["mixtral-ep4"].summary()  # E/4 experts per rank
    assert s["layout"] == {"dp": 1, "tp": 1, "ep": 4, "pp": 1, "sp": 1} and s["experts_per_rank"] == E // 4
    assert [r["total"] for r in s["params"]["per_rank"]] == [total - L * (E - E // 4) * expert] * 4


def test_sharding_is_recorded(runs):
    rows = {r["param"]: r for r in runs["llama-tp2"].summary()["sharding"]}
    q = rows["model.layers.*.self_attn.q_proj.weight"]
    assert q["full"] == [64, 64] and q["local"] == [32, 64] and q["split_dim"] == 0  # column parallel
    o = rows["model.layers.*.self_attn.o_proj.weight"]
    assert o["local"] == [64, 32] and o["split_dim"] == 1  # row parallel
    assert rows["model.layers.*.mlp.down_proj.weight"]["split_dim"] == 1
    assert rows["lm_head.weight"]["local"] == [256, 64]
    mix = {r["param"] for r in runs["mixtral-tp2"].summary()["sharding"]}
    assert all("self_attn" in p for p in mix), mix  # the MoE preset shards attention only
    assert "sharding applied (per rank)" in runs["llama-tp2"].output


@pytest.mark.parametrize("name", [n for n, (_, procs) in RUNS.items() if procs > 1])
def test_the_planner_predicted_what_each_rank_held_and_moved(runs, name):
    # TP x EP: AutoEP's token exchange inside the TP group moves a data-dependent number of rows
    # (deepspeed/moe/ep_tp_dispatch.py gathers variable rows), which the planner's balanced count misses by ~8 %
    assert_plan_matches(runs[name].summary(), comm_rel=0.10 if "tp2ep2" in name else 0.05)


LORA_PAIRS = [("mixtral-ep2-lora", "mixtral-w1-g4-lora"), ("llama-tp2-lora", "llama-w1-lora"),
              ("mixtral-tp2ep2-lora", "mixtral-w1-g4-lora")]


def _split_adapters(model: str, tp: int) -> tuple[int, int]:
    """(adapter elements, the part TP splits) for the default targets q/k/v/o at r=8, from the architecture: B of
    q/k/v (column-parallel layers) and A of o (row-parallel) split, every other adapter tensor whole."""
    c, _, L, _, _ = _counts(model)
    h, r, hd = c.hidden_size, 8, c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    total = L * (r * h + q * r + 2 * (r * h + kv * r) + r * q + h * r)
    return total, (L * (q * r + 2 * kv * r + r * q) if tp > 1 else 0)


@pytest.mark.parametrize("run,ref", LORA_PAIRS)
def test_lora_under_model_parallelism_matches_single_process(runs, run, ref):
    """Adapters on the attention, split with their layers under TP, replicated (data-parallel over dp x ep) under
    EP, experts sharded and frozen: the same loss (1e-5) and gradient norm (1e-4) as one process with the same
    adapters, and each rank trains its share: the adapter shards add up to the one-process adapters."""
    assert_ok(runs[ref])
    assert_ok(runs[run])
    a, b = runs[ref].records(), runs[run].records()
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=LOSS_RTOL)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4)
    s, s1 = runs[run].summary(), runs[ref].summary()
    model, tp = ("tiny-mixtral" if "mixtral" in run else "tiny-llama"), s["layout"]["tp"]
    total, split = _split_adapters(model, tp)
    assert s["peft"] == "lora" and s["params"]["trainable"] == s1["params"]["trainable"] == total
    assert {r["trainable"] for r in s["params"]["per_rank"]} == {total - split + split // tp}
    if s["layout"]["ep"] > 1:
        assert s["experts_per_rank"] == models.make_config(models.PRESETS["tiny-mixtral"]).num_local_experts // \
            s["layout"]["ep"]


def test_lora_adapters_follow_the_tp_split(runs):
    """B of a column-parallel layer splits along its output, A of a row-parallel one along its input; the base
    model is split as without LoRA (the LM head included)."""
    rows = {r["param"].removeprefix("base_model.model."): r for r in runs["llama-tp2-lora"].summary()["sharding"]}
    assert rows["model.layers.*.self_attn.q_proj.lora_B.default.weight"]["split_dim"] == 0
    assert rows["model.layers.*.self_attn.o_proj.lora_A.default.weight"]["split_dim"] == 1
    assert not any(k.endswith(("q_proj.lora_A.default.weight", "o_proj.lora_B.default.weight")) for k in rows)
    full = {r["param"]: r["local"] for r in runs["llama-tp2"].summary()["sharding"]}
    assert rows["lm_head.weight"]["local"] == full["lm_head.weight"]
    assert rows["model.layers.*.mlp.down_proj.weight"]["local"] == full["model.layers.*.mlp.down_proj.weight"]
    assert rows["model.layers.*.self_attn.q_proj.base_layer.weight"]["local"] == \
        full["model.layers.*.self_attn.q_proj.weight"]


@pytest.mark.parametrize("name", ["mixtral-ep2-lora", "llama-tp2-lora", "mixtral-tp2ep2-lora"])
def test_saved_adapters_load_into_peft_and_give_the_runs_val_loss(runs, name):
    """A LoRA run's adapter/ directory (TP's split adapters gathered whole), loaded into peft on one process over
    the same base weights: the validation loss the run recorded at its end (same validation micro-batches,
    token-weighted)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from bench import data
    from bench.train import target_tokens
    res = runs[name]
    assert_ok(res)
    run = recorded_flags(json.loads((res.run_dir / "config.json").read_text())["run"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (res.run_dir / "adapter").iterdir()}
    _, source, _ = models.load_config(run["model"], run["init"])
    _, val = data.load_dataset(run["data"], models.load_tokenizer(source), run["seq_len"], run["val_fraction"],
                               run["seed"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), str(res.run_dir / "adapter"))
    loss_x_tokens = tokens = 0
    with torch.no_grad():
        for batch in data.val_batches(val, res.summary()["micro_batch_size"], 1, 0, run["eval_batches"]):
            n = target_tokens(batch)
            loss_x_tokens += float(model.eval()(**batch).loss) * n
            tokens += n
    assert loss_x_tokens / tokens == pytest.approx(res.summary()["val_loss"], rel=1e-4)


@pytest.mark.parametrize("name", ["mixtral-ep2-lora", "llama-tp2-lora"])
def test_lora_under_model_parallelism_resumes_exactly(runs, tmp_path, name):
    """Checkpoint and exact resume with LoRA under EP and TP: a rank killed as step 4 starts, the job rerun with the
    same command resumes from step 2's checkpoint and ends where the uninterrupted run did."""
    args, procs = RUNS[name]
    assert_resumes_exactly(tmp_path, args, procs, runs[name])
