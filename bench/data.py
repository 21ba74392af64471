"""Datasets: SQuAD v1.1 JSON, JSONL/plain text, or a hub dataset; tokenization, padding/packing, and the
deterministic assignment of samples to data-parallel ranks.

`python -m bench.data make-sample` regenerates the bundled SQuAD-format sample (data/squad_sample.json):
synthetic facts about invented places, so the project ships no downloaded data.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass

import torch

from bench.config import BenchError

IGNORE = -100  # label value the loss skips (prompt and padding tokens)
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "squad_sample.json")


# ---------------------------------------------------------------------------------------------------------
# The bundled sample and the tiny presets' tokenizer

_SYL = ["ka", "lo", "mi", "ren", "tha", "vor", "zen", "qui", "bel", "dor", "sa", "nu", "tri", "ost", "wyn"]
_KINDS = ["town", "city", "village", "harbour", "fortress"]
_REGIONS = ["the northern valley", "the eastern coast", "the high plateau", "the river delta", "the western hills"]
_INDUSTRIES = ["fishing", "weaving", "copper mining", "shipbuilding", "glassmaking", "wine", "salt trading"]


def _name(rng):
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()


def make_squad_sample(n_articles: int = 120, seed: int = 1234) -> dict:
    """SQuAD v1.1-format data: every answer is a span of its context, with answer_start."""
    rng = random.Random(seed)
    articles = []
    for i in range(n_articles):
        place, founder, river = _name(rng), f"{_name(rng)} {_name(rng)}", _name(rng)
        kind, region, industry = rng.choice(_KINDS), rng.choice(_REGIONS), rng.choice(_INDUSTRIES)
        year = str(rng.randint(900, 1900))
        context = (f"{place} is a {kind} in {region}. It was founded in {year} by {founder}. "
                   f"The {river} river flows through {place}, and its main industry is {industry}.")
        qa = [(f"When was {place} founded?", year), (f"Who founded {place}?", founder),
              (f"Which river flows through {place}?", river), (f"What is the main industry of {place}?", industry)]
        qas = [{"id": f"{i}-{j}", "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
               for j, (q, a) in enumerate(qa)]
        articles.append({"title": place, "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": articles}


def build_tiny_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the bundled sample: any text encodes, and nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [e["prompt"] + e["answer"] for e in squad_examples(make_squad_sample())]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], bos_token=specials[1],
                                   eos_token=specials[2])


# ---------------------------------------------------------------------------------------------------------
# Loading raw examples

def squad_examples(doc: dict, source: str = "squad") -> list[dict]:
    try:
        out = []
        for article in doc["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    out.append({"prompt": f"Context: {para['context']}\nQuestion: {qa['question']}\nAnswer:",
                                "answer": " " + qa["answers"][0]["text"]})
        return out
    except (KeyError, IndexError, TypeError) as e:
        raise BenchError(f"{source}: not SQuAD v1.1 format (data[].paragraphs[].qas[].answers[].text): "
                         f"missing {e}") from None


def load_examples(spec: str) -> tuple[str, list]:
    """-> (kind, examples); kind 'qa' gives prompt/answer dicts, 'text' gives strings."""
    if spec == "squad-sample":
        spec = SAMPLE_PATH
    if os.path.isfile(spec):
        if spec.endswith(".json"):
            with open(spec) as fh:
                try:
                    doc = json.load(fh)
                except json.JSONDecodeError as e:
                    raise BenchError(f"{spec}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
            return "qa", squad_examples(doc, spec)
        if spec.endswith(".jsonl"):
            texts = []
            with open(spec) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        texts.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise BenchError(f"{spec}:{lineno}: expected a JSON object with a \"text\" field") from None
            return "text", texts
        with open(spec, encoding="utf-8", errors="replace") as fh:
            return "text", [p for p in fh.read().split("\n\n") if p.strip()]
    if os.path.sep in spec or spec.startswith("."):
        raise BenchError(f"data file not found: {spec}")
    try:
        import datasets
        ds = datasets.load_dataset(spec, split="train")
    except Exception as e:  # noqa: BLE001 - any failure to fetch is the same bad input for the user
        raise BenchError(f"cannot load dataset {spec!r} (no such file, and the hub load failed: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if "context" in ds.column_names and "answers" in ds.column_names:
        return "qa", [{"prompt": f"Context: {r['context']}\nQuestion: {r['question']}\nAnswer:",
                       "answer": " " + r["answers"]["text"][0]} for r in ds]
    return "text", [r["text"] for r in ds]


# ---------------------------------------------------------------------------------------------------------
# Tokenization

@dataclass
class Tokenized:
    input_ids: torch.Tensor       # [N, T] long, right-padded
    attention_mask: torch.Tensor  # [N, T] long
    labels: torch.Tensor          # [N, T] long, IGNORE where no loss
    pad_id: int = 0               # the padding token
    kind: str = "qa"              # qa: one sample per row; text: rows cut from one token stream (packed already)

    @property
    def lengths(self) -> torch.Tensor:
        """[N] each row's real (non-padding) tokens."""
        return self.attention_mask.sum(1)

    def select(self, idx) -> "Tokenized":
        return Tokenized(self.input_ids[idx], self.attention_mask[idx], self.labels[idx], self.pad_id, self.kind)


def tokenize_qa(examples: list[dict], tok, seq_len: int) -> Tokenized:
    """Right-padded prompt+answer; loss on answer (+EOS) tokens only. Long contexts lose their start."""
    ids, masks, labels = [], [], []
    for ex in examples:
        prompt = tok(ex["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(ex["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        answer = answer[:seq_len // 2]
        prompt = prompt[max(0, len(prompt) - (seq_len - len(bos) - len(answer))):]
        seq = bos + prompt + answer
        lab = [IGNORE] * (len(bos) + len(prompt)) + answer
        pad = seq_len - len(seq)
        ids.append(seq + [tok.pad_token_id] * pad)
        masks.append([1] * len(seq) + [0] * pad)
        labels.append(lab + [IGNORE] * pad)
    return Tokenized(torch.tensor(ids), torch.tensor(masks), torch.tensor(labels), tok.pad_token_id, "qa")


def tokenize_text(texts: list[str], tok, seq_len: int) -> Tokenized:
    """Concatenate with EOS separators and cut into full seq_len blocks (packing); loss on every token."""
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // seq_len
    if n == 0:
        raise BenchError(f"the text data has {len(stream)} tokens, fewer than one --seq_len ({seq_len}) block")
    ids = torch.tensor(stream[:n * seq_len]).view(n, seq_len)
    return Tokenized(ids, torch.ones_like(ids), ids.clone(), tok.pad_token_id, "text")


def load_dataset(spec: str, tok, seq_len: int, val_fraction: float, seed: int) -> tuple[Tokenized, Tokenized]:
    kind, examples = load_examples(spec)
    if not examples:
        raise BenchError(f"data {spec!r} has no examples")
    data = tokenize_qa(examples, tok, seq_len) if kind == "qa" else tokenize_text(examples, tok, seq_len)
    n = data.input_ids.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise BenchError(f"data {spec!r} has only {n} sample(s): too few to hold out a validation split")
    return data.select(perm[n_val:]), data.select(perm[:n_val])


# ---------------------------------------------------------------------------------------------------------
# Micro-batches: padded or packed

ROW_MULTIPLE = 64  # rows are padded to a multiple of this (and of the sequence-parallel degree)


@dataclass(frozen=True)
class Collate:
    """How a micro-batch's samples become model inputs.

    max: one row per sample, padded to --seq_len, with an attention mask. longest: one row per sample, padded to
    the micro-batch's longest sample rounded up to `multiple` (at most --seq_len). packed: the micro-batch's
    samples concatenated into one row (as transformers' DataCollatorWithFlattening and TRL's padding-free
    batches do), padded at the end to a multiple of `multiple`; position_ids restart at each sample and no
    attention mask is passed, so transformers confines attention to each sample (masking_utils.py,
    find_packed_sequence_indices, which needs the KV cache off, as bench/models.py sets it; flash attention's
    variable-length path on GPUs). The padding at the end is
    one-token sequences at position 0, so it attends only to itself and a count can tell it from the samples,
    which always hold two tokens or more (BOS or prompt, answer, EOS)."""
    mode: str = "max"
    multiple: int = ROW_MULTIPLE

    @staticmethod
    def of(kind: str, packing: str, padding: str, sp: int = 1) -> "Collate":
        """The resolved --packing/--padding for data of this kind. Text rows are full blocks cut from one stream
        already: nothing to pack or pad."""
        multiple = ROW_MULTIPLE * sp // math.gcd(ROW_MULTIPLE, sp)  # SP cuts each row into sp equal slices
        if kind == "text":
            return Collate("max", multiple)
        packed = packing == "on" or (packing == "auto" and padding == "max")
        return Collate("packed" if packed else padding, multiple)

    def shape(self, lengths: list[int], seq_len: int) -> tuple[int, int]:
        """(rows, width) of the micro-batch of samples of these lengths."""
        if self.mode == "packed":
            return 1, _round_up(sum(lengths), self.multiple)
        if self.mode == "longest":
            return len(lengths), min(seq_len, _round_up(max(lengths), self.multiple))
        return len(lengths), seq_len

    def __call__(self, data: Tokenized, idx) -> dict:
        if self.mode == "max":
            return {"input_ids": data.input_ids[idx], "attention_mask": data.attention_mask[idx],
                    "labels": data.labels[idx]}
        lengths = data.lengths[idx].tolist()
        _, width = self.shape(lengths, data.input_ids.shape[1])
        if self.mode == "longest":
            return {"input_ids": data.input_ids[idx, :width], "attention_mask": data.attention_mask[idx, :width],
                    "labels": data.labels[idx, :width]}
        rows = idx.tolist() if torch.is_tensor(idx) else list(idx)
        real = sum(lengths)
        tail = width - real
        ids = torch.cat([data.input_ids[i, :n] for i, n in zip(rows, lengths)]
                        + [torch.full((tail,), data.pad_id, dtype=data.input_ids.dtype)])
        labels = torch.cat([data.labels[i, :n] for i, n in zip(rows, lengths)]
                           + [torch.full((tail,), IGNORE, dtype=data.labels.dtype)])
        positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(tail, dtype=torch.long)])
        return {"input_ids": ids[None], "position_ids": positions[None], "labels": labels[None]}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batch_work(batch: dict) -> tuple[int, int, int, int]:
    """-> (real tokens, computed tokens, real attention pairs, computed attention pairs) of one micro-batch.

    Real: the samples' own tokens; computed: every position of every row. Attention pairs are the (query, key)
    pairs the FLOPs model's attention term counts: per sample, its length squared (real); per row, the row's
    width squared (computed: what SDPA computes over a padded row or, masked, over a packed row)."""
    ids = batch["input_ids"]
    rows, width = ids.shape
    if "position_ids" in batch and "attention_mask" not in batch:
        lengths = _segment_lengths(batch["position_ids"])
        lengths = lengths[lengths > 1]  # one-token segments are the packed row's padding
    else:
        lengths = batch["attention_mask"].sum(1) if "attention_mask" in batch else torch.full((rows,), width)
    return int(lengths.sum()), rows * width, int((lengths.long() ** 2).sum()), rows * width * width


def _segment_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the sequences in packed rows: a sequence starts where its position is 0."""
    lengths = []
    for row in position_ids:
        starts = torch.nonzero(row == 0).flatten().tolist() + [row.numel()]
        lengths += [b - a for a, b in zip(starts, starts[1:])]
    return torch.tensor(lengths, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------
# Sharding

class ShardedBatches:
    """Micro-batches for one data-parallel rank, identical in content whatever the DP size.

    A global batch is G = micro * accum * dp consecutive samples of an epoch's seeded permutation, cut into
    accum * dp micro-batches j = 0..; rank r takes j = r * accum + k for k < accum. So DP=2/accum=1 and
    DP=1/accum=2 compute exactly the same micro-batches, which is what makes loss parity testable.
    """

    def __init__(self, data: Tokenized, micro: int, accum: int, dp: int, dp_rank: int, seed: int,
                 collate: Collate = Collate()):
        self.data, self.micro, self.accum, self.dp, self.rank, self.seed = data, micro, accum, dp, dp_rank, seed
        self.collate = collate
        self.global_size = micro * accum * dp
        n = data.input_ids.shape[0]
        if n < self.global_size:
            raise BenchError(f"the training split has {n} samples, fewer than one global batch "
                             f"({self.global_size}); use more data or a smaller --global_batch_size")
        self.steps_per_epoch = n // self.global_size
        self._epoch, self._perm = None, None

    def step_indices(self, step: int, rank: int | None = None) -> list[torch.Tensor]:
        """The samples of the accum micro-batches a data-parallel rank (default: this one) runs for optimizer step
        `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # one seeded permutation per epoch, the same on every rank
            self._epoch = epoch
            self._perm = torch.randperm(self.data.input_ids.shape[0],
                                        generator=torch.Generator().manual_seed(self.seed + epoch))
        base = within * self.global_size
        first = (self.rank if rank is None else rank) * self.accum
        return [self._perm[base + j * self.micro: base + (j + 1) * self.micro] for j in range(first, first + self.accum)]

    def step_batches(self, step: int) -> list[dict]:
        """The accum micro-batches this rank runs for optimizer step `step` (0-based)."""
        return [self.collate(self.data, idx) for idx in self.step_indices(step)]

    def mean_shape(self, steps: int) -> tuple[int, int]:
        """(rows, width) of the mean micro-batch of the first `steps` steps, over every data-parallel rank (the
        planner's micro-batch: packed and longest rows change width from one micro-batch to the next)."""
        lengths = self.data.lengths
        shapes = [self.collate.shape(lengths[idx].tolist(), self.data.input_ids.shape[1])
                  for step in range(steps) for rank in range(self.dp) for idx in self.step_indices(step, rank)]
        return round(sum(r for r, _ in shapes) / len(shapes)), round(sum(w for _, w in shapes) / len(shapes))


def val_batches(data: Tokenized, micro: int, dp: int, dp_rank: int, max_batches: int,
                collate: Collate = Collate()) -> list[dict]:
    """The first full validation micro-batches (max_batches, rounded down to a multiple of dp so every rank
    runs the same number of forwards, which ZeRO-3 requires), rank r taking r, r+dp, ...: disjoint across
    ranks and the same set for any DP size that divides max_batches, so val_loss compares across layouts."""
    total = min(max_batches, data.input_ids.shape[0] // micro) // dp * dp
    out = []
    for j in range(dp_rank, total, dp):
        out.append(collate(data, torch.arange(j * micro, (j + 1) * micro)))
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["make-sample"]:
        sys.exit("usage: python -m bench.data make-sample")
    os.makedirs(os.path.dirname(SAMPLE_PATH), exist_ok=True)
    with open(SAMPLE_PATH, "w") as fh:
        json.dump(make_squad_sample(), fh, indent=1)
    print(f"wrote {SAMPLE_PATH}")
