"""The cost model behind bench-plan --recommend (bench/cost_model.py): each term against an independent count, the
published figures it is compared with (docs/results/cost_model.md), and the order it ranks LLaMA 3.1 8B's
layouts in on one 8-GPU node."""
import dataclasses
import sys

import pytest

from bench import cost_model, estimate, gpus, recommend
from bench.plan import plan_layout
from support import REPO

GPU = "H100-80GB"
EIGHT_B = ["--model", "llama3.1-8b", "--init", "random", "--packing", "off"]


def _plan(strategy, ds_config, world, *extra, model=EIGHT_B):
    return plan_layout([*model, "--strategy", strategy, "--ds_config", ds_config, *extra], world, GPU)


def _seconds(plan, kinds: dict, group: int, link: float) -> float:
    """Bytes a rank logs -> seconds on its link, ring bus factors written out again."""
    factor = {"all_reduce": 2, "reduce_scatter": 1, "all_to_all": 1, "all_gather": group - 1, "send_recv": 0.5}
    return sum(b * factor[k] for k, b in kinds.items()) / link


@pytest.mark.unit
def test_wave_quantization_counts_the_idle_share_of_the_last_wave():
    # 8192 x 256 outputs in 128 x 256 tiles: 64 tiles, one wave on 132 SMs that leaves 68 idle
    assert cost_model.wave_efficiency(8192, 256, 132) == pytest.approx(64 / 132)
    # 8192 x 4096: 1024 tiles, 8 waves of 132 (1056 slots)
    assert cost_model.wave_efficiency(8192, 4096, 132) == pytest.approx(1024 / 1056)
    assert cost_model.wave_efficiency(8192, 256, None) == 1.0  # a GPU whose SMs the catalog does not list


@pytest.mark.unit
def test_narrow_tensor_parallel_shards_compute_slower_and_wait_on_their_all_reduces():
    args = ("--seq_len", "4096", "--micro_batch_size", "1", "--global_batch_size", "8")
    dp, tp = _plan("dp", "ds_configs/dp_zero3.json", 8, *args), _plan("tp", "ds_configs/tp8.json", 8, *args)
    sms = gpus.BY_KEY[GPU].sms
    assert cost_model.gemm_efficiency(tp, sms) < cost_model.gemm_efficiency(dp, sms) < 1
    # one decoder layer's GEMMs at TP 8, 4096 tokens: k and v are 128 wide (half a tile, 32 tiles in one wave)
    h, f, kv, m = 4096, 14336, 1024 // 8, 4096
    shapes = [(h // 8, h), (kv, h), (kv, h), (h, h // 8), (f // 8, h), (f // 8, h), (h, f // 8)]  # (n, k)
    full = {4096: 16, 512: 4, 128: 1, 1792: 7}  # n -> tiles of 256 across

    def waves(n):
        tiles = (m // 128) * full[n]
        return m * n / (-(-tiles // sms) * sms * 128 * 256)
    expected = sum(m * n * k for n, k in shapes) / sum(m * n * k / waves(n) for n, k in shapes)
    assert cost_model.gemm_efficiency(tp, sms) == pytest.approx(expected)
    est = estimate.estimate(tp, None)
    parts = cost_model.step_breakdown(tp, est, GPU)
    assert parts["compute_s"] == pytest.approx(est["flops_per_rank_per_step"] / (
        989e12 * cost_model.EFFICIENCY * expected))
    tp_bytes = estimate.comm_by_source(tp, 0)["tp"]
    assert parts["communication_s"] >= _seconds(tp, tp_bytes, 8, 450e9) > 0  # on the critical path, all exposed


@pytest.mark.unit
def test_zero_traffic_hides_behind_backward_only_where_deepspeed_overlaps_it():
    plan = _plan("dp", "ds_configs/dp_zero3.json", 8, "--seq_len", "1024", "--micro_batch_size", "1",
                 "--global_batch_size", "8")
    est = estimate.estimate(plan, None)
    sources = estimate.comm_by_source(plan, 0)
    assert set(sources) == {"zero_backward", "zero_step"}
    backward, step = (_seconds(plan, sources[s], 8, 450e9) for s in ("zero_backward", "zero_step"))
    parts = cost_model.step_breakdown(plan, est, GPU)
    window = 2 / 3 * parts["compute_s"]  # no checkpointing: backward is two thirds of forward + backward
    assert backward > window  # one micro-batch of 1024 tokens cannot hide a whole 8B model's gathers
    assert parts["communication_s"] == pytest.approx(backward - window + step)
    zero = {**plan.spec.ds["zero_optimization"], "overlap_comm": False}
    off = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, ds={**plan.spec.ds, "zero_optimization": zero}))
    assert off.ds["zero_optimization"]["overlap_comm"] is False and plan.ds["zero_optimization"]["overlap_comm"]
    assert cost_model.step_breakdown(off, est, GPU)["communication_s"] == pytest.approx(backward + step)
    assert sum(estimate.comm_bytes_per_step(plan, 0).values()) == sum(
        sum(k.values()) for k in sources.values())  # the split adds up to what the accounting compares with


@pytest.mark.unit
def test_a_pipeline_runs_at_its_slowest_stage():
    plan = _plan("pp", "ds_configs/pp2.json", 2, "--seq_len", "128", "--micro_batch_size", "1",
                 "--global_batch_size", "4", model=["--model", "tiny-llama", "--packing", "off", "--peft", "none"])
    c = plan.model_config
    # written out: a decoder layer's matmul parameters (q, k, v, o; gate, up, down), 6 FLOPs each per token,
    # attention 12 x heads x head_dim per (query, key) pair; the head 6 V h, on the last stage
    hd = c.hidden_size // c.num_attention_heads
    layer_params = 2 * c.hidden_size * c.num_attention_heads * hd + 2 * c.hidden_size * c.num_key_value_heads * hd \
        + 3 * c.hidden_size * c.intermediate_size
    layer = 6 * layer_params + 12 * c.num_attention_heads * hd * 128
    head = 6 * c.vocab_size * c.hidden_size
    from bench.strategies.pipeline import stage_of
    layers = [len(stage_of(plan, s)[1]) for s in range(2)]  # ranks 0 and 1: stages 0 and 1 (dp 1)
    stages = [layers[0] * layer, layers[1] * layer + head]
    assert estimate.slowest_share(plan) == pytest.approx(max(stages) / (sum(stages) / 2))
    est = estimate.estimate(plan, None)
    parts = cost_model.step_breakdown(plan, est, GPU)
    # 1F1B: the slowest stage's micro-batch, (stages - 1) more times
    assert parts["bubble_s"] == pytest.approx(parts["compute_s"] / plan.batch.grad_accum)


@pytest.mark.unit
def test_the_published_figures_are_predicted_within_thirty_percent():
    sys.path.insert(0, str(REPO / "measurements"))
    import cost_model_vs_published as page
    for what, published, _, world, args in page.PUBLISHED:
        ratio = page.predicted(args, world)["tokens_per_s_per_gpu"] / published
        assert 0.7 <= ratio <= 1.3, (what, ratio)


@pytest.mark.unit
def test_zero_layouts_come_first_for_the_8b_model_on_one_node():
    capacity = gpus.capacity_bytes(GPU)
    jobs = [("lora", "4096"), ("none", "4096"), ("none", "8192")]  # the peers' fine-tuning and pre-training rows
    for peft, seq in jobs:
        rows, _ = recommend.recommend([*EIGHT_B, "--peft", peft, "--seq_len", seq], 8, GPU, capacity, top=1000)
        data_parallel = ("dp", "ddp", "fsdp2")  # ZeRO, and PyTorch's own data-parallel engines
        first = {s: min(i for i, r in enumerate(rows) if r["strategy"] in s) for s in (data_parallel, ("tp",),
                                                                                   ("pp", "hybrid"))}
        # data parallelism first; at 8192 tokens ZeRO over Ulysses sequence shards (NeMo's recipe: CP 2)
        assert rows[0]["strategy"] in (data_parallel if seq == "4096" else ("sp",)), (peft, seq, rows[0])
        if seq == "4096":
            assert first[data_parallel] < first[("tp",)] and first[data_parallel] < first[("pp", "hybrid")], \
                (peft, first)


@pytest.mark.unit
def test_recommend_plans_specs_with_one_model_and_one_data_load(monkeypatch):
    """--recommend resolves each shipped ds_config into a run spec and plans them all with the model config and
    data it loads once (bench/recommend.py candidates); each candidate is what bench-plan plans for that ds_config
    and micro batch alone."""
    from bench import data_cache, models
    loads = {"config": 0, "data": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            loads[name] += 1
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(models, "load_config", counted("config", models.load_config))
    monkeypatch.setattr(data_cache, "load", counted("data", data_cache.load))
    reasons = []
    plans = list(recommend.candidates(["--model", "tiny-mixtral", "--peft", "none"], 4, GPU, reasons))
    assert loads == {"config": 1, "data": 1}
    ds_configs = {p.cfg.parallelism.ds_config for p in plans}
    assert len(ds_configs) + len(reasons) == len(list((REPO / "ds_configs").glob("*.json")))
    monkeypatch.undo()
    for plan in plans[::7]:  # a sample: each against bench-plan's own plan of it
        alone = plan_layout(["--model", "tiny-mixtral", "--peft", "none", "--global_batch_size", "32",
                             "--ds_config", plan.cfg.parallelism.ds_config, "--micro_batch_size", str(plan.batch.micro),
                             *(["--activation_checkpointing"] if plan.cfg.model.activation_checkpointing else [])], 4, GPU)
        assert estimate.estimate(plan, None) == estimate.estimate(alone, None), plan.cfg.parallelism.ds_config
        assert alone.ds == plan.ds and alone.layout == plan.layout
        assert alone.cfg.parallelism.strategy == plan.cfg.parallelism.strategy
