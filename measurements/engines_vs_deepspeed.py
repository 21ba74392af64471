"""DeepSpeed's ZeRO beside PyTorch's own engines on the same job: ZeRO-3 vs FSDP2 and ZeRO-0 vs DDP, full
fine-tune and LoRA, repeats alternating the order, and a results page with the ratios measured in each repeat.

    python measurements/engines_vs_deepspeed.py [--repeats 3] [--steps 20] [--out docs/results/engines_cpu.md]
    python measurements/engines_vs_deepspeed.py --from_json docs/results/engines_cpu.json --out ...  (page only)

Each pair differs in the engine alone: the same ds_config keys (batch, optimizer, learning rate, clipping), data,
seed, launcher (torchrun) and processes (bench/strategies/torch_dp.py). Per run: the steady step time (median of
the measured steps, the slowest rank's), tokens/s, what rank 0 holds by kind (summary.json accounting: parameters,
gradients, optimizer states, one micro-batch's activations, counted from the tensors), the bytes it moves per step
(the collectives each engine issues, counted alike: bench/accounting.py), its peak RSS, and the last loss.
"""
import argparse
import os
import statistics
import sys
import tempfile

from common import REPO, add_page_args, harness, host_line, publish_page  # measurements/common.py, next to this script

JOB = ["--packing", "off", "--seq_len", "128", "--micro_batch_size", "2", "--global_batch_size", "8",
       "--eval_interval", "0", "--eval_batches", "1", "--lr", "1e-3", "--wandb_mode", "disabled"]
PEFTS = {"full": ["--peft", "none"], "lora": ["--peft", "lora", "--lr", "1e-2"]}
# pair -> (DeepSpeed's ds_config, PyTorch's)
PAIRS = {"ZeRO-3 vs FSDP2": ("dp_zero3", "fsdp2"), "ZeRO-0 vs DDP": ("dp_zero0", "ddp")}
KINDS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes")


def one(config: str, peft: str, steps: int, warmup: int, out: str) -> dict:
    args = [*JOB, *PEFTS[peft], "--ds_config", f"ds_configs/{config}.json", "--max_steps", str(steps),
            "--warmup_steps", str(warmup)]
    _, s, _ = harness(2, args, out)
    held = s["accounting"]["per_rank"][0]
    return {"step_s": s["step_time_s"]["median"], "tokens_per_s": s["tokens_per_s"],
            **{k: held[k] for k in KINDS}, "comm_bytes": sum((held["comm_bytes_per_step"] or {}).values()),
            "rss_mib": s["memory"]["per_rank"][0]["peak_rss_mib"], "loss": s["loss"]["last"]}


def page(opts, results: dict) -> list[str]:
    mib = 2 ** 20
    lines = ["# DeepSpeed's ZeRO beside PyTorch's FSDP2 and DDP on the same job (CPU)", "",
             f"Rerun: `python measurements/engines_vs_deepspeed.py --repeats {opts.repeats} --steps {opts.steps} "
             f"--out {opts.out}`", "", host_line(), "",
             f"Job: tiny LLaMA, fp32, padded rows of 128 tokens, micro-batch 2, global batch 8 (2 micro-batches per "
             f"step on each of 2 processes, torchrun), {opts.steps} steps ({opts.warmup} untimed), {opts.repeats} "
             "repeats in alternating order. Step time: median of the measured steps (slowest rank); the ratio "
             "DeepSpeed / PyTorch is taken within one repeat (above 1: PyTorch's engine is faster), then the median "
             "over repeats (min-max). Memory by kind: rank 0, counted from its tensors (summary.json accounting); "
             "bytes moved: rank 0's collectives in one step, counted alike for both engines (an all-gather by the "
             "shard it sends, a reduce-scatter by its whole input).", "",
             "| pair | peft | step ms DeepSpeed / PyTorch | ratio (min-max) | tokens/s DeepSpeed / PyTorch "
             "| params KiB | grads KiB | optimizer KiB | activations KiB | moved KiB/step | peak RSS MiB "
             "| last loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pair, pefts in results.items():
        for peft, (ds, pt) in pefts.items():
            ratios = [a["step_s"] / b["step_s"] for a, b in zip(ds, pt)]

            def med(rows, key, scale=1.0):
                return statistics.median(r[key] for r in rows) * scale

            def both(key, scale, fmt="{:.0f}"):
                return f"{fmt.format(med(ds, key, scale))} / {fmt.format(med(pt, key, scale))}"
            lines.append(
                f"| {pair} | {peft} | {both('step_s', 1e3, '{:.1f}')} | {statistics.median(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f}) | {both('tokens_per_s', 1)} | "
                + " | ".join(both(k, 1 / 1024) for k in (*KINDS, "comm_bytes"))
                + f" | {both('rss_mib', 1)} | {ds[0]['loss']:.4f} / {pt[0]['loss']:.4f} |")
    lines += ["", "Each cell is DeepSpeed / PyTorch. What differs by design: ZeRO-3 pads each parameter's partition "
              "to the world and keeps small parameters whole on every rank (on the tiny model every parameter but "
              "the embedding and head is under its 100,000-element threshold: more held, less gathered, than on "
              "an 8B model), FSDP2 pads each parameter's first dimension; DeepSpeed's ZeRO-0 all-reduces the "
              "gradients after backward, DDP in buckets during it; "
              "under LoRA ZeRO-3 keeps the adapters in fp32 and wraps every linear layer (its activations include "
              "the frozen layers' inputs). On this CPU the collectives run over gloo on one host; on GPUs NCCL "
              "and overlap decide more of the step, so the page a GPU gives (measurements/gpu_check.py) is the "
              "one to read for speed."]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    add_page_args(p)
    opts = p.parse_args()
    publish_page(opts, lambda: measure(opts), page)


def measure(opts) -> dict:
    results = {pair: {peft: ([], []) for peft in PEFTS} for pair in PAIRS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            for pair, configs in PAIRS.items():
                for peft in PEFTS:
                    for way in ((0, 1) if i % 2 == 0 else (1, 0)):
                        out = os.path.join(tmp, f"{i}-{configs[way]}-{peft}")
                        results[pair][peft][way].append(one(configs[way], peft, opts.steps, opts.warmup, out))
                        print(f"repeat {i} {configs[way]} {peft}: {results[pair][peft][way][-1]}", file=sys.stderr,
                              flush=True)
    return results


if __name__ == "__main__":
    os.chdir(REPO)
    main()
