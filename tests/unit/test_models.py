"""Parameter counts and FLOPs per token, checked against the model itself and torch's FlopCounterMode."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import models
from bench.config import BenchError, RunConfig
from bench.strategies.common import apply_lora, param_counts

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", list(models.PRESETS))
def test_param_count_formula_matches_the_model(name):
    """The analytic count (used for FLOPs without building the model) equals the real module's, including the
    8B and 8x7B presets, built on the meta device so nothing is allocated."""
    from transformers import AutoModelForCausalLM
    config = models.make_config(models.PRESETS[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())
    assert models.count_params_from_config(config)["total"] == real


def test_real_preset_sizes_are_the_published_ones():
    c = models.count_params_from_config
    assert c(models.make_config(models.PRESETS["llama3.1-8b"]))["total"] == 8_030_261_248
    assert c(models.make_config(models.PRESETS["llama3.2-1b"]))["total"] == 1_235_814_400
    assert c(models.make_config(models.PRESETS["mixtral-8x7b"]))["total"] == 46_702_792_704


def _measured_flops_per_token(model, seq_len: int, batch: int = 2) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    return counter.get_total_flops() / (batch * seq_len)


_LORA = RunConfig().with_flags(seed=0)  # LoRA r 8, alpha 16 on q/k/v/o


@pytest.mark.parametrize("name,lora", [("tiny-llama", False), ("tiny-llama", True), ("tiny-mixtral", False)])
def test_flops_per_token_within_10_percent_of_flop_counter(name, lora):
    from transformers import AutoModelForCausalLM
    # eager attention and experts: plain matmuls the counter sees (the fused CPU SDPA and grouped-GEMM
    # kernels are not in its table, so they would count as zero)
    kwargs = {"attn_implementation": "eager"}
    if name == "tiny-mixtral":
        kwargs["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(models.ensure_tiny(name), **kwargs)
    seq_len = 128
    lora_params = None
    if lora:
        before = param_counts(model)["total"]
        model = apply_lora(model, _LORA)
        lora_params = param_counts(model)["total"] - before
    predicted = models.flops_per_token(model.config, seq_len, lora_params)
    measured = _measured_flops_per_token(model, seq_len)
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


@pytest.mark.parametrize("lora", [False, True])
def test_forward_flops_per_token_within_10_percent_of_flop_counter(lora):
    """What activation checkpointing recomputes (HFU counts it): one forward, counted by FlopCounterMode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(models.ensure_tiny("tiny-llama"), attn_implementation="eager")
    before = param_counts(model)["total"]
    model = apply_lora(model, _LORA) if lora else model
    lora_params = param_counts(model)["total"] - before if lora else None
    ids = torch.randint(0, model.config.vocab_size, (2, 128))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    predicted = models.forward_flops_per_token(model.config, 128, lora_params)
    assert predicted == pytest.approx(counter.get_total_flops() / (2 * 128), rel=0.10)


def test_lora_flops_are_below_full_fine_tuning():
    config = models.make_config(models.PRESETS["llama3.1-8b"])
    full = models.flops_per_token(config, 2048)
    lora = models.flops_per_token(config, 2048, lora_params=3_407_872)
    n = models.count_params_from_config(config)["active_matmul"]
    # the frozen base skips its weight-gradient GEMMs (2N); the adapters add their own 6 N_lora
    assert full - lora == pytest.approx(2 * n - 6 * 3_407_872)


def test_moe_flops_count_active_experts_only():
    config = models.make_config(models.PRESETS["mixtral-8x7b"])
    counts = models.count_params_from_config(config)
    assert counts["active_matmul"] < 0.35 * counts["total"]  # ~13B active of ~47B


@pytest.mark.parametrize("name,targets", [("tiny-llama", "q_proj,k_proj,v_proj,o_proj"),
                                          ("tiny-mixtral", "q_proj,o_proj"), ("llama3.1-8b", "q_proj,v_proj")])
def test_planned_lora_parameters_equal_pefts(name, targets):
    """The plan counts the adapters before any weight exists (FLOPs per token needs them); peft's real
    wrapping of the same architecture must add exactly that many."""
    from peft import LoraConfig, get_peft_model
    from bench.config import parse_args
    from bench.architecture import lora_adapter_params, meta_model
    cfg = parse_args(["--lora_r", "4", "--lora_targets", targets])
    config = models.make_config(models.PRESETS[name])
    planned = lora_adapter_params(cfg, config)
    wrapped = get_peft_model(meta_model(config), LoraConfig(r=4, target_modules=targets.split(",")))
    assert planned == sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n) > 0


def test_unknown_model_is_refused():
    with pytest.raises(BenchError, match="unknown model"):
        models.resolve_model_source("no-such-model", "pretrained")
