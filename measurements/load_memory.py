"""What loading the model costs a rank's host memory under TP2, EP2, TP2 x EP2 and PP2, against the whole model:
a ~140M-parameter LLaMA and a ~150M-parameter Mixtral, random init and from a local safetensors checkpoint.

Two figures per run, each the largest over its ranks, minus the RSS just before the model was built (summary.json
memory.per_rank rss_before_model_mib; on the CPU host memory is the device): the RSS high-water mark once the
model is in place on its device (model_placed_peak_rss_mib: what loading cost), and at the end of the load phase
(phases.load.peak_rss_mib: deepspeed.initialize's process groups and optimizer too). The run is LoRA for two
steps. Older versions of the harness record only the second.

    python measurements/load_memory.py [--out docs/results/load_memory_cpu.md] [--cases tp2,ep2] [--inits random]
"""
import argparse
import json
import os
import shutil
import sys

import common

sys.path.insert(0, common.REPO)

# Shapes chosen so one decoder layer is a small share of the model (a rank's transient is one layer's tensors).
MODELS = {
    "llama-140m": ("tiny-llama", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                      num_attention_heads=16, num_key_value_heads=4)),
    "mixtral-150m": ("tiny-mixtral", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=16,
                                          num_attention_heads=8, num_key_value_heads=2, num_local_experts=8)),
}
CASES = {  # name: (model, strategy, ds_config, processes)
    "tp2": ("llama-140m", "tp", "ds_configs/tp2.json", 2),
    "pp2": ("llama-140m", "pp", "ds_configs/pp2.json", 2),
    "ep2": ("mixtral-150m", "ep", "ds_configs/ep2.json", 2),
    "tp2xep2": ("mixtral-150m", "tp_ep", "ds_configs/tp2_ep2.json", 4),
}
INITS = ("random", "pretrained")
LIMIT = 0.65  # what a rank may spend loading, as a share of the whole model's bytes


def checkpoint(name: str, root: str) -> str:
    """The model saved as a Hugging Face checkpoint (safetensors, the tiny preset's tokenizer), built once."""
    target = os.path.join(root, name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from bench import models
    preset, arch = MODELS[name]
    tiny = models.ensure_tiny(preset)
    config = models.make_config(models.Preset(models.PRESETS[preset].model_type, {**models.PRESETS[preset].arch,
                                                                                   **arch}))
    tok = AutoTokenizer.from_pretrained(tiny)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, \
        tok.pad_token_id
    torch.manual_seed(0)
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.rename(tmp, target)
    return target


def measure(case: str, init: str, root: str) -> dict:
    """One two-step LoRA run of `case` -> the load's host memory against the whole model."""
    model, strategy, ds_config, nprocs = CASES[case]
    out = os.path.join(root, "runs", f"{case}-{init}")
    shutil.rmtree(out, ignore_errors=True)
    args = ["--model", checkpoint(model, root), "--init", init, "--strategy", strategy, "--ds_config", ds_config,
            "--peft", "lora", "--seq_len", "32", "--micro_batch_size", "1", "--global_batch_size", "4",
            "--max_steps", "2", "--warmup_steps", "1", "--wandb_mode", "disabled"]
    _, summary, _ = common.harness(nprocs, args, out)
    from bench import estimate
    from bench.plan import plan_layout
    plan = plan_layout(args, nprocs)
    planned = max(estimate.load_bytes(plan, r)["device"] for r in range(nprocs)) / 2 ** 20
    ranks = summary["memory"]["per_rank"]
    whole = summary["params"]["before_peft"] * 4 / 2 ** 20  # fp32 on the CPU
    placed = [r.get("model_placed_peak_rss_mib") for r in ranks]
    placed = None if None in placed else max(p - r["rss_before_model_mib"] for p, r in zip(placed, ranks))
    phase = max(r["phases"]["load"]["peak_rss_mib"] - r["rss_before_model_mib"] for r in ranks)
    ratio = lambda mib: None if mib is None else round(mib / whole, 3)  # noqa: E731
    return {"case": case, "model": model, "init": init, "ranks": nprocs, "status": summary["status"],
            "whole_model_mib": round(whole, 1), "planned_mib": round(planned, 1),
            "placed_mib": placed and round(placed, 1), "placed": ratio(placed),
            "load_phase_mib": round(phase, 1), "load_phase": ratio(phase)}


def page(rows: list[dict], label: str) -> list[str]:
    lines = [f"# Host memory of loading the model per rank ({label})", "",
             f"`python measurements/load_memory.py` ({common.host_line()}). Per run, the largest over its ranks of "
             "the RSS high-water mark minus the RSS before the model is built: once the model is in place (placed) "
             "and at the end of deepspeed.initialize (load phase), in MiB and as a share of the whole model's fp32 "
             f"bytes; the limit for placed is {LIMIT} x. Planned: the planner's load peak of the busiest rank "
             "(bench/estimate.py load_bytes; on the CPU without the GPU allowance).", "",
             "| case | model | init | ranks | whole model MiB | planned MiB | placed MiB | placed x | load phase MiB "
             "| load phase x |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['model']} | {r['init']} | {r['ranks']} | {r['whole_model_mib']} | "
              f"{r.get('planned_mib')} | {r['placed_mib']} | {r['placed']} | {r['load_phase_mib']} | "
              f"{r['load_phase']} |" for r in rows]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "load_memory"))
    ap.add_argument("--label", default="after: each rank materializes its shard")
    ap.add_argument("--out")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--before", help="rows this script wrote (--json) at an earlier commit: shown first, for the "
                                     "comparison")
    ap.add_argument("--before_label", default="before")
    a = ap.parse_args(argv)
    rows = [measure(c, i, a.root) for c in a.cases.split(",") for i in a.inits.split(",")]
    lines = page(rows, a.label)
    if a.before:
        with open(a.before) as fh:
            lines += ["", f"## {a.before_label}", "", *page(json.load(fh), a.before_label)[4:]]
    common.write_page(lines, a.out)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
