"""Where examples come from: a SQuAD v1.1 JSON, a JSONL file (a "text" field, or QA lines), a plain text file, or
a datasets hub name (streamed). A source counts its examples without keeping them and yields only those asked
for, so a run reads, and then tokenizes, only what it will consume (bench/data.py load_dataset)."""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from bench.config import BenchError

SAMPLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "squad_sample.json")
QA_FIELDS = "\"prompt\" and \"answer\", or \"context\", \"question\" and \"answers\""


@dataclass
class Source:
    kind: str            # qa: prompt/answer dicts; text: strings
    count: int | None    # examples in it; None: a stream of unknown length (a hub dataset)
    # (sorted raw indices wanted or None for all, stop after this many or None) -> the examples, in source order
    read: Callable[[list | None, int | None], Iterator]


def qa_example(context: str, question: str, answer: str) -> dict:
    return {"prompt": f"Context: {context}\nQuestion: {question}\nAnswer:", "answer": " " + answer}


def squad_examples(doc: dict, source: str = "squad") -> list[dict]:
    try:
        return [qa_example(para["context"], qa["question"], qa["answers"][0]["text"])
                for article in doc["data"] for para in article["paragraphs"] for qa in para["qas"]]
    except (KeyError, IndexError, TypeError) as e:
        raise BenchError(f"{source}: not SQuAD v1.1 format (data[].paragraphs[].qas[].answers[].text): "
                         f"missing {e}") from None


def _qa_line(obj: dict) -> dict:
    """A QA JSONL line: {"prompt", "answer"}, or SQuAD's fields as the hub's squad has them."""
    if "prompt" in obj:
        return {"prompt": obj["prompt"], "answer": obj["answer"]}
    answers = obj["answers"]
    text = answers["text"][0] if isinstance(answers, dict) else answers[0]["text"]
    return qa_example(obj["context"], obj["question"], text)


def _picked(examples: Iterator, wanted: list | None, limit: int | None) -> Iterator:
    if wanted is not None:
        keep = set(wanted)
        examples = (e for i, e in enumerate(examples) if i in keep)
    return itertools.islice(examples, limit)


def _jsonl(path: str) -> Source:
    """Every line is parsed once to count and check it (a bad line is refused wherever it is); only the lines a
    run asks for are kept."""
    kind, count = None, 0
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                kind = kind or ("text" if "text" in obj else "qa")
                _ = obj["text"] if kind == "text" else _qa_line(obj)
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
                want = "a \"text\" field" if kind == "text" else f"a \"text\" field, or {QA_FIELDS}"
                raise BenchError(f"{path}:{lineno}: expected a JSON object with {want}") from None
            count += 1

    def lines():
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    obj = json.loads(line)
                    yield obj["text"] if kind == "text" else _qa_line(obj)
    return Source(kind or "text", count, lambda wanted, limit: _picked(lines(), wanted, limit))


def _stat(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _in_memory(kind: str, examples: list) -> Source:
    return Source(kind, len(examples), lambda wanted, limit: _picked(iter(examples), wanted, limit))


def fingerprint(spec: str) -> str:
    """What identifies the data's content, without reading it: a file's path, size and modification time."""
    path = SAMPLE_PATH if spec == "squad-sample" else spec
    return _stat(path) if os.path.isfile(path) else f"hub:{spec}"


def open_source(spec: str) -> Source:
    if spec == "squad-sample":
        spec = SAMPLE_PATH
    if os.path.isfile(spec):
        if spec.endswith(".json"):  # one JSON document: it is read whole (its text, not its tokens)
            with open(spec) as fh:
                try:
                    doc = json.load(fh)
                except json.JSONDecodeError as e:
                    raise BenchError(f"{spec}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
            return _in_memory("qa", squad_examples(doc, spec))
        if spec.endswith(".jsonl"):
            return _jsonl(spec)
        with open(spec, encoding="utf-8", errors="replace") as fh:
            return _in_memory("text", [p for p in fh.read().split("\n\n") if p.strip()])
    if os.path.sep in spec or spec.startswith("."):
        raise BenchError(f"data file not found: {spec}")
    try:
        import datasets
        ds = datasets.load_dataset(spec, split="train", streaming=True)
        columns = set(ds.column_names or next(iter(ds)).keys())
    except Exception as e:  # noqa: BLE001 - any failure to fetch is the same bad input for the user
        raise BenchError(f"cannot load dataset {spec!r} (no such file, and the hub load failed: "
                         f"{str(e).splitlines()[0][:200]})") from None
    qa = {"context", "question", "answers"} <= columns
    rows = lambda: (_qa_line(r) if qa else r["text"] for r in ds)  # noqa: E731
    return Source("qa" if qa else "text", None, lambda wanted, limit: _picked(rows(), wanted, limit))
