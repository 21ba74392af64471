"""Typed run configuration: one frozen, nested RunConfig built from the command line once and checked there
(the ds_config's "auto" fields are resolved from it in bench/ds_config.py).

Each section field is a command-line flag (`--<field>`, or the `flag` its metadata names); its help is the
--help text and the README's flag table (`python -m bench.config --readme`), and config.json records the
sections as they are, so the CLI, the README, the record and the defaults cannot drift apart.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field, fields

from bench.log import note


class BenchError(Exception):
    """Bad input or an impossible configuration: reported as one line, non-zero exit, no traceback."""


def _f(default, shown: str, help: str, flag: str | None = None, **kw):
    """One flag: its default, the default as the README shows it, its help (markdown), the flag's name where it
    is not the field's, argparse's choices."""
    return field(default=default, metadata={"shown": shown, "help": help, "flag": flag, **kw})


@dataclass(frozen=True)
class ModelConfig:
    """what is trained: the checkpoint, its precision and attention, the adapters"""
    name: str = _f("tiny-llama", "`tiny-llama`",
        "preset name, local checkpoint directory or hub id", flag="model")
    init: str = _f("pretrained", "`pretrained`",
        "`pretrained` loads weights; `random` benchmarks the architecture without weights",
        choices=("pretrained", "random"))
    precision: str = _f("auto", "`auto`",
        "`bf16` or `fp32`, over the ds_config; `auto`: bf16 where the GPU supports it, fp32 on the CPU (bf16 runs"
        " on the CPU when asked: the bf16 parity suite does). Recorded as `precision` and `dtypes` in "
        "summary.json", choices=("auto", "bf16", "fp32"))
    peft: str = _f("auto", "`auto`",
        "`lora` or `none`; `auto` = the strategy's default (LoRA for ZeRO data parallel)",
        choices=("auto", "lora", "none"))
    lora_r: int = _f(8, "`8`",
        "LoRA rank")
    lora_alpha: int = _f(16, "`16`",
        "LoRA alpha (dropout is 0 so runs are comparable)")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj", "`q_proj,k_proj,v_proj,o_proj`",
        "modules LoRA wraps (checked against the architecture before start)")
    attn_implementation: str = _f("sdpa", "`sdpa`",
        "Hugging Face attention kernel: `sdpa`, `eager`, `flash_attention_2`, `flash_attention_3` (sdpa and flash"
        " attention keep no score matrix; eager keeps the fp32 softmax and, in bf16, its bf16 copy (`(4 + w) b "
        "heads s^2 / tp` bytes per layer and rank; one fp32 tensor in fp32), and the planner counts them; "
        "`--strategy sp` refuses eager; flash attention without its package installed, or off a GPU, is refused "
        "before anything starts)", choices=("sdpa", "eager", "flash_attention_2", "flash_attention_3"))
    attn_mask: str = _f("auto", "`auto`",
        "`auto`: one attention path per batching for every strategy — padded rows pass no mask (causal SDPA: "
        "flash on a GPU), packed rows attend within each sample through the document offsets the collator "
        "computes once per micro-batch (`torch.nn.attention.varlen.varlen_attn` on CUDA, one causal SDPA call per"
        " sample elsewhere), never a T x T mask; `dense`: transformers' dense masks (the padding mask; the packed"
        " rows' block-diagonal mask), kept for comparison. `summary.json[\"attention\"]` records the kernel and "
        "mask kind that ran (bench/attention.py)", choices=("auto", "dense"))
    activation_checkpointing: bool = _f(False, "off",
        "recompute each decoder layer's activations in backward (Hugging Face gradient checkpointing, "
        "non-reentrant; pipeline stages too): less activation memory (`accounting.activation_bytes`) for more "
        "compute; same loss and gradients (tested)")


@dataclass(frozen=True)
class DataConfig:
    """what it is trained on and how samples become rows"""
    source: str = _f("squad-sample", "`squad-sample`",
        "`squad-sample`, a SQuAD v1.1 JSON, a `.jsonl` (a `text` field, or QA lines: `prompt` and `answer`, or "
        "SQuAD's `context`, `question` and `answers`), a `.txt`, or a datasets hub name (streamed). A run "
        "tokenizes only what it consumes (`--max_steps` global batches and the evaluated validation samples), "
        "once per node: local rank 0 writes it to `$BENCH_DATA_CACHE` (default `$BENCH_CACHE/tokenized`) and "
        "every rank maps that file; text and hub streams are read up to what the run needs "
        "(docs/results/data_scaling_cpu.md)", flag="data")
    seq_len: int = _f(256, "`256`",
        "the most tokens a sample keeps (longer prompts lose their start; text is cut into rows of this many)")
    packing: str = _f("auto", "`auto`",
        "`on`: each micro-batch's samples concatenated into one row, `position_ids` restarting per sample, "
        "attention confined to each sample, so no padding is computed (transformers' DataCollatorWithFlattening, "
        "TRL's padding-free batches); `off`: one padded row per sample; `auto`: on for QA data unless `--padding "
        "longest`. Set `--micro_batch_size` to about `seq_len / mean sample length` to fill a row as NeMo's "
        "packed sequences do. Same loss and gradients as the padded run of the same samples under every strategy "
        "(tests/integration/test_packing_parity.py)", choices=("auto", "on", "off"))
    padding: str = _f("max", "`max`",
        "with packing off: pad each row to `--seq_len` (`max`) or to the micro-batch's longest sample rounded up "
        "to 64 (`longest`)", choices=("max", "longest"))
    val_fraction: float = _f(0.1, "`0.1`",
        "fraction of the data held out for `val_loss`")


@dataclass(frozen=True)
class ParallelismConfig:
    """how the work is split over ranks: the ds_config's layout, and the flags that need a dimension"""
    ds_config: str = _f("ds_configs/dp_zero2.json", "`ds_configs/dp_zero2.json`",
        "DeepSpeed config JSON; `\"auto\"` fields are resolved")
    strategy: str | None = _f(None, "the ds_config's",
        "parallelism strategy: derived from the ds_config's layout (`strategy_of`: the strategy made of the "
        "fewest dimensions among those made of every dimension the layout turns on: pipeline stages make `pp`, or"
        " `hybrid` with data parallelism beside them; TP with EP `tp_ep`; `sequence_parallel_size` `sp`, AutoEP "
        "folded over it or not; then `tp`, `ep`, else `dp`). Given, it must be that name: any other refuses in "
        "one line")
    world_size: int = _f(None, "the launcher's",
        "with `--dry_run`: plan the layout for this many processes from one")
    tiled_mlp: bool = _f(False, "off",
        "`--strategy sp`: DeepSpeed's TiledMLP (ALST): each dense MLP runs over slices of the sequence and is "
        "recomputed in backward, so its intermediates are never kept (same loss and gradients, tested)")
    tiled_loss: bool = _f(False, "off",
        "`--strategy sp`: DeepSpeed's TiledFusedLogitsLoss: LM head and cross-entropy slice by slice, the whole "
        "logits never made (same loss and gradients, tested)")


@dataclass(frozen=True)
class OptimizerConfig:
    """the optimizer's settings the command line overrides (the rest is the ds_config's)"""
    lr: float = _f(None, "ds_config, else 3e-4",
        "learning rate (constant unless the ds_config has a scheduler)")


@dataclass(frozen=True)
class TrainingConfig:
    """the loop: how long, what batch, what is measured, where it runs and when it gives up"""
    max_steps: int = _f(20, "`20`",
        "optimizer steps")
    micro_batch_size: int = _f(None, "ds_config, else 2",
        "samples per rank per forward")
    global_batch_size: int = _f(None, "ds_config, else micro x DP",
        "samples per optimizer step; must be a multiple of micro x DP")
    warmup_steps: int = _f(2, "`2`",
        "steps excluded from timing statistics (not an LR warm-up)")
    eval_interval: int = _f(10, "`10`",
        "steps between validation passes (0: only at the end; there is always one at the end)")
    eval_batches: int = _f(8, "`8`",
        "validation micro-batches per evaluation, split across DP ranks")
    target_loss: float = _f(None, "none",
        "train loss that defines `time_to_target_s`")
    seed: int = _f(42, "`42`",
        "data order, random init, LoRA init")
    device: str = _f(None, "`$BENCH_DEVICE`, else `auto`",
        "`auto`: the GPUs when torch sees them, and a one-line refusal when GPUs are expected "
        "(`CUDA_VISIBLE_DEVICES`, SLURM's GPU variables, `nvidia-smi`) but torch has no CUDA (a CPU wheel, or a "
        "CUDA wheel newer than the driver) instead of DeepSpeed's silent fall-back to the CPU; `cuda`: refuse "
        "without CUDA; `cpu`: run on the CPU on purpose", choices=("auto", "cuda", "cpu"))
    dry_run: bool = _f(False, "off",
        "resolve and validate, print the configuration and memory-plan tables, exit 0")
    ignore_memory_plan: bool = _f(False, "off",
        "on a GPU, run a layout the planner predicts will not fit")
    dist_timeout_s: int = _f(600, "`600`",
        "collective timeout: peers of a dead rank give up after this long")
    hang_timeout_s: float = _f(None, "max(10 x median step, 300 s)",
        "the run is hung when no training step completes for this long (every rank alive: a collective that never"
        " completes, a deadlock, a stuck data loader): every rank writes its threads' Python stacks to "
        "`hang.rank<N>.txt` in the run directory, summary.json says `failed` with \"hung at step N\" and the frame "
        "the main thread waits in, and every rank exits non-zero, before the process group's own timeout (the 300"
        " s floor is kept under 0.8 x `--dist_timeout_s`; evaluations and checkpoint saves are not counted; "
        "bench/watchdog.py)")


@dataclass(frozen=True)
class CheckpointConfig:
    """saving and resuming"""
    save_interval: int = _f(0, "`0`",
        "checkpoint every N steps (and when preempted); 0 = only when preempted and resumable")
    checkpoint_dir: str = _f(None, "`<run dir>/checkpoints`",
        "where checkpoints go")
    resume: str = _f("none", "`none`",
        "`auto`: continue the run named `--run_name` from its newest complete checkpoint (the SLURM scripts do)",
        choices=("none", "auto"))


@dataclass(frozen=True)
class CompileConfig:
    """whether the engine's model runs compiled (bench/compiling.py)"""
    enable: str = _f("off", "`off`",
        "`on`: torch.compile of the engine's model (DeepSpeed's `engine.compile()`, the accelerator's backend: "
        "inductor) under ZeRO 0-3, EP (around the experts: `compile.autoep_non_moe`), SP and pipeline stages; TP "
        "and TP x EP refuse on the CPU (step 1 never completes under gloo); DeepCompile through the ds_config's "
        "`compile` section (`\"deepcompile\": true`, with `--compile on`) on CUDA only. The first "
        "steps, which compile, are never timed; summary.json `compile` records the compile time (and any spent in "
        "measured steps), graphs, graph breaks with their reasons, recompiles and whether the compile cache "
        "(`$TORCHINDUCTOR_CACHE_DIR`, default beside the op cache in the environment) was warm; metrics.jsonl has "
        "each step's `compile_s`", flag="compile", choices=("off", "on"))
    backend: str = _f("auto", "`auto`",
        "`--compile on`'s torch.compile backend: `auto`, the accelerator's (inductor on CUDA and on the CPU: "
        "generated kernels); `aot_eager`: the same dynamo and AOTAutograd graphs run by eager kernels, quick to "
        "compile (the tests check every strategy's graphs with it, and ZeRO-2 and ZeRO-3 with inductor); "
        "`eager`: dynamo's capture alone", flag="compile_backend", choices=("auto", "inductor", "aot_eager", "eager"))


@dataclass(frozen=True)
class LoggingConfig:
    """where the records go and what the console shows"""
    output_dir: str = _f("runs", "`runs`",
        "parent of run directories")
    run_name: str = _f(None, "`<model>-<strategy>-<peft>-w<N>-<time>`",
        "run directory name (`-2`, `-3` ... appended if taken)")
    wandb_mode: str = _f(None, "`$WANDB_MODE`, else `offline`",
        "`online`, `offline` or `disabled`", choices=("online", "offline", "disabled"))
    wandb_project: str = _f("ds-parallel-bench", "`ds-parallel-bench`",
        "W&B project")
    wandb_group: str = _f(None, "the model name",
        "W&B group")
    log_interval: int = _f(1, "`1`",
        "console line and W&B record every N steps (and at evaluations and the last step); metrics.jsonl gets "
        "every step")
    log_level: str = _f("info", "`info`",
        "how much the harness says: `debug`, `info`, `note`, `warning` or `error` (Python `logging`, logger "
        "`bench`, bench/log.py); the configuration and result tables and the step lines show at every level",
        choices=("debug", "info", "note", "warning", "error"))
    log_ranks: str = _f("0", "`0`",
        "whose messages show: rank 0's (every rank's errors), or `all`, each line tagged `[rank N]`",
        choices=("0", "all"))
    monitor_interval_s: float = _f(1.0, "`1.0`",
        "device monitor sampling period")
    peak_tflops: float = _f(None, "known GPU bf16 peak",
        "device peak used for MFU")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "parallelism": ParallelismConfig,
            "optimizer": OptimizerConfig, "training": TrainingConfig, "compile": CompileConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig}


def flag_fields():
    """(section, field, flag) for every flag, in the order of the sections and of their fields."""
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield section, f, f.metadata["flag"] or f.name


FLAGS = {flag: (section, f.name) for section, f, flag in flag_fields()}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is asked to do, by section (torchtitan's JobConfig shape). Frozen: what the planner
    resolves ("auto" strategy and peft) makes a new one (`with_flags`), never a write."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @classmethod
    def from_flags(cls, flags: dict) -> "RunConfig":
        """From flag name -> value (the command line's shape); flags not given keep their defaults."""
        unknown = sorted(set(flags) - set(FLAGS))
        if unknown:
            raise BenchError(f"unknown setting(s) {', '.join(unknown)}: see --help")
        by_section: dict[str, dict] = {s: {} for s in SECTIONS}
        for flag, value in flags.items():
            section, name = FLAGS[flag]
            by_section[section][name] = value
        return cls(**{s: SECTIONS[s](**kw) for s, kw in by_section.items()})

    def flag(self, flag: str):
        section, name = FLAGS[flag]
        return getattr(getattr(self, section), name)

    def flags(self) -> dict:
        """Flag name -> value, every flag."""
        return {flag: self.flag(flag) for flag in FLAGS}

    def with_flags(self, **changes) -> "RunConfig":
        """A copy with these flags changed (by flag name); this one is untouched."""
        return RunConfig.from_flags({**self.flags(), **changes})

    def to_dict(self) -> dict:
        """config.json's "run" record: the sections as they are."""
        return asdict(self)


def recorded_flags(run: dict) -> dict:
    """Flag name -> value from a config.json "run" record: by section, or flat as runs recorded it before the
    configuration had sections (their resume, analysis and comparisons keep working). A flag added since the run
    was recorded reads as its default: what that run did."""
    defaults = RunConfig().flags()
    if not any(isinstance(v, dict) for v in run.values()):
        return {**defaults, **run}
    return {flag: (run.get(section) or {}).get(name, defaults[flag]) for flag, (section, name) in FLAGS.items()}


def readme_table() -> str:
    """The README's flag table, one part per section, generated from the fields (`python -m bench.config
    --readme`; a test keeps the README equal to it)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines += [f"**{section}** ({cls.__doc__})", "", "| flag | default | meaning |", "|---|---|---|"]
        lines += [f"| `--{flag}` | {f.metadata['shown']} | {f.metadata['help']} |"
                  for s, f, flag in flag_fields() if s == section]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise BenchError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bench/run.py", description="Fine-tune under one parallelism strategy and record what it costs.")
    groups = {s: p.add_argument_group(s, cls.__doc__) for s, cls in SECTIONS.items()}
    for section, f, flag in flag_fields():
        kw = {"default": f.default, "help": f.metadata["help"].replace("`", "").replace("%", "%%")}
        if f.type == "bool":
            kw["action"] = "store_true"
        else:
            kw["type"] = {"int": int, "float": float}.get(f.type, str)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        groups[section].add_argument(f"--{flag}", **kw)
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
    for name in ("max_steps", "seq_len", "micro_batch_size", "global_batch_size", "lora_r", "lora_alpha",
                 "eval_batches", "log_interval", "world_size", "lr", "monitor_interval_s", "peak_tflops",
                 "dist_timeout_s", "hang_timeout_s"):
        if ns[name] is not None and ns[name] <= 0:
            raise BenchError(f"--{name} must be positive, got {ns[name]}")
    cfg = RunConfig.from_flags(ns)
    if cfg.training.warmup_steps < 0 or cfg.training.eval_interval < 0 or cfg.checkpoint.save_interval < 0:
        raise BenchError("--warmup_steps, --eval_interval and --save_interval must be >= 0")
    if cfg.data.packing == "on" and cfg.data.padding == "longest":
        raise BenchError("--padding longest pads unpacked rows; with --packing on nothing is padded but the row's "
                         "end: drop one of them")
    world = cfg.parallelism.world_size
    if world is not None and not cfg.training.dry_run:
        raise BenchError(f"--world_size only plans a layout with --dry_run; to run {world} processes, "
                         f"launch them: deepspeed --num_gpus {world} bench/run.py ...")
    if cfg.checkpoint.resume == "auto" and not cfg.logging.run_name:
        raise BenchError("--resume auto needs --run_name, so that a restarted job finds its own run directory "
                         "(the SLURM scripts pass <job name>-<job id>)")
    ckpt_dir = cfg.checkpoint.checkpoint_dir
    if ckpt_dir and os.path.exists(ckpt_dir) and not os.path.isdir(ckpt_dir):
        raise BenchError(f"--checkpoint_dir {ckpt_dir} exists and is not a directory")
    if cfg.training.warmup_steps >= cfg.training.max_steps:
        raise BenchError(f"--max_steps ({cfg.training.max_steps}) must exceed --warmup_steps "
                         f"({cfg.training.warmup_steps}), otherwise no step is measured")
    if not 0 < cfg.data.val_fraction < 1:
        raise BenchError(f"--val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    return cfg


def format_table(rows: list[tuple[str, object]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


README_MARKERS = ("<!-- flags: generated by python -m bench.config --readme; do not edit -->", "<!-- /flags -->")


def main(argv=None) -> int:
    """`python -m bench.config --readme`: rewrite the README's flag table from the fields; `--check`: say whether
    it differs, exit 1 if it does."""
    p = argparse.ArgumentParser(prog="python -m bench.config", description=main.__doc__)
    p.add_argument("--readme", action="store_true", help="rewrite the README's flag table")
    p.add_argument("--check", action="store_true", help="compare only; exit 1 when the table differs")
    opts = p.parse_args(argv)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(path) as fh:
        text = fh.read()
    start, end = README_MARKERS
    if start not in text or end not in text:
        note(f"{path} has no {start} ... {end} block to generate")
        return 2
    head, rest = text.split(start, 1)
    new = f"{head}{start}\n{readme_table()}{end}{rest.split(end, 1)[1]}"
    if opts.check or not opts.readme:
        if new != text:
            note(f"{path}'s flag table differs from bench/config.py: run python -m bench.config --readme")
            return 1
        return 0
    with open(path, "w") as fh:
        fh.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
