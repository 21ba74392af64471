"""Packed rows: transformers' dense block-diagonal mask against the document path (bench/attention.py), at 2K,
8K and 32K tokens per row, one process; and Ulysses SP2 over a 32K row. Real harness runs (bench/run.py), tiny
LLaMA, fp32, no LoRA; each row packs samples of 512 tokens (a synthetic SQuAD file of long contexts, written
here), so a row of T tokens holds T / 512 documents.

    python measurements/packed_attention.py [--out docs/results/packed_attention_cpu.md]

Per run: the median step time over its measured steps, what the first micro-batch saved for backward
(summary.accounting, counted from the tensors) beside the planner's figure for it (summary.memory_plan), and the
process's peak RSS in training. Dense runs stop at 8K on this 24 GiB machine: the 32K row's dense mask is 1 GiB
as bool and 4 GiB per layer once SDPA converts it, so the planner's figure stands in for it.
"""
import argparse
import json
import os
import sys
import tempfile

from common import REPO, host_line, run, write_page  # measurements/common.py, next to this script

sys.path.insert(0, REPO)
from bench.distributed import free_port  # noqa: E402

SAMPLE = 512  # tokens per packed sample (--seq_len)
ROWS = (2048, 8192, 32768)
ARGS = ["--peft", "none", "--ds_config", "ds_configs/dp_zero1.json", "--seq_len", str(SAMPLE), "--packing", "on",
        "--max_steps", "4", "--warmup_steps", "2", "--eval_interval", "0", "--eval_batches", "1",
        "--wandb_mode", "disabled", "--val_fraction", "0.17"]


def long_samples(path: str, n: int = 420) -> None:
    """SQuAD-format data whose every sample is longer than SAMPLE tokens: each context joins 40 of the bundled
    sample's paragraphs (the prompt keeps its last SAMPLE tokens with the answer)."""
    from bench.data import make_squad_sample
    base = make_squad_sample(n_articles=n + 40)["data"]
    articles = []
    for i in range(n):
        context = " ".join(a["paragraphs"][0]["context"] for a in base[i:i + 40])
        qa = dict(base[i]["paragraphs"][0]["qas"][0])
        answer = qa["answers"][0]["text"]
        qa["answers"] = [{"text": answer, "answer_start": context.index(answer)}]
        articles.append({"title": base[i]["title"], "paragraphs": [{"context": context, "qas": [qa]}]})
    with open(path, "w") as fh:
        json.dump({"version": "1.1", "data": articles}, fh)


def bench_run(out_dir: str, data: str, tokens: int, mask: str, sp: int = 1) -> dict:
    micro = tokens // SAMPLE
    args = [*ARGS, "--data", data, "--micro_batch_size", str(micro), "--global_batch_size", str(micro),
            "--attn_mask", mask, "--output_dir", out_dir]
    if sp > 1:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(sp), "--master_port",
               str(free_port()), "bench/run.py", "--strategy", "sp", *args, "--ds_config", f"ds_configs/sp{sp}.json"]
    else:
        cmd = [sys.executable, "bench/run.py", *args]
    run(cmd)
    (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir)]
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


def planned_activations(data: str, tokens: int, mask: str) -> int:
    """The planner's saved-for-backward bytes for one such row (what bench-plan predicts before a launch)."""
    from bench import estimate
    from bench.plan import plan_layout
    micro = tokens // SAMPLE
    plan = plan_layout([*ARGS, "--data", data, "--micro_batch_size", str(micro), "--global_batch_size", str(micro),
                        "--attn_mask", mask], 1)
    return estimate.activation_bytes(plan, 0, 1, tokens)["activation_bytes"]


def row(label: str, tokens: int, s: dict | None, planned: int) -> str:
    if s is None:
        return f"| {label} | {tokens // 1024}K | not run | | {planned / 2**20:.0f} (planned) | |"
    acc = s["accounting"]["per_rank"][0]["activation_bytes"]
    peak = max(r["peak_rss_mib"] for r in s["memory"]["per_rank"])
    plan = s["memory_plan"]["per_rank"][0]["activation_bytes"] if s.get("memory_plan") else planned
    return (f"| {label} | {tokens // 1024}K | {s['step_time_s']['median']:.3f} | {s['attention']['kernel']}, "
            f"{s['attention']['mask']} | {acc / 2**20:.1f} ({plan / 2**20:.1f}) | {peak:.0f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    opts = p.parse_args()
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "long.json")
        long_samples(data)
        for tokens in ROWS:
            results = {}
            for mask in ("dense", "auto"):
                if mask == "dense" and tokens > 8192:
                    results[mask] = None
                else:
                    results[mask] = bench_run(os.path.join(tmp, f"{tokens}-{mask}"), data, tokens, mask)
                    print(f"{tokens} {mask}: {results[mask]['step_time_s']['median']:.3f} s", flush=True)
            for mask, label in (("dense", "dense mask (`--attn_mask dense`)"), ("auto", "documents (default)")):
                rows.append(row(label, tokens, results[mask], planned_activations(data, tokens, mask)))
            if results["dense"] is not None:
                d, a = results["dense"], results["auto"]
                ratios.append((tokens, d["step_time_s"]["median"] / a["step_time_s"]["median"],
                               d["accounting"]["per_rank"][0]["activation_bytes"]
                               / a["accounting"]["per_rank"][0]["activation_bytes"]))
        sp = bench_run(os.path.join(tmp, "sp2"), data, 32768, "auto", sp=2)
        print(f"sp2 32768: {sp['step_time_s']['median']:.3f} s", flush=True)
        rows.append(row("SP2 (`ds_configs/sp2.json`, 2 processes), documents", 32768, sp, 0))
    lines = [
        "# Packed rows: dense mask vs the document path (CPU)", "",
        f"- command: `python measurements/packed_attention.py{' --out ' + opts.out if opts.out else ''}`",
        f"- {host_line()}",
        f"- job: tiny-llama, fp32, `--peft none`, ZeRO-1, one packed row per step of T / {SAMPLE} samples of "
        f"{SAMPLE} tokens, 4 steps (2 measured); SP2: ZeRO-3, each rank a 16K slice, attention over the gathered "
        "32K row", "",
        "| attention | row | median step s | kernel, mask | saved for backward MiB, counted (planned) | "
        "peak RSS MiB |",
        "|---|---|---|---|---|---|", *rows, "",
        "Dense over documents, in the same run: " + "; ".join(
            f"{t // 1024}K: step time **{r:.1f}x**, saved activations **{m:.1f}x**" for t, r, m in ratios) + ".", "",
        "The dense mask grows as T^2 (SDPA keeps the [1, 1, T, T] mask, converted to the query's dtype, for "
        "backward in every layer); the document path keeps nothing that grows faster than T. On CUDA the document "
        "path is torch's `varlen_attn` (flash kernels), not run here: no GPU.",
    ]
    write_page(lines, opts.out)


if __name__ == "__main__":
    main()
