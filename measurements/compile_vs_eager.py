"""Each strategy eager and compiled (--compile on, inductor) on the same job, repeats alternating the order, and
a results page with the steady step-time ratio, the start-up compiling costs and memory.

    python measurements/compile_vs_eager.py [--repeats 3] [--steps 20] [--out docs/results/compile_cpu.md]
    python measurements/compile_vs_eager.py --from_json docs/results/compile_cpu.json --out ...  (page only)

Same job for every strategy of a model: padded rows (one shape, so one compile), sequence 128, micro-batch 2,
full fine-tune, fp32 on the CPU. Per strategy and way: the steady step time (median of the measured steps, the
slowest rank's, bench/metrics.py), the ratio eager / compiled measured in the same repeat, time to first step,
compile time (summary.json compile.compile_s) and whether inductor's cache was warm, graphs and graph breaks,
and rank 0's peak RSS. The first compiled repeat of a strategy may start cold; later ones start warm.
"""
import argparse
import os
import statistics
import sys
import tempfile

from common import REPO, add_page_args, harness, host_line, publish_page  # measurements/common.py, next to this script

JOB = ["--peft", "none", "--packing", "off", "--seq_len", "128", "--micro_batch_size", "2", "--eval_interval", "0",
       "--eval_batches", "1", "--lr", "1e-3", "--wandb_mode", "disabled"]
# name -> (arguments, processes); tensor parallelism refuses --compile on on the CPU (bench/strategies/autotp.py)
STRATEGIES = {
    "dp zero2": (["--ds_config", "ds_configs/dp_zero2.json", "--global_batch_size", "4"], 2),
    "dp zero3": (["--ds_config", "ds_configs/dp_zero3.json", "--global_batch_size", "4"], 2),
    "sp2 (zero3)": (["--ds_config", "ds_configs/sp2.json", "--global_batch_size", "2"], 2),
    "pp2": (["--ds_config", "ds_configs/pp2.json", "--global_batch_size", "2"], 2),
    "ep2 (Mixtral)": (["--ds_config", "ds_configs/ep2.json", "--model", "tiny-mixtral", "--global_batch_size", "4"],
                      2),
    "dp zero2 (Mixtral)": (["--ds_config", "ds_configs/dp_zero2.json", "--model", "tiny-mixtral",
                            "--global_batch_size", "4"], 2),
}
WAYS = ("eager", "compiled")


def one(name: str, way: str, steps: int, warmup: int, out: str) -> dict:
    args, nprocs = STRATEGIES[name]
    extra = ["--compile", "on"] if way == "compiled" else []
    _, s, _ = harness(nprocs, [*JOB, *args, *extra, "--max_steps", str(steps), "--warmup_steps", str(warmup)], out)
    c = s.get("compile") or {}
    rss = s["memory"]["per_rank"][0].get("peak_rss_mib")
    return {"step_s": s["step_time_s"]["median"], "first_step_s": s["time_to_first_step_s"],
            "compile_s": c.get("compile_s"), "warm": (c.get("cache") or {}).get("warm"),
            "graphs": c.get("graphs"), "breaks": c.get("graph_breaks"),
            "recompiled": len(c.get("recompiled_steps") or []), "rss_mib": rss,
            "loss": s["loss"]["last"]}


def page(opts, results: dict) -> list[str]:
    lines = ["# torch.compile against eager, per strategy (CPU)", "",
             f"Rerun: `python measurements/compile_vs_eager.py --repeats {opts.repeats} --steps {opts.steps} "
             f"--out {opts.out}`", "", host_line(), "",
             f"Job: tiny models, fp32, padded rows of 128 tokens, micro-batch 2, {opts.steps} steps ({opts.warmup} "
             "untimed), 2 processes; compiled = `--compile on` (DeepSpeed `engine.compile()`, inductor). Step time: "
             "median of the measured steps (slowest rank); ratio = eager / compiled within one repeat (above 1: "
             "compiled is faster), then the median over repeats.", "",
             "| strategy | eager step ms | compiled step ms | speed-up (min-max) | first step s eager / compiled "
             "| compile s (cold, warm) | graphs / breaks | peak RSS MiB eager / compiled "
             "| last loss eager / compiled |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, reps in results.items():
        e, c = reps["eager"], reps["compiled"]
        ratios = [a["step_s"] / b["step_s"] for a, b in zip(e, c)]
        cold = [r["compile_s"] for r in c if not r["warm"]]
        warm = [r["compile_s"] for r in c if r["warm"]]

        def med(rows, key, scale=1.0):
            return statistics.median(r[key] for r in rows) * scale
        lines.append(
            f"| {name} | {med(e, 'step_s', 1e3):.1f} | {med(c, 'step_s', 1e3):.1f} | {statistics.median(ratios):.2f}"
            f" ({min(ratios):.2f}-{max(ratios):.2f}) | {med(e, 'first_step_s'):.1f} / {med(c, 'first_step_s'):.1f} "
            f"| {', '.join(f'{x:.0f}' for x in cold) or '-'}; {', '.join(f'{x:.0f}' for x in warm) or '-'} "
            f"| {c[0]['graphs']} / {c[0]['breaks']} | {med(e, 'rss_mib'):.0f} / {med(c, 'rss_mib'):.0f} "
            f"| {e[0]['loss']:.4f} / {c[0]['loss']:.4f} |")
    lines += ["", "What the planner and cost model do with it: nothing. They predict eager memory and time "
              "(docs/planner.md); the table above is the measured difference on this machine.", "",
              "Not in the table: TP and TP x EP refuse --compile on on the CPU (step 1 never completes: while dynamo "
              "traces AutoTP's all-reduce layers a rank waits in a collective the others never join, with inductor "
              "and aot_eager alike); DeepCompile needs CUDA. EP compiles around its experts (DeepSpeed's "
              "compile.autoep_non_moe): a full compile through the experts' torch._grouped_mm fails in fp32 "
              "(no fp32 kernel for dynamo's fake tensors)."]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated strategy names (default: all)")
    add_page_args(p)
    opts = p.parse_args()
    publish_page(opts, lambda: measure(opts), page)


def measure(opts) -> dict:
    names = opts.only.split(",") if opts.only else list(STRATEGIES)
    results = {n: {w: [] for w in WAYS} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            for n in names:
                for way in (WAYS if i % 2 == 0 else WAYS[::-1]):
                    out = os.path.join(tmp, f"{i}-{n.replace(' ', '_')}-{way}")
                    results[n][way].append(one(n, way, opts.steps, opts.warmup, out))
                    print(f"repeat {i} {n} {way}: {results[n][way][-1]}", file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    os.chdir(REPO)
    main()
