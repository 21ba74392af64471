"""Model presets, loading (pretrained or random init, low host memory) and the FLOPs-per-token formula.

Real presets carry the published architecture numbers so `--init random` benchmarks them without a download.
Tiny presets are built here once (weights + a locally trained tokenizer), saved, and then loaded through the
same `from_pretrained` path as a real checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from bench.config import BenchError

# rope_parameters as transformers 5 names them; the LLaMA 3.x "llama3" scaling is part of the real architecture.
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Preset:
    model_type: str                  # "llama" | "mixtral"
    arch: dict                       # config kwargs
    hub_id: str | None = None        # where --init pretrained finds weights when no local copy exists
    tiny: bool = False               # built locally, never downloaded
    extra: dict = field(default_factory=dict)


# The tiny presets take rows as long as the real models' (RoPE needs nothing else): long-context work (Ulysses SP,
# packed 8K-32K rows, docs/results/packed_attention_cpu.md) runs on the CPU
TINY_POSITIONS = 32768

PRESETS = {
    "llama3.1-8b": Preset("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters=_LLAMA3_ROPE, bos_token_id=128000, eos_token_id=128001),
        hub_id="meta-llama/Llama-3.1-8B"),
    "llama3.2-1b": Preset("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0},
        bos_token_id=128000, eos_token_id=128001),
        hub_id="meta-llama/Llama-3.2-1B"),
    "mixtral-8x7b": Preset("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        hub_id="mistralai/Mixtral-8x7B-v0.1"),
    # A few hundred K parameters: fast on 2 CPU cores, yet every structural feature of the real one
    # (GQA, SwiGLU, untied head; for Mixtral top-2 routing over 4 experts).
    "tiny-llama": Preset("llama", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TINY_POSITIONS, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), tiny=True),
    "tiny-mixtral": Preset("mixtral", dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TINY_POSITIONS, rms_norm_eps=1e-5, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), tiny=True),
}
# The tiny presets with the LM head tied to the embedding, as LLaMA 3.2 1B/3B and most small models ship: the
# tied-embedding parity suite (tests/integration/test_tied_embeddings.py) runs the strategies on them.
for _name in ("tiny-llama", "tiny-mixtral"):
    PRESETS[f"{_name}-tied"] = Preset(PRESETS[_name].model_type, {**PRESETS[_name].arch, "tie_word_embeddings": True},
                                      tiny=True)
TINY_FORMAT_VERSION = 2  # bump when a tiny preset changes so cached copies are rebuilt, not reused


def cache_dir() -> str:
    return os.environ.get("BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ds-parallel-bench"))


def make_config(preset: Preset, vocab_size: int | None = None):
    from transformers import LlamaConfig, MixtralConfig
    cls = {"llama": LlamaConfig, "mixtral": MixtralConfig}[preset.model_type]
    arch = dict(preset.arch)
    if vocab_size:
        arch["vocab_size"] = vocab_size
    return cls(**arch)


def ensure_tiny(name: str) -> str:
    """Build the tiny preset's checkpoint directory once; safe when every rank races to do it."""
    from bench import data as data_mod
    target = os.path.join(cache_dir(), "models", f"{name}-v{TINY_FORMAT_VERSION}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import torch
    from transformers import AutoModelForCausalLM
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(target))
    try:
        preset = PRESETS[name]
        tokenizer = data_mod.build_tiny_tokenizer(preset.arch["vocab_size"])
        config = make_config(preset)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: readers see a complete directory or none
        except OSError:
            pass  # another rank won the race; its copy is identical in content
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_source(name: str, init: str) -> tuple[Preset | None, str | None]:
    """-> (preset or None, checkpoint path/hub id or None). Never touches the network."""
    preset = PRESETS.get(name)
    if preset is not None and preset.tiny:
        return preset, ensure_tiny(name)
    if preset is not None:
        local = os.path.join(os.environ.get("BENCH_MODELS_DIR", "models"), name)
        if os.path.isfile(os.path.join(local, "config.json")):
            return preset, local
        if init == "random":
            return preset, None
        return preset, preset.hub_id
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise BenchError(f"model directory {name} has no config.json; is it a Hugging Face checkpoint?")
        return None, name
    if "/" in name and not name.startswith((".", "/")):
        return None, name  # a hub id: only this path may use the network
    raise BenchError(f"unknown model {name!r}: use one of {', '.join(PRESETS)}, a checkpoint directory or a hub id")


def load_config(name: str, init: str, offline: bool = False):
    """The model config and tokenizer source, without materializing any weights. A real preset with no local
    copy uses its bundled architecture (the published numbers) and the bundled tokenizer when nothing will be
    downloaded: --init random, or offline (a dry run plans without weights)."""
    from transformers import AutoConfig
    preset, source = resolve_model_source(name, init)
    if preset is not None and not preset.tiny and (source is None or (offline and source == preset.hub_id)):
        return make_config(preset), ensure_tiny("tiny-llama"), preset
    try:
        return AutoConfig.from_pretrained(source), source, preset
    except OSError as e:
        raise BenchError(f"cannot load model config from {source}: {str(e).splitlines()[0]} "
                         f"(pass a local directory, set BENCH_MODELS_DIR, or use --init random)") from None


def load_tokenizer(source: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(name: str, init: str, model_config, dtype, device, zero3_ds_config: dict | None, seed: int,
                attn_implementation: str = "sdpa", sharded: bool = False):
    """-> (model, what must stay alive until deepspeed.initialize). A large model is never held once per rank in
    host memory: weights go straight to `device`, are partitioned at construction under ZeRO-3, or, for a
    model-parallel strategy (`sharded`), stay on the meta device for each rank to materialize only its shard inside
    deepspeed.initialize (bench/loading.py). --init random draws every parameter from bench/loading.py's seeded
    per-name init, so every strategy starts from the same weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from bench import loading
    torch.manual_seed(seed)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if zero3_ds_config is not None:
        # While this object lives, from_pretrained/from_config construct under deepspeed.zero.Init.
        from transformers.integrations import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(zero3_ds_config)
        if init == "random":
            model = AutoModelForCausalLM.from_config(model_config, **kwargs)
            loading.overwrite_partitioned(model, weights_of(name, init, model_config, seed))
        else:
            model = AutoModelForCausalLM.from_pretrained(resolve_model_source(name, init)[1], **kwargs)
    elif sharded or init == "random":
        keep_alive = None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, **kwargs)
        if not sharded:
            loading.materialize_whole(model, weights_of(name, init, model_config, seed), device)
    else:
        keep_alive = None
        if str(device) != "cpu":
            kwargs["device_map"] = {"": str(device)}
        model = AutoModelForCausalLM.from_pretrained(resolve_model_source(name, init)[1], **kwargs)
    model.config.use_cache = False  # training: the KV cache only costs memory
    return model, keep_alive


def weights_of(name: str, init: str, model_config, seed: int):
    """Where a meta-built model's values come from (bench/loading.py): the seeded init, or the local safetensors
    checkpoint (a hub id is downloaded into the Hugging Face cache first: its safetensors and JSON files only)."""
    from bench.loading import Weights
    if init == "random":
        return Weights(model_config, seed)
    source = resolve_model_source(name, init)[1]
    if not os.path.isdir(source):
        from huggingface_hub import snapshot_download
        source = snapshot_download(source, allow_patterns=["*.safetensors", "*.json"])
    return Weights(model_config, seed, checkpoint=source)


# ---------------------------------------------------------------------------------------------------------
# Parameter counts and FLOPs: the one place these formulas live (documented in docs/metrics.md).

def head_dim(c) -> int:
    """Per-head width: the config's head_dim where it sets one (LLaMA 3.2 1B), else hidden / heads."""
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def count_params_from_config(c) -> dict:
    """Parameter counts straight from the architecture numbers (no model needed)."""
    h, L, v = c.hidden_size, c.num_hidden_layers, c.vocab_size
    hd = head_dim(c)
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = h * q + 2 * h * kv + q * h
    experts = getattr(c, "num_local_experts", 0) or 0
    mlp_one = 3 * h * c.intermediate_size
    if experts:
        mlp_total = experts * mlp_one + h * experts  # experts + router
        mlp_active = c.num_experts_per_tok * mlp_one + h * experts
    else:
        mlp_total = mlp_active = mlp_one
    norms = 2 * h
    embed = v * h
    head = 0 if c.tie_word_embeddings else v * h
    total = embed + head + L * (attn + mlp_total + norms) + h
    # The GEMM-bearing parameters one token actually multiplies with: every linear layer, the active
    # experts only, and the LM head (tied or not); embedding lookups and norms do no matmul.
    active_matmul = L * (attn + mlp_active) + v * h
    # per decoder layer: attention (q, k, v, o), one expert's or the dense MLP's (gate, up, down), the router,
    # the two norms; the strategies shard these (bench/strategies/*: params_per_rank)
    layer = {"attention": attn, "mlp": mlp_one, "experts": experts, "router": h * experts, "norms": norms}
    return {"total": total, "active_matmul": active_matmul, "embedding": embed, "head": head, "layer": layer,
            "layers": L, "final_norm": h}


def flop_coefficients(model_config, lora_params: int | None = None,
                      recompute: bool = False) -> tuple[float, float]:
    """Training FLOPs (forward + backward, matmuls only) as (per token, per attention pair); a step's FLOPs are
    per_token x tokens + per_pair x pairs, a pair being one (query, key) of a sequence (a sample of T tokens has
    T^2 of them: the attention term counts QK^T and AV for every pair, as FlopCounterMode does for SDPA).

    Full fine-tune (lora_params=None): 6 N per token, N the active matmul parameters (MoE: the top-k experts only,
    plus the router). LoRA: N grows by the adapter parameters, and the frozen base needs activation gradients
    (2 N) but no weight gradients, so 4 N + 2 N_lora. Attention: 12 L H Q per pair. recompute=True adds what
    activation checkpointing computes a second time in backward (HFU counts it, MFU does not): the decoder
    layers' forward, 2 N - 2 V h per token (no LM head; Hugging Face checkpoints each decoder layer) and
    4 L H Q per pair. --tiled_mlp's recomputation is not counted."""
    c = model_config
    n = count_params_from_config(c)["active_matmul"] + (lora_params or 0)
    attention = c.num_hidden_layers * c.num_attention_heads * head_dim(c)
    per_token = 6 * n if lora_params is None else 4 * n + 2 * lora_params
    per_pair = 12 * attention
    if recompute:
        per_token += 2 * n - 2 * c.vocab_size * c.hidden_size
        per_pair += 4 * attention
    return per_token, per_pair


def head_flops_per_token(model_config, lora: bool) -> int:
    """The LM head's part of flop_coefficients' per-token term: 6 V h, or 4 V h frozen under LoRA (no weight
    gradient)."""
    return (4 if lora else 6) * model_config.vocab_size * model_config.hidden_size


def flops_per_token(model_config, seq_len: int, lora_params: int | None = None) -> float:
    """Training FLOPs per token of full seq_len-token rows: 6 N + 12 L H Q T (LoRA: 4 N + 2 N_lora + 12 L H Q T);
    flop_coefficients says what each term counts."""
    per_token, per_pair = flop_coefficients(model_config, lora_params)
    return per_token + per_pair * seq_len


def forward_flops_per_token(model_config, seq_len: int, lora_params: int | None = None) -> float:
    """One forward's FLOPs per token, 2 N + 4 L H Q T (N with the adapters under LoRA)."""
    c = model_config
    n = count_params_from_config(c)["active_matmul"] + (lora_params or 0)
    return 2 * n + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim(c) * seq_len


def recompute_flops_per_token(model_config, seq_len: int, lora_params: int | None = None) -> float:
    """What activation checkpointing computes a second time in backward, per token of full rows (see
    flop_coefficients)."""
    with_recompute = flop_coefficients(model_config, lora_params, recompute=True)
    without = flop_coefficients(model_config, lora_params)
    return with_recompute[0] - without[0] + (with_recompute[1] - without[1]) * seq_len


def packed_causal_mask(position_ids):
    """[B, T] position ids -> the [B, 1, T, T] boolean attention mask (True: attend) confining causal attention to
    each packed sequence, a sequence starting where its position is 0. What transformers builds from position_ids
    for SDPA (masking_utils.py, find_packed_sequence_indices), for the paths that call the attention themselves
    on packed rows: pipeline stages and Ulysses' gathered sequence. Built on the device without reading anything
    back (no synchronization inside the layer)."""
    import torch
    sequence = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    index = torch.arange(t, device=position_ids.device)
    causal = index[None, :] <= index[:, None]
    return (causal & (sequence[:, :, None] == sequence[:, None, :]))[:, None]


def is_moe(model_config) -> bool:
    return bool(getattr(model_config, "num_local_experts", 0))
