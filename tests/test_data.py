"""Data: the bundled sample, loss masking, packing, and sharding that is identical for every DP size."""
import json

import pytest
import torch

from bench import data, models

pytestmark = pytest.mark.unit


def tokenizer():
    return models.load_tokenizer(models.ensure_tiny("tiny-llama"))


def test_bundled_sample_is_reproducible_and_valid_squad():
    with open(data.SAMPLE_PATH) as fh:
        shipped = json.load(fh)
    assert shipped == json.loads(json.dumps(data.make_squad_sample()))  # regenerates bit-identically
    for article in shipped["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                a = qa["answers"][0]
                assert para["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]


def test_qa_loss_only_on_answer_tokens():
    tok = tokenizer()
    ex = [{"prompt": "Context: x\nQuestion: y?\nAnswer:", "answer": " Zen"}]
    t = data.tokenize_qa(ex, tok, 64)
    labels = t.labels[0][t.labels[0] != data.IGNORE].tolist()
    assert labels == tok(" Zen", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert t.attention_mask[0].sum() < 64 and (t.labels[0][t.attention_mask[0] == 0] == data.IGNORE).all()


def test_text_is_packed_into_full_blocks():
    t = data.tokenize_text(["hello world " * 50, "second doc " * 40], tokenizer(), 32)
    assert t.input_ids.shape[1] == 32 and t.attention_mask.all() and torch.equal(t.labels, t.input_ids)


def test_sharding_is_the_same_micro_batches_for_any_dp():
    n = 64
    ids = torch.arange(n).unsqueeze(1).repeat(1, 4)
    d = data.Tokenized(ids, torch.ones_like(ids), ids)
    def samples(dp, accum, step):
        out = []
        for r in range(dp):
            for b in data.ShardedBatches(d, 2, accum, dp, r, seed=3).step_batches(step):
                out.append(b["input_ids"][:, 0].tolist())
        return out
    for step in (0, 1, 7):  # 7 crosses into the second epoch (8 samples per step, 8 steps per epoch)
        assert samples(1, 4, step) == samples(2, 2, step) == samples(4, 1, step)
    assert samples(1, 4, 0) != samples(1, 4, 8), "each epoch is reshuffled"
    seen = sum((sum(samples(4, 1, s), []) for s in range(8)), [])
    assert sorted(seen) == list(range(n)), "one epoch visits every sample once"


def test_validation_batches_disjoint_and_layout_independent():
    ids = torch.arange(40).unsqueeze(1)
    d = data.Tokenized(ids, torch.ones_like(ids), ids)
    one = [b["input_ids"][:, 0].tolist() for b in data.val_batches(d, 2, 1, 0, 8)]
    two = [b["input_ids"][:, 0].tolist() for r in range(2) for b in data.val_batches(d, 2, 2, r, 8)]
    assert sorted(sum(one, [])) == sorted(sum(two, [])) == list(range(16))
