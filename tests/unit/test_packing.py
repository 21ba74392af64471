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
    # no mask: the document offsets confine attention to each sample (bench/attention.py)
    assert set(b) == {"input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                      "max_length_k", "document_lengths"}
    assert b["input_ids"][0].tolist() == [201, 202, 203, 1, 2, 3, 4, 5] and b["input_ids"].shape == (1, 8)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert b["labels"][0].tolist() == [IGNORE, IGNORE, 203, IGNORE, IGNORE, 3, 4, 5]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 8] and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["max_length_q"] == 5 and (b.lengths, b.target_tokens) == ([3, 5], 4)
    assert b["document_lengths"] == (3, 5)  # host ints: the per-document path never reads the offsets back
    b = data.Collate("packed", 8)(d, torch.tensor([0, 1]))  # 12 tokens: padded to 16, the padding one document
    assert b["input_ids"][0, 12:].tolist() == [0] * 4 and b["position_ids"][0, 12:].tolist() == [0] * 4
    assert (b["labels"][0, 12:] == IGNORE).all()
    assert b["cu_seq_lens_q"].tolist() == [0, 5, 12, 16] and b["max_length_q"] == 7


def test_padded_rows_carry_no_attention_mask_unless_dense_masks_are_asked():
    d = qa_data([5, 7, 3])
    b = data.Collate("longest", 4)(d, torch.tensor([0, 2]))
    assert set(b) == {"input_ids", "labels"} and b["input_ids"].shape == (2, 8) and b.lengths == [5, 3]
    dense = data.Collate("longest", 4, dense=True)(d, torch.tensor([0, 2]))
    assert torch.equal(dense["attention_mask"].sum(1), torch.tensor([5, 3]))
    assert data.Collate("longest", 64)(d, torch.tensor([1]))["input_ids"].shape == (1, 48)  # capped at the width
    assert data.Collate("max")(d, torch.tensor([1]))["input_ids"].shape == (1, 48)


def test_collate_resolution():
    assert data.Collate.of("qa", "auto", "max").mode == "packed"
    assert data.Collate.of("qa", "auto", "longest").mode == "longest"
    assert data.Collate.of("qa", "off", "max").mode == "max"
    assert data.Collate.of("text", "on", "max").mode == "max"  # text rows are full blocks of one stream
    assert data.Collate.of("qa", "on", "max", slices=3).multiple == 192  # SP cuts rows into equal slices


@pytest.mark.parametrize("mode", ["packed", "longest", "max"])
@pytest.mark.parametrize("dense", [False, True])
def test_work_counts_match_an_independent_count(mode, dense):
    """Counted from the labels and input ids here, not from the collator's lengths: real tokens are the non-padding
    ids, target tokens the shifted labels that are not ignored; a packed row on the document path computes each
    document's pairs (the padding at its end one more document), under dense masks the whole row's."""
    from bench.train import target_tokens
    lengths = [5, 7, 3, 11]
    d = qa_data(lengths)
    idx = torch.tensor([3, 0, 2])
    b = data.Collate(mode, 8, dense=dense)(d, idx)
    real, computed, real_pairs, computed_pairs = b.work
    mine = [lengths[i] for i in idx.tolist()]
    width = {"packed": 24, "longest": 16, "max": 48}[mode]  # 19 tokens -> 24; longest 11 -> 16
    rows = 1 if mode == "packed" else 3
    assert (real, computed) == (int((b["input_ids"] != 0).sum()), rows * width) == (sum(mine), rows * width)
    whole_rows = rows * width * width
    documents = sum(n * n for n in mine) + (width - sum(mine)) ** 2
    assert (real_pairs, computed_pairs) == (sum(n * n for n in mine),
                                            documents if mode == "packed" and not dense else whole_rows)
    assert b.target_tokens == target_tokens(b) == sum(n - 2 for n in mine)  # answers from the 3rd token


def test_packed_mask_is_what_transformers_builds_from_the_position_ids():
    from transformers.masking_utils import find_packed_sequence_indices
    positions = data.Collate("packed", 8)(qa_data([5, 7, 3]), torch.tensor([0, 1, 2]))["position_ids"]
    mask = models.packed_causal_mask(positions)[0, 0]
    sequence = find_packed_sequence_indices(positions)[0]
    t = positions.shape[1]
    expected = torch.tensor([[j <= i and sequence[i] == sequence[j] for j in range(t)] for i in range(t)])
    assert torch.equal(mask, expected)
    assert torch.equal(models.packed_causal_mask(torch.arange(8)[None])[0, 0], torch.ones(8, 8).tril().bool())


def _loss_and_grads(path, implementation: str, batch: dict):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=implementation, dtype=torch.float32)
    model.config.use_cache = False  # as bench/models.py trains: with a KV cache transformers finds no packing
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_every_attention_path_computes_the_dense_masked_loss_and_gradients():
    """Against today's reference, padded rows under transformers' dense padding mask (SDPA): padded rows without a
    mask (causal), a packed row on the document path (bench/attention.py, one SDPA call per sample here), a packed
    row under transformers' block-diagonal mask, and eager attention both ways: the same mean loss over the
    answer tokens and the same gradients (fp32). Negative control: the packed row without its document offsets
    attends across samples, and the loss moves."""
    from bench import attention
    from bench.data import load_dataset
    path = models.ensure_tiny("tiny-llama")
    tok = models.load_tokenizer(path)
    train, _ = load_dataset("squad-sample", tok, 128, 0.1, 0)
    idx = torch.arange(4)
    documents = attention.model_implementation("sdpa", "auto")
    reference = _loss_and_grads(path, "sdpa", data.Collate("max", dense=True)(train, idx))
    paths = {"padded, no mask": (documents, data.Collate("max")(train, idx)),
             "packed, documents": (documents, data.Collate("packed")(train, idx)),
             "packed, dense mask": ("sdpa", data.Collate("packed", dense=True)(train, idx)),
             "eager padded": ("eager", data.Collate("max", dense=True)(train, idx)),
             "eager packed": ("eager", data.Collate("packed", dense=True)(train, idx))}
    for name, (implementation, batch) in paths.items():
        loss, grads = _loss_and_grads(path, implementation, batch)
        assert loss == pytest.approx(reference[0], rel=1e-5), name
        for ga, gb in zip(reference[1], grads):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6, msg=name)
    packed = data.Collate("packed")(train, idx)
    across = {k: v for k, v in packed.items() if k not in attention.KWARGS}
    assert abs(_loss_and_grads(path, documents, across)[0] - reference[0]) > 1e-3


def test_the_document_path_never_builds_a_row_by_row_mask():
    """transformers builds no mask for the harness's implementation (it is not in AttentionMaskInterface), so the
    attention function gets None, and the packed position ids are never scanned for samples."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from bench import attention
    name = attention.model_implementation("sdpa", "auto")
    assert name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    model = AutoModelForCausalLM.from_pretrained(models.ensure_tiny("tiny-llama"), attn_implementation=name)
    model.config.use_cache = False
    seen = []
    original = attention.document_attention

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, "cu_seq_lens_q" in kwargs))
        return original(module, query, key, value, attention_mask, **kwargs)
    from transformers import AttentionInterface
    AttentionInterface.register(name, spy)
    try:
        d = qa_data([5, 7, 3])
        model(**data.Collate("packed", 8)(d, torch.tensor([0, 1, 2])))
    finally:
        attention.register()
    assert seen and all(mask is None and offsets for mask, offsets in seen)


@pytest.mark.parametrize("device,dtype,head_dim,capability,expected", [
    ("cuda", torch.bfloat16, 128, (9, 0), True), ("cuda", torch.float16, 64, (8, 0), True),
    ("cuda", torch.float32, 128, (9, 0), False),  # flash kernels take fp16/bf16 only
    ("cuda", torch.bfloat16, 128, (7, 5), False),  # before Ampere
    ("cuda", torch.bfloat16, 72 + 1, (9, 0), False), ("cpu", torch.bfloat16, 128, None, False)])
def test_varlen_runs_only_where_its_flash_kernel_can(device, dtype, head_dim, capability, expected):
    from bench import attention
    got = attention.varlen_runs(device, dtype, head_dim, capability)
    assert got == (expected and attention._varlen() is not None)
    kernel = attention.describe("sdpa", "auto", "packed", False, device, got)["kernel"]
    assert kernel == ("varlen_attn" if got else "sdpa per document")
