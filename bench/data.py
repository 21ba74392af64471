"""Datasets (their formats: bench/sources.py): tokenizing what a run consumes, the split, padded or packed
micro-batches and their work counts, and the deterministic assignment of samples to data-parallel ranks.

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
from bench.sources import SAMPLE_PATH, open_source, squad_examples
from bench.log import show

IGNORE = -100  # label value the loss skips (prompt and padding tokens)


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
# Tokenization

@dataclass
class Tokenized:
    input_ids: torch.Tensor       # [N, T] long, right-padded
    attention_mask: torch.Tensor  # [N, T] long
    labels: torch.Tensor          # [N, T] long, IGNORE where no loss
    pad_id: int = 0               # the padding token
    kind: str = "qa"              # qa: one sample per row; text: rows cut from one token stream (packed already)
    # A split of which only the samples a run consumes were tokenized: their positions in the split (sorted;
    # None: every position, row i being position i) and the split's size
    index: torch.Tensor | None = None
    split_size: int | None = None

    @property
    def size(self) -> int:
        """Samples in the split (what the epochs' permutations range over), tokenized or not."""
        return self.input_ids.shape[0] if self.split_size is None else self.split_size

    @property
    def lengths(self) -> torch.Tensor:
        """[N] each row's real (non-padding) tokens."""
        return self.attention_mask.sum(1)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The rows holding these positions of the split."""
        if self.index is None:
            return positions
        rows = torch.searchsorted(self.index, positions)
        assert bool((self.index[rows.clamp(max=len(self.index) - 1)] == positions).all()), "a sample not tokenized"
        return rows

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


def tokenize_text(texts, tok, seq_len: int, max_blocks: int | None = None) -> Tokenized:
    """Concatenate with EOS separators and cut into full seq_len blocks (packing); loss on every token. Reading
    stops once max_blocks blocks are full."""
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if max_blocks is not None and len(stream) >= max_blocks * seq_len:
            break
    n = len(stream) // seq_len if max_blocks is None else min(max_blocks, len(stream) // seq_len)
    if n == 0:
        raise BenchError(f"the text data has {len(stream)} tokens, fewer than one --seq_len ({seq_len}) block")
    ids = torch.tensor(stream[:n * seq_len]).view(n, seq_len)
    return Tokenized(ids, torch.ones_like(ids), ids.clone(), tok.pad_token_id, "text")


@dataclass(frozen=True)
class Need:
    """What a run will consume: its global batches for --max_steps steps and its validation micro-batches."""
    global_batch: int
    steps: int
    val_samples: int  # --eval_batches x micro: the validation split's first samples (bench/data.py val_batches)

    def pool(self, val_fraction: float) -> int:
        """Samples a pool must hold so that its training split covers every step once: for data whose size is not
        known in advance (text blocks, a hub stream), the run's data is the first this many."""
        return math.ceil(self.global_batch * self.steps / (1 - val_fraction)) + self.val_samples


def load_dataset(spec: str, tok, seq_len: int, val_fraction: float, seed: int,
                 need: Need | None = None) -> tuple[Tokenized, Tokenized]:
    """-> (training split, validation split). need: tokenize only what the run consumes (None: everything).

    The split is a seeded permutation of the source's examples (val_fraction of them held out). A source whose
    size is known (files of QA examples) is split whole and only the consumed samples of each split are read and
    tokenized; text blocks and hub streams are split over their first need.pool() examples."""
    src = open_source(spec)
    if src.kind == "text":
        pool = None if need is None else need.pool(val_fraction)
        if src.count == 0:
            raise BenchError(f"data {spec!r} has no examples")
        return _split(tokenize_text(src.read(None, None), tok, seq_len, pool), val_fraction, seed, spec)
    if src.count is None:  # a stream: its first examples, as a file of them would be
        examples = list(src.read(None, None if need is None else need.pool(val_fraction)))
        if not examples:
            raise BenchError(f"data {spec!r} has no examples")
        return _split(tokenize_qa(examples, tok, seq_len), val_fraction, seed, spec)
    perm, n_val = _split_order(src.count, val_fraction, seed, spec)
    train_pos, val_pos = perm[n_val:], perm[:n_val]
    keep_train = torch.arange(len(train_pos)) if need is None else consumed_positions(len(train_pos), need, seed)
    keep_val = torch.arange(n_val if need is None else min(n_val, need.val_samples))
    wanted = sorted(set(train_pos[keep_train].tolist()) | set(val_pos[keep_val].tolist()))
    examples = dict(zip(wanted, src.read(wanted, None)))

    def split(positions, keep) -> Tokenized:
        t = tokenize_qa([examples[i] for i in positions[keep].tolist()], tok, seq_len)
        t.index, t.split_size = keep, len(positions)
        return t
    return split(train_pos, keep_train), split(val_pos, keep_val)


def _split_order(n: int, val_fraction: float, seed: int, spec: str) -> tuple[torch.Tensor, int]:
    if n == 0:
        raise BenchError(f"data {spec!r} has no examples")
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise BenchError(f"data {spec!r} has only {n} sample(s): too few to hold out a validation split")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)), n_val


def _split(data: Tokenized, val_fraction: float, seed: int, spec: str) -> tuple[Tokenized, Tokenized]:
    perm, n_val = _split_order(data.input_ids.shape[0], val_fraction, seed, spec)
    return data.select(perm[n_val:]), data.select(perm[:n_val])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training split's order in an epoch: one seeded permutation, the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def consumed_positions(n: int, need: Need, seed: int) -> torch.Tensor:
    """Sorted positions of the training split that need.steps global batches take (ShardedBatches' order)."""
    per_epoch = n // need.global_batch
    if per_epoch == 0:  # fewer samples than one global batch: ShardedBatches refuses it, with the sizes
        return torch.arange(n)
    taken = []
    for epoch in range(math.ceil(need.steps / per_epoch)):
        steps = min(per_epoch, need.steps - epoch * per_epoch)
        taken.append(epoch_order(n, seed, epoch)[:steps * need.global_batch])
    return torch.unique(torch.cat(taken))


# ---------------------------------------------------------------------------------------------------------
# Micro-batches: padded or packed

ROW_MULTIPLE = 64  # rows are padded to a multiple of this (and of the sequence-parallel degree)


class MicroBatch(dict):
    """A micro-batch: the model's keyword inputs (the dict's items) and what the collator knows of it on the host,
    so nothing in a timed step reads a device value back: each sample's real length (`lengths`) and the tokens
    the loss is computed on (`target_tokens`)."""

    def __init__(self, inputs: dict, lengths: list[int], target_tokens: int, blocks: list[int] | None = None):
        super().__init__(inputs)
        self.lengths, self.target_tokens = lengths, target_tokens
        self.blocks = blocks  # the lengths attention runs over, where not whole rows: a packed row's documents

    def to(self, device) -> "MicroBatch":
        """The inputs on `device` (host ints, the documents' lengths, stay as they are)."""
        return MicroBatch({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in self.items()},
                          self.lengths, self.target_tokens, self.blocks)

    @property
    def work(self) -> tuple[int, int, int, int]:
        """-> (real tokens, computed tokens, real attention pairs, computed attention pairs).

        Real: the samples' own tokens; computed: every position of every row. Attention pairs are the (query, key)
        pairs the FLOPs model's attention term counts: per sample, its length squared (real); computed: per row,
        the row's width squared (a padded row; a packed row under a dense mask), or per document of a packed row
        its length squared (the document path computes nothing across documents)."""
        rows, width = self["input_ids"].shape
        computed_pairs = rows * width * width if self.blocks is None else sum(n * n for n in self.blocks)
        return sum(self.lengths), rows * width, sum(n * n for n in self.lengths), computed_pairs


@dataclass(frozen=True)
class Collate:
    """How a micro-batch's samples become model inputs.

    max: one row per sample, right-padded to --seq_len. longest: one row per sample, padded to the micro-batch's
    longest sample rounded up to `multiple` (at most --seq_len). Padded rows pass no attention mask: padding
    comes after every real token, so causal attention never lets a real token see it (bench/attention.py); with
    `dense` (--attn_mask dense) they carry transformers' padding mask as before. packed: the micro-batch's samples
    concatenated into one row (as transformers' DataCollatorWithFlattening and TRL's padding-free batches do),
    padded at the end to a multiple of `multiple`; position_ids restart at each sample and the row's document
    offsets (cu_seq_lens_q/k, max_length_q/k: flash attention's names) confine attention to each sample
    (bench/attention.py). The padding at the end is one more document at position 0; its labels are ignored."""
    mode: str = "max"
    multiple: int = ROW_MULTIPLE
    # attention over whole rows (--attn_mask dense, or eager attention): padded rows keep their attention mask
    # and a packed row's attention is computed over all of it
    dense: bool = False

    @staticmethod
    def of(kind: str | None, packing: str, padding: str, slices: int = 1, dense: bool = False) -> "Collate":
        """The resolved --packing/--padding for data of this kind (None: not read, bench/plan.py reads_data). Text
        rows are full blocks cut from one stream already: nothing to pack or pad."""
        multiple = ROW_MULTIPLE * slices // math.gcd(ROW_MULTIPLE, slices)  # SP cuts each row into equal slices
        if kind == "text":
            return Collate("max", multiple, dense)
        packed = packing == "on" or (packing == "auto" and padding == "max")
        return Collate("packed" if packed else padding, multiple, dense)

    def shape(self, lengths: list[int], seq_len: int) -> tuple[int, int]:
        """(rows, width) of the micro-batch of samples of these lengths."""
        if self.mode == "packed":
            return 1, _round_up(sum(lengths), self.multiple)
        if self.mode == "longest":
            return len(lengths), min(seq_len, _round_up(max(lengths), self.multiple))
        return len(lengths), seq_len

    def __call__(self, data: Tokenized, idx) -> MicroBatch:
        lengths = data.attention_mask[idx].sum(1).tolist()  # these rows only: this runs every micro-batch
        _, width = self.shape(lengths, data.input_ids.shape[1])
        if self.mode != "packed":
            labels = data.labels[idx, :width]
            inputs = {"input_ids": data.input_ids[idx, :width], "labels": labels}
            if self.dense:
                inputs["attention_mask"] = data.attention_mask[idx, :width]
            return MicroBatch(inputs, lengths, int((labels[:, 1:] != IGNORE).sum()))
        from bench.attention import offsets
        rows = idx.tolist() if torch.is_tensor(idx) else list(idx)
        tail = width - sum(lengths)
        ids = torch.cat([data.input_ids[i, :n] for i, n in zip(rows, lengths)]
                        + [torch.full((tail,), data.pad_id, dtype=data.input_ids.dtype)])
        labels = torch.cat([data.labels[i, :n] for i, n in zip(rows, lengths)]
                           + [torch.full((tail,), IGNORE, dtype=data.labels.dtype)])
        positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(tail, dtype=torch.long)])
        bounds, longest = offsets(lengths, width)
        sizes = tuple((bounds[1:] - bounds[:-1]).tolist())
        inputs = {"input_ids": ids[None], "position_ids": positions[None], "labels": labels[None],
                  "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest,
                  "document_lengths": sizes}
        blocks = None if self.dense else list(sizes)
        return MicroBatch(inputs, lengths, int((labels[1:] != IGNORE).sum()), blocks)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
        n = data.size
        if n < self.global_size:
            raise BenchError(f"the training split has {n} samples, fewer than one global batch "
                             f"({self.global_size}); use more data or a smaller --global_batch_size")
        self.steps_per_epoch = n // self.global_size
        self._epoch, self._perm = None, None

    def step_indices(self, step: int, rank: int | None = None) -> list[torch.Tensor]:
        """The samples of the accum micro-batches a data-parallel rank (default: this one) runs for optimizer step
        `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_order(self.data.size, self.seed, epoch)
        base = within * self.global_size
        first = (self.rank if rank is None else rank) * self.accum
        return [self.data.rows(self._perm[base + j * self.micro: base + (j + 1) * self.micro])
                for j in range(first, first + self.accum)]

    def step_batches(self, step: int) -> list[MicroBatch]:
        """The accum micro-batches this rank runs for optimizer step `step` (0-based)."""
        return [self.collate(self.data, idx) for idx in self.step_indices(step)]

    def planned_shapes(self, steps: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """(rows, width) of the mean micro-batch of the first `steps` steps over every data-parallel rank, and every
        distinct shape among them: packed and longest rows change width from one micro-batch to the next. The
        planner computes throughput, FLOPs and communication for the mean one, the memory peak over them all."""
        lengths = self.data.lengths
        shapes = [self.collate.shape(lengths[idx].tolist(), self.data.input_ids.shape[1])
                  for step in range(steps) for rank in range(self.dp) for idx in self.step_indices(step, rank)]
        mean = round(sum(r for r, _ in shapes) / len(shapes)), round(sum(w for _, w in shapes) / len(shapes))
        return mean, sorted(set(shapes))


def val_batches(data: Tokenized, micro: int, dp: int, dp_rank: int, max_batches: int,
                collate: Collate = Collate()) -> list[MicroBatch]:
    """The first full validation micro-batches (max_batches, rounded down to a multiple of dp so every rank
    runs the same number of forwards, which ZeRO-3 requires), rank r taking r, r+dp, ...: disjoint across
    ranks and the same set for any DP size that divides max_batches, so val_loss compares across layouts."""
    total = min(max_batches, data.size // micro) // dp * dp
    out = []
    for j in range(dp_rank, total, dp):
        out.append(collate(data, data.rows(torch.arange(j * micro, (j + 1) * micro))))
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["make-sample"]:
        sys.exit("usage: python -m bench.data make-sample")
    os.makedirs(os.path.dirname(SAMPLE_PATH), exist_ok=True)
    with open(SAMPLE_PATH, "w") as fh:
        json.dump(make_squad_sample(), fh, indent=1)
    show(f"wrote {SAMPLE_PATH}")
