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


def _qa_jsonl(path, n: int) -> str:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"context": f"Place {i} lies on river R{i % 7}.", "question": f"Where is place {i}?",
                                 "answers": {"text": [f"on river R{i % 7}"]}}) + "\n")
    return str(path)


def test_only_the_consumed_samples_are_tokenized_and_they_are_the_same_samples(tmp_path):
    """A run of 3 steps of 8 over a 600-sample QA JSONL tokenizes its 24 training samples and the validation
    samples it evaluates, and every step gets exactly the micro-batches tokenizing everything would give it."""
    path, tok = _qa_jsonl(tmp_path / "qa.jsonl", 600), tokenizer()
    need = data.Need(global_batch=8, steps=3, val_samples=4)
    full_train, full_val = data.load_dataset(path, tok, 64, 0.1, 5)
    train, val = data.load_dataset(path, tok, 64, 0.1, 5, need)
    assert (train.input_ids.shape[0], val.input_ids.shape[0]) == (24, 4)
    assert (train.size, val.size) == (full_train.size, full_val.size) == (540, 60)
    for dp, rank in ((1, 0), (2, 1)):
        whole, some = (data.ShardedBatches(d, 2, 4 // dp, dp, rank, 5, data.Collate("packed"))
                       for d in (full_train, train))
        for step in range(3):
            for a, b in zip(whole.step_batches(step), some.step_batches(step)):
                assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    for a, b in zip(data.val_batches(full_val, 2, 1, 0, 2), data.val_batches(val, 2, 1, 0, 2)):
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_text_reads_only_the_blocks_a_run_needs(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(400)))
    need = data.Need(global_batch=4, steps=2, val_samples=2)
    train, val = data.load_dataset(str(path), tokenizer(), 32, 0.5, 0, need)
    assert train.input_ids.shape[0] + val.input_ids.shape[0] == need.pool(0.5) == 18
    assert train.input_ids.shape[0] >= 4 * 2


def test_a_bad_line_is_refused_wherever_it_is(tmp_path):
    from bench.config import BenchError
    path = _qa_jsonl(tmp_path / "qa.jsonl", 300)
    with open(path, "a") as fh:
        fh.write('{"context": "c", "question": "q"}\n')
    with pytest.raises(BenchError, match=r"qa.jsonl:301: expected a JSON object"):
        data.load_dataset(path, tokenizer(), 64, 0.1, 0, data.Need(4, 1, 2))


def test_the_node_tokenizes_once_and_every_rank_maps_the_same_file(tmp_path, monkeypatch):
    """Local rank 1, a real process started first, waits for local rank 0's file and loads it; a second load reads
    the file without touching the data; a failure of rank 0 reaches a waiting rank as the same line."""
    import subprocess
    import sys
    from bench import data_cache, models
    from bench.config import BenchError
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))
    path, source = _qa_jsonl(tmp_path / "qa.jsonl", 200), models.ensure_tiny("tiny-llama")
    tok = models.load_tokenizer(source)
    need = data.Need(4, 2, 2)
    args = (path, tok, source, 64, 0.1, 1, need)
    code = ("import sys; from bench import data, data_cache, models; s = sys.argv[2]; "
            "t, v = data_cache.load(sys.argv[1], models.load_tokenizer(s), s, 64, 0.1, 1, data.Need(4, 2, 2), 1, 60); "
            "print(t.input_ids.shape[0], v.input_ids.shape[0], t.size)")
    waiting = subprocess.Popen([sys.executable, "-c", code, path, source], stdout=subprocess.PIPE, text=True)
    train, val = data_cache.load(*args, local_rank=0, timeout_s=60)
    assert waiting.communicate(timeout=120)[0].split() == ["8", "2", "180"] and waiting.returncode == 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    with monkeypatch.context() as m:
        m.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("tokenized twice"))
        again, _ = data_cache.load(*args, local_rank=0, timeout_s=60)
    assert torch.equal(again.input_ids, train.input_ids)
    bad = str(tmp_path / "missing.jsonl")
    with pytest.raises(BenchError, match="data file not found"):
        data_cache.load(bad, tok, source, 64, 0.1, 1, need, local_rank=0, timeout_s=60)
    with pytest.raises(BenchError, match="data file not found"):  # what rank 0 left, not a wait
        data_cache.load(bad, tok, source, 64, 0.1, 1, need, local_rank=1, timeout_s=60)
