"""Packing and padding: what a micro-batch becomes (--packing, --padding), what its work counts are, and that a
packed row computes the same per-token loss and gradients as the padded rows of the same samples. The same claim
on real launches under every strategy is tests/integration/test_packing_parity.py."""
import pytest
import torch

from bench import data, models
from bench.data import IGNORE

pytestmark = pytest.mark.unit


def qa_data(lengths: list[int], width: int = 48, pad: int = 0) -> data.Tokenized:
    """Samples of the given lengths: ids 100*i + position, a two-token prompt (no loss) and the rest answer."""
    n = len(lengths)
    ids, mask, labels = (torch.full((n, width), pad), torch.zeros(n, width, dtype=torch.long),
                         torch.full((n, width), IGNORE))
    for i, length in enumerate(lengths):
        ids[i, :length] = 100 * i + torch.arange(length) + 1
        mask[i, :length] = 1
        labels[i, 2:length] = ids[i, 2:length]
    return data.Tokenized(ids, mask, labels, pad, "qa")


def test_packing_concatenates_the_samples_with_restarting_positions_and_pads_the_end():
    d = qa_data([5, 7, 3])
    b = data.Collate("packed", 8)(d, torch.tensor([2, 0]))
    assert set(b) == {"input_ids", "position_ids", "labels"}  # no mask: transformers confines attention itself
    assert b["input_ids"][0].tolist() == [201, 202, 203, 1, 2, 3, 4, 5] and b["input_ids"].shape == (1, 8)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert b["labels"][0].tolist() == [IGNORE, IGNORE, 203, IGNORE, IGNORE, 3, 4, 5]
    b = data.Collate("packed", 8)(d, torch.tensor([0, 1]))  # 12 tokens: padded to 16 with one-token sequences
    assert b["input_ids"][0, 12:].tolist() == [0] * 4 and b["position_ids"][0, 12:].tolist() == [0] * 4
    assert (b["labels"][0, 12:] == IGNORE).all()


def test_longest_pads_to_the_longest_sample_rounded_up_and_never_past_seq_len():
    d = qa_data([5, 7, 3])
    b = data.Collate("longest", 4)(d, torch.tensor([0, 2]))
    assert b["input_ids"].shape == (2, 8) and torch.equal(b["attention_mask"].sum(1), torch.tensor([5, 3]))
    assert data.Collate("longest", 64)(d, torch.tensor([1]))["input_ids"].shape == (1, 48)  # capped at the width
    assert data.Collate("max")(d, torch.tensor([1]))["input_ids"].shape == (1, 48)


def test_collate_resolution():
    assert data.Collate.of("qa", "auto", "max").mode == "packed"
    assert data.Collate.of("qa", "auto", "longest").mode == "longest"
    assert data.Collate.of("qa", "off", "max").mode == "max"
    assert data.Collate.of("text", "on", "max").mode == "max"  # text rows are full blocks of one stream
    assert data.Collate.of("qa", "on", "max", slices=3).multiple == 192  # SP cuts rows into equal slices


@pytest.mark.parametrize("mode", ["packed", "longest", "max"])
def test_work_counts_match_an_independent_count(mode):
    lengths = [5, 7, 3, 11]
    d = qa_data(lengths)
    idx = torch.tensor([3, 0, 2])
    b = data.Collate(mode, 8)(d, idx)
    real, computed, real_pairs, computed_pairs = data.batch_work(b)
    mine = [lengths[i] for i in idx.tolist()]
    width = {"packed": 24, "longest": 16, "max": 48}[mode]  # 19 tokens -> 24; longest 11 -> 16
    rows = 1 if mode == "packed" else 3
    assert (real, computed) == (sum(mine), rows * width)
    assert (real_pairs, computed_pairs) == (sum(n * n for n in mine), rows * width * width)


def test_packed_mask_is_what_transformers_builds_from_the_position_ids():
    from transformers.masking_utils import find_packed_sequence_indices
    positions = data.Collate("packed", 8)(qa_data([5, 7, 3]), torch.tensor([0, 1, 2]))["position_ids"]
    mask = models.packed_causal_mask(positions)[0, 0]
    sequence = find_packed_sequence_indices(positions)[0]
    t = positions.shape[1]
    expected = torch.tensor([[j <= i and sequence[i] == sequence[j] for j in range(t)] for i in range(t)])
    assert torch.equal(mask, expected)
    assert torch.equal(models.packed_causal_mask(torch.arange(8)[None])[0, 0], torch.ones(8, 8).tril().bool())


def test_a_packed_row_computes_the_padded_rows_loss_and_gradients():
    """The micro-batch's mean loss over its answer tokens and every gradient agree (fp32) between the padded
    micro-batch and the packed row of the same samples, under SDPA and eager attention."""
    from bench.data import load_dataset
    path = models.ensure_tiny("tiny-llama")
    tok = models.load_tokenizer(path)
    train, _ = load_dataset("squad-sample", tok, 128, 0.1, 0)
    idx = torch.arange(4)
    for attn in ("sdpa", "eager"):
        results = []
        for mode in ("max", "packed"):
            from transformers import AutoModelForCausalLM
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
            model.config.use_cache = False  # as bench/models.py trains: with a KV cache transformers finds no packing
            loss = model(**data.Collate(mode)(train, idx)).loss
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        (loss_a, grads_a), (loss_b, grads_b) = results
        assert loss_b == pytest.approx(loss_a, rel=1e-5), attn
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
