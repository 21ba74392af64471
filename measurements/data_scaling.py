"""What preparing the data costs each rank: the time and the host memory two ranks of one node spend before the
first step on a large QA JSONL (200,000 synthetic SQuAD-style samples by default), before and after the run
tokenized only what it consumes, once per node.

before: every rank tokenizes the whole file (bench/data.py load_dataset without a Need: what every run did
        until the harness knew what it would consume).
after:  the run as bench/plan.py resolves it: local rank 0 tokenizes the consumed samples into the node's cache
        file and both ranks map that file (bench/data_cache.py); a cold cache, then a warm one (a second run).

Each rank is its own process, the two started together, and reports the seconds its data step took and the
growth of its RSS high-water mark over its RSS before the step (resource.getrusage: the peak, not the end).

    python measurements/data_scaling.py [--samples 200000] [--out docs/results/data_scaling_cpu.md]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import common

sys.path.insert(0, common.REPO)

JOB = dict(seq_len=1024, val_fraction=0.1, seed=42, global_batch=32, steps=50, val_samples=8 * 4)
RANK = r"""
import json, resource, sys, time
from bench import data, data_cache, models
from bench.metrics import current_rss_mib
path, way, local_rank, job = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
source = models.ensure_tiny("tiny-llama")
tok = models.load_tokenizer(source)
before = current_rss_mib()
t0 = time.perf_counter()
if way == "before":
    train, val = data.load_dataset(path, tok, job["seq_len"], job["val_fraction"], job["seed"])
else:
    need = data.Need(job["global_batch"], job["steps"], job["val_samples"])
    train, val = data_cache.load(path, tok, source, job["seq_len"], job["val_fraction"], job["seed"], need,
                                 local_rank, 600)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_growth_mib": peak - before, "tokenized": train.input_ids.shape[0]
                  + val.input_ids.shape[0], "train": train.size}))
"""


def write_jsonl(path: str, n: int) -> None:
    """SQuAD-style lines (context, question, answers), about 60 words each, all different."""
    with open(path, "w") as fh:
        for i in range(n):
            context = (f"The town of Place{i} lies on the river R{i % 97} in region {i % 13}. It was founded in "
                       f"{900 + i % 1000} by a family of {['weavers', 'miners', 'fishers'][i % 3]} and today its "
                       f"main industry is {['wine', 'salt', 'glass', 'copper'][i % 4]} with {i % 5000} workers.")
            fh.write(json.dumps({"context": context, "question": f"Who founded Place{i}?",
                                 "answers": {"text": [['weavers', 'miners', 'fishers'][i % 3]]}}) + "\n")


def measure(path: str, way: str, cache: str, in_turn: bool = False) -> list[dict]:
    """Both ranks of the node at once (in_turn: one after the other). -> their reports, local rank 0 first."""
    env = {**os.environ, "BENCH_DATA_CACHE": cache, "OMP_NUM_THREADS": "1", "PYTHONPATH": common.REPO}
    start = lambda r: subprocess.Popen([sys.executable, "-c", RANK, path, way, str(r), json.dumps(JOB)],  # noqa: E731
                                       cwd=common.REPO, env=env, stdout=subprocess.PIPE, text=True)
    procs, out = [], []
    if in_turn:
        for r in (0, 1):
            procs.append(start(r))
            out.append(procs[-1].communicate()[0])
    else:
        procs = [start(r) for r in (0, 1)]
        out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a rank failed: {out}")
    return [json.loads(o.strip().splitlines()[-1]) for o in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--out")
    ap.add_argument("--before_in_turn", action="store_true",
                    help="run the two 'before' ranks one after the other: at 200k samples each holds about 10 GB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qa.jsonl")
        write_jsonl(path, args.samples)
        size_mib = os.path.getsize(path) / 2**20
        cache = os.path.join(tmp, "cache")
        rows = {"before": measure(path, "before", cache, args.before_in_turn),
                "after, cold cache": measure(path, "after", cache),
                "after, warm cache": measure(path, "after", cache)}
    consumed = JOB["global_batch"] * JOB["steps"]
    lines = ["# Preparing the data: before and after tokenizing only what a run consumes, once per node", "",
             common.host_line(), "",
             f"Command: `python measurements/data_scaling.py --samples {args.samples}"
             f"{' --before_in_turn' if args.before_in_turn else ''}`. Data: a {args.samples:,}-sample "
             f"SQuAD-style QA JSONL ({size_mib:.0f} MiB); tiny-llama's BPE tokenizer; seq_len {JOB['seq_len']}, "
             f"global batch {JOB['global_batch']} x {JOB['steps']} steps ({consumed:,} training samples consumed), "
             f"{JOB['val_samples']} validation samples; two ranks of one node, started together"
             f"{' (before: one after the other, for memory)' if args.before_in_turn else ''}. Per rank: the "
             "seconds of its data step and the growth of its RSS high-water mark during it.", "",
             "| way | rank | seconds | peak RSS growth MiB | samples tokenized |", "|---|---|---|---|---|"]
    for way, reports in rows.items():
        for rank, r in enumerate(reports):
            lines.append(f"| {way} | {rank} | {r['seconds']:.1f} | {r['peak_growth_mib']:.0f} | {r['tokenized']:,} |")
    before = max(r["peak_growth_mib"] for r in rows["before"])
    after = max(r["peak_growth_mib"] for r in rows["after, cold cache"])
    lines += ["", f"Largest rank's peak RSS growth: {before:.0f} MiB before, {after:.0f} MiB after "
              f"({before / max(after, 1):.0f}x less); the slowest rank's time: "
              f"{max(r['seconds'] for r in rows['before']):.1f} s before, "
              f"{max(r['seconds'] for r in rows['after, cold cache']):.1f} s after (cold), "
              f"{max(r['seconds'] for r in rows['after, warm cache']):.1f} s (warm). After, memory follows the "
              "consumed samples, not the file: every line is still parsed once to count and check it, and "
              "one int64 index per sample is kept for the split's permutation."]
    common.write_page(lines, args.out)


if __name__ == "__main__":
    main()
