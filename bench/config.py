"""Typed run configuration: CLI > ds_config > defaults, "auto" resolution and layout validation.

Every field of RunConfig is a command-line flag (its docstring is the --help text), so the CLI, the
recorded config.json and the defaults cannot drift apart.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields


class BenchError(Exception):
    """Bad input or an impossible configuration: reported as one line, non-zero exit, no traceback."""


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RunConfig:
    strategy: str | None = _f(None, "parallelism strategy: derived from the ds_config's layout "
                                    "(bench/strategies strategy_of); given, it must agree")
    ds_config: str = _f("ds_configs/dp_zero2.json", "DeepSpeed config JSON; 'auto' fields are resolved")
    model: str = _f("tiny-llama", "preset name (see bench/models.py), local checkpoint directory or hub id")
    init: str = _f("pretrained", "pretrained: load weights; random: benchmark the architecture without weights",
                   choices=("pretrained", "random"))
    data: str = _f("squad-sample", "squad-sample, a SQuAD v1.1 JSON, a .jsonl with a text field, a .txt, "
                   "or a datasets hub name")
    peft: str = _f("auto", "lora or none; auto = the strategy's default (LoRA for ZeRO data parallel)",
                   choices=("auto", "lora", "none"))
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj", "comma-separated module names LoRA wraps")
    attn_implementation: str = _f("sdpa", "Hugging Face attention kernel (sdpa and flash attention keep no score "
                                  "matrix, eager keeps its softmax per layer, planned; sequence parallelism refuses "
                                  "eager)",
                                  choices=("sdpa", "eager", "flash_attention_2", "flash_attention_3"))
    attn_mask: str = _f("auto", "auto: padded rows pass no mask (causal) and packed rows attend within each sample "
                        "through the document boundaries the collator computes (varlen flash attention on CUDA, one "
                        "SDPA call per sample elsewhere), never a T x T mask; dense: transformers' dense masks (the "
                        "padding mask, the packed rows' block-diagonal mask), for comparison (bench/attention.py)",
                        choices=("auto", "dense"))
    activation_checkpointing: bool = _f(False, "recompute each decoder layer's activations in backward instead of "
                                        "keeping them (Hugging Face gradient checkpointing, non-reentrant)")
    tiled_mlp: bool = _f(False, "--strategy sp: DeepSpeed's TiledMLP, each MLP computed over slices of the "
                         "sequence and recomputed in backward (less activation memory for long sequences; dense MLPs)")
    tiled_loss: bool = _f(False, "--strategy sp: DeepSpeed's TiledFusedLogitsLoss, the LM head and loss over slices "
                          "of the sequence, never the whole logits")
    device: str = _f(None, "auto: the GPUs where torch sees them, refused where GPUs are expected but torch has no "
                     "CUDA; cuda: refuse without CUDA; cpu: run on the CPU on purpose (default: $BENCH_DEVICE, else "
                     "auto)", choices=("auto", "cuda", "cpu"))
    precision: str = _f("auto", "bf16: bf16 weights and activations (fp32 master weights under ZeRO); fp32; auto: "
                        "bf16 where the GPU supports it, fp32 on the CPU, or what the ds_config sets explicitly "
                        "(CLI > ds_config)", choices=("auto", "bf16", "fp32"))
    ignore_memory_plan: bool = _f(False, "on a GPU, run even when the planner predicts the layout will not fit "
                                  "(bench/estimate.py; docs/planner.md)")
    max_steps: int = _f(20, "optimizer steps to run")
    seq_len: int = _f(256, "the most tokens a sample keeps (longer prompts lose their start)")
    packing: str = _f("auto", "on: each micro-batch's samples concatenated into one row, attention confined to each "
                      "sample (no padding computed); off: one padded row per sample; auto: on for QA data unless "
                      "--padding longest (text data is cut into full rows already)", choices=("auto", "on", "off"))
    padding: str = _f("max", "with packing off: pad each row to --seq_len (max) or to the micro-batch's longest "
                      "sample rounded up to 64 (longest)", choices=("max", "longest"))
    micro_batch_size: int = _f(None, "samples per rank per forward (default: ds_config, else 2)")
    global_batch_size: int = _f(None, "samples per optimizer step (default: ds_config, else micro x DP)")
    lr: float = _f(None, "learning rate (default: ds_config, else 3e-4)")
    warmup_steps: int = _f(2, "steps excluded from timing statistics (not an LR warm-up)")
    eval_interval: int = _f(10, "steps between validation passes (0: only at the end)")
    eval_batches: int = _f(8, "validation micro-batches per evaluation, split across DP ranks")
    val_fraction: float = _f(0.1, "fraction of the data held out for val_loss")
    target_loss: float = _f(None, "train loss that defines time_to_target_s (statistical efficiency)")
    seed: int = _f(42, "seed for data order, random init and LoRA init")
    output_dir: str = _f("runs", "parent directory of run directories")
    run_name: str = _f(None, "run directory name (default: model-strategy-wN-timestamp)")
    wandb_mode: str = _f(None, "W&B mode (default: $WANDB_MODE, else offline)",
                         choices=("online", "offline", "disabled"))
    wandb_project: str = _f("ds-parallel-bench", "W&B project")
    wandb_group: str = _f(None, "W&B group (default: the model name)")
    dry_run: bool = _f(False, "resolve and validate everything, print the configuration, exit")
    world_size: int = _f(None, "with --dry_run: plan the layout for this many processes from this one (no process "
                         "group); a launch takes its world size from the launcher")
    peak_tflops: float = _f(None, "device peak TFLOP/s for MFU (default: known bf16 dense peak of the GPU)")
    log_interval: int = _f(1, "console line and W&B record every N steps (metrics.jsonl gets every step)")
    log_level: str = _f("info", "how much the harness says (bench/log.py): debug, info, note, warning or error; the "
                        "configuration and result tables and the step lines are shown at every level",
                        choices=("debug", "info", "note", "warning", "error"))
    log_ranks: str = _f("0", "which ranks' messages are shown: 0 (rank 0's; every rank's errors) or all (each line "
                        "tagged [rank N]), for debugging", choices=("0", "all"))
    monitor_interval_s: float = _f(1.0, "device monitor sampling period in seconds")
    dist_timeout_s: int = _f(600, "collective timeout: a dead rank makes the others fail after this long")
    hang_timeout_s: float = _f(None, "the run is hung when no training step completes for this long: every rank's "
                               "Python stack goes to the run directory, the run is recorded failed, every rank exits "
                               "(default: max(10 x the median step, 300 s), the 300 s floor kept under 0.8 x "
                               "--dist_timeout_s; evaluations and checkpoint saves are not counted)")
    save_interval: int = _f(0, "checkpoint every N steps, and when preempted (0: no checkpoints)")
    checkpoint_dir: str = _f(None, "where checkpoints go (default: <run dir>/checkpoints)")
    resume: str = _f("none", "auto: continue the run named --run_name from its newest complete checkpoint",
                     choices=("none", "auto"))

    def to_dict(self) -> dict:
        return asdict(self)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise BenchError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bench/run.py", description="Fine-tune under one parallelism strategy and record what it costs.")
    for f in fields(RunConfig):
        kw = {"default": f.default, "help": f.metadata["help"]}
        if f.type == "bool":
            kw["action"] = "store_true"
        else:
            kw["type"] = {"int": int, "float": float}.get(f.type, str)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        p.add_argument(f"--{f.name}", **kw)
    # Launchers (deepspeed, torch.distributed.launch) append this; the rank comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> RunConfig:
    ns = vars(build_parser().parse_args(argv))
    ns.pop("local_rank", None)
    # the two read from the environment, resolved here: the configuration is never written to afterwards
    if ns["device"] is None:
        ns["device"] = os.environ.get("BENCH_DEVICE") or "auto"
        if ns["device"] not in ("auto", "cuda", "cpu"):
            raise BenchError(f"BENCH_DEVICE={ns['device']!r} is not one of auto, cuda, cpu")
    if ns["wandb_mode"] is None:
        ns["wandb_mode"] = os.environ.get("WANDB_MODE", "offline")
        if ns["wandb_mode"] not in ("online", "offline", "disabled"):
            raise BenchError(f"WANDB_MODE={ns['wandb_mode']!r} is not one of online, offline, disabled")
    cfg = RunConfig(**ns)
    for name in ("max_steps", "seq_len", "micro_batch_size", "global_batch_size", "lora_r", "lora_alpha",
                 "eval_batches", "log_interval", "world_size"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise BenchError(f"--{name} must be positive, got {value}")
    for name in ("lr", "monitor_interval_s", "peak_tflops", "dist_timeout_s", "hang_timeout_s"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise BenchError(f"--{name} must be positive, got {value}")
    if cfg.warmup_steps < 0 or cfg.eval_interval < 0 or cfg.save_interval < 0:
        raise BenchError("--warmup_steps, --eval_interval and --save_interval must be >= 0")
    if cfg.packing == "on" and cfg.padding == "longest":
        raise BenchError("--padding longest pads unpacked rows; with --packing on nothing is padded but the row's "
                         "end: drop one of them")
    if cfg.world_size is not None and not cfg.dry_run:
        raise BenchError(f"--world_size only plans a layout with --dry_run; to run {cfg.world_size} processes, "
                         f"launch them: deepspeed --num_gpus {cfg.world_size} bench/run.py ...")
    if cfg.resume == "auto" and not cfg.run_name:
        raise BenchError("--resume auto needs --run_name, so that a restarted job finds its own run directory "
                         "(the SLURM scripts pass <job name>-<job id>)")
    if cfg.checkpoint_dir and os.path.exists(cfg.checkpoint_dir) and not os.path.isdir(cfg.checkpoint_dir):
        raise BenchError(f"--checkpoint_dir {cfg.checkpoint_dir} exists and is not a directory")
    if cfg.warmup_steps >= cfg.max_steps:
        raise BenchError(f"--max_steps ({cfg.max_steps}) must exceed --warmup_steps ({cfg.warmup_steps}), "
                         "otherwise no step is measured")
    if not 0 < cfg.val_fraction < 1:
        raise BenchError(f"--val_fraction must be in (0, 1), got {cfg.val_fraction}")
    return cfg


def zero_stage(ds: dict) -> int:
    """The ZeRO stage a ds_config asks for (0 when it has no zero_optimization section)."""
    return (ds.get("zero_optimization") or {}).get("stage", 0)


def offloaded(ds: dict) -> list[str]:
    """What a ds_config's ZeRO offloads to host memory: "optimizer" and/or "param"."""
    zero = ds.get("zero_optimization") or {}
    for kind in ("optimizer", "param"):
        if not isinstance(zero.get(f"offload_{kind}") or {}, dict):
            raise BenchError(f"zero_optimization.offload_{kind} must be an object such as {{\"device\": \"cpu\"}}, "
                             f"got {zero[f'offload_{kind}']!r}")
    return [kind for kind in ("optimizer", "param")
            if (zero.get(f"offload_{kind}") or {}).get("device", "none") not in ("none", None)]


def load_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise BenchError(f"ds_config not found: {path} (see ds_configs/ for the shipped layouts)")
    with open(path) as fh:
        text = fh.read()
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(ds, dict):
        raise BenchError(f"{path}: top level must be a JSON object, got {type(ds).__name__}")
    return ds


@dataclass
class Batch:
    micro: int
    grad_accum: int
    global_: int


def resolve_batch(cfg: RunConfig, ds: dict, dp: int) -> Batch:
    """CLI > ds_config > defaults; returns sizes satisfying global = micro * grad_accum * dp, where dp is the
    number of data-parallel streams (Layout.data_parallel)."""
    def ds_int(key):
        v = ds.get(key, "auto")
        if v == "auto" or v is None:
            return None
        if not isinstance(v, int) or v <= 0:
            raise BenchError(f"ds_config {key} must be a positive integer or \"auto\", got {v!r}")
        return v

    micro = cfg.micro_batch_size or ds_int("train_micro_batch_size_per_gpu") or 2
    glob = cfg.global_batch_size or ds_int("train_batch_size")
    if glob is None:
        accum = ds_int("gradient_accumulation_steps") or 1
        glob = micro * accum * dp
    if glob % (micro * dp):
        raise BenchError(f"global batch {glob} is not divisible by micro batch {micro} x DP {dp} = {micro * dp}; "
                         f"pick a global batch that is a multiple of {micro * dp}")
    return Batch(micro=micro, grad_accum=glob // (micro * dp), global_=glob)


def resolve_ds_config(cfg: RunConfig, ds: dict, batch: Batch, device_type: str, bf16_ok: bool) -> dict:
    """Fill every "auto" and the CLI overrides; what this returns is what DeepSpeed gets and what is recorded."""
    ds = copy.deepcopy(ds)
    ds["train_micro_batch_size_per_gpu"] = batch.micro
    ds["gradient_accumulation_steps"] = batch.grad_accum
    # DeepSpeed derives train_batch_size as micro x accum x its world size, which under AutoTP is every rank,
    # not the data-parallel ones; left out, it cannot contradict the real global batch (config.json "batch").
    ds.pop("train_batch_size", None)
    for key, supported in (("bf16", bf16_ok), ("fp16", False)):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = supported
    _apply_precision(cfg.precision, ds, device_type, bf16_ok)
    if (ds.get("fp16") or {}).get("enabled") is True and device_type == "cpu":
        raise BenchError("fp16 is enabled in the ds_config but the CPU has no fp16 training path; "
                         "set \"fp16\": {\"enabled\": \"auto\"} or false")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    if cfg.lr is not None or params.get("lr", "auto") == "auto":
        params["lr"] = cfg.lr if cfg.lr is not None else 3e-4
    resolve_optimizer(params, ds)
    # The harness logs to W&B itself; DeepSpeed's monitor would open a second run per rank.
    for monitor in ("wandb", "tensorboard", "csv_monitor", "comet"):
        if (ds.get(monitor) or {}).get("enabled"):
            ds[monitor]["enabled"] = False
    ds.setdefault("steps_per_print", 10 ** 9)  # silence DeepSpeed's own step log; the harness prints its own
    ds.setdefault("wall_clock_breakdown", False)
    remaining = _find_auto(ds)
    if remaining:
        raise BenchError(f"ds_config field {remaining} is \"auto\" but the harness cannot resolve it; set a value")
    return ds


def resolve_optimizer(params: dict, ds: dict) -> None:
    """torch_adam "auto": torch's AdamW with fused=True (one kernel per parameter group on GPUs and CPUs, nothing
    to compile; DeepSpeed passes the remaining params to it: engine.py, get_optimizer_configuration), except under
    ZeRO offload, whose optimizer is DeepSpeed's CPU Adam wherever it runs (built by install.sh)."""
    if params.get("torch_adam") != "auto":
        return
    params["torch_adam"] = not offloaded(ds)
    if params["torch_adam"] and "foreach" not in params:
        params.setdefault("fused", True)


def _apply_precision(precision: str, ds: dict, device_type: str, bf16_ok: bool) -> None:
    """--precision over the ds_config. bf16_ok says whether "auto" turns bf16 on (a GPU with bf16); asked for
    explicitly, bf16 also runs on the CPU (DeepSpeed's CPU accelerator supports it, is_bf16_supported)."""
    if precision == "auto":
        return
    if precision == "bf16" and device_type == "cuda" and not bf16_ok:
        raise BenchError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
    if ds.get("fp16"):  # one half precision at a time; fp32 has none
        ds["fp16"]["enabled"] = False
    if precision == "bf16" or ds.get("bf16"):
        ds.setdefault("bf16", {})["enabled"] = precision == "bf16"


def precision_of(ds: dict) -> str:
    """"bf16" | "fp16" | "fp32": what the resolved ds_config trains in (recorded as summary.precision)."""
    for key in ("bf16", "fp16"):
        if (ds.get(key) or {}).get("enabled"):
            return key
    return "fp32"


def _find_auto(node, path=""):
    if node == "auto":
        return path or "<root>"
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        found = _find_auto(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def format_table(rows: list[tuple[str, object]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
