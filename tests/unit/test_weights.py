"""What a rank reads to materialize its part of the model (bench/loading.py): the checkpoint's tensors, fused and
sliced as transformers loads them, and the random init, the same drawn whole or by rows. Real sharded runs:
tests/integration/test_loading.py."""
import pytest
import torch


def _from_pretrained(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.unit
@pytest.mark.parametrize("preset", ["tiny-llama-tied", "tiny-mixtral"])
def test_a_meta_model_filled_from_the_checkpoint_is_what_transformers_loads(preset):
    """Mixtral's checkpoint keeps one tensor per expert, fused by transformers at load: the reader fuses them the
    same way (and reads only the rows asked for); a tied head is the embedding."""
    from bench import loading, models
    from bench.architecture import meta_model
    path = models.ensure_tiny(preset)
    reference = _from_pretrained(path)
    expected, config = reference.state_dict(), reference.config
    model = meta_model(config)
    weights = loading.Weights(config, seed=0, checkpoint=path)
    loading.materialize_whole(model, weights, "cpu")
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert model.lm_head.weight is model.model.embed_tokens.weight or not config.tie_word_embeddings
    if preset == "tiny-mixtral":
        name = "model.layers.1.mlp.experts.gate_up_proj"
        rows = weights.rows(name, 1, 3, expected[name].shape, torch.float32, "cpu")
        assert torch.equal(rows, expected[name][1:3])


@pytest.mark.unit
def test_the_random_init_is_the_same_drawn_whole_or_by_rows():
    """Per-name streams (one per expert of a 3-D tensor): a rank drawing only its experts, or a weight whole,
    gets the values one process draws; norms are ones, LoRA's B zeros and its A within peft's bound."""
    from bench import loading, models
    config = models.make_config(models.PRESETS["tiny-mixtral"])
    w = loading.Weights(config, seed=3)
    shape = (4, 192, 64)
    whole = w.full("model.layers.0.mlp.experts.gate_up_proj", shape, torch.float32, "cpu")
    assert torch.equal(w.rows("model.layers.0.mlp.experts.gate_up_proj", 2, 4, shape, torch.float32, "cpu"),
                       whole[2:])
    q = w.full("model.layers.0.self_attn.q_proj.weight", (64, 64), torch.float32, "cpu")
    assert torch.equal(q, w.full("model.layers.0.self_attn.q_proj.weight", (64, 64), torch.float32, "cpu"))
    assert not torch.equal(q, loading.Weights(config, seed=4).full("model.layers.0.self_attn.q_proj.weight",
                                                                     (64, 64), torch.float32, "cpu"))
    assert abs(float(q.std()) - config.initializer_range) < 0.2 * config.initializer_range
    assert torch.equal(w.full("model.norm.weight", (64,), torch.float32, "cpu"), torch.ones(64))
    a = w.full("model.layers.0.self_attn.q_proj.lora_A.default.weight", (8, 64), torch.float32, "cpu")
    assert float(a.abs().max()) <= 1 / 64 ** 0.5 and float(a.abs().max()) > 0
    assert not w.full("model.layers.0.self_attn.q_proj.lora_B.default.weight", (64, 8), torch.float32, "cpu").any()
