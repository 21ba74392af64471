"""Resolve a run before anything heavy starts: its spec (bench/spec.py: layout, batch arithmetic, the resolved
ds_config), then the model config and data.

Every rank resolves the same inputs the same way, so bad input makes every rank exit with the same line,
before a process group exists that could hang.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field

from bench import compiling, config, data, data_cache, ds_config, gpus, metrics, models
from bench.layout import DIMENSIONS, Layout
from bench.spec import RunSpec, spec_of
from bench.strategies import STRATEGIES, Strategy
from bench.device import attention_problem, device_index
from bench.ops import check_ops
from bench.architecture import lora_adapter_params
from bench.log import log


@dataclass(frozen=True, eq=False)  # eq=False: it holds dicts and data, compared by identity
class Plan:
    """Everything a run is, resolved once (resolve) and never written to: the configuration with every "auto"
    settled, the spec, the model's shape, the data, the device, and what the planner predicts (memory_plan)."""
    cfg: config.RunConfig     # --strategy and --peft as resolved, like every other "auto"
    spec: RunSpec             # the run's shape, from the ds_config and the command line alone
    strategy: Strategy
    model_config: object
    tokenizer_source: str
    train_data: data.Tokenized | None  # None: a plan of rows padded to --seq_len, which reads no data (reads_data)
    val_data: data.Tokenized | None
    collate: data.Collate     # --packing/--padding resolved for this data
    device_type: str
    device_name: str | None
    lora_params: int | None   # adapter parameters LoRA adds (None: full fine-tune)
    flops_per_token: float    # bench/models.py: flops_per_token
    peak_tflops: float | None  # MFU's denominator; None where the device's peak is unknown
    peak_source: str          # where peak_tflops came from (bench/gpus.py)
    phases: dict = field(default_factory=dict)  # startup seconds: imports, resolve
    capacity: int | None = None  # this rank's GPU memory in bytes, which memory_plan checks against (None: no GPU)
    device_share: float = 1.0  # the share of a device each rank computes on (bench/distributed.py device_share)

    @functools.cached_property
    def ds(self) -> dict:
        """The ds_config DeepSpeed gets and the run records: the spec's, with the strategy's presets for this
        model (one dict, derived from the spec; a varied spec derives its own)."""
        ds = self.strategy.resolve_ds(copy.deepcopy(self.spec.ds), self.model_config)
        return compiling.resolve_ds(ds, self.cfg, self.strategy)

    @functools.cached_property
    def memory_plan(self) -> dict | None:
        """bench/estimate.py's prediction for this run, checked against the device's memory (check_memory)."""
        return check_memory(self, self.capacity)

    @property
    def layout(self) -> Layout:
        return self.spec.layout

    @property
    def batch(self) -> ds_config.Batch:
        return self.spec.batch

    @property
    def peft(self) -> str:
        return self.spec.peft

    @property
    def zero_stage(self) -> int:
        return ds_config.zero_stage(self.ds) if self.strategy.engine == "deepspeed" else None

    def varied(self, micro: int, activation_checkpointing: bool) -> "Plan":
        """This plan with its spec varied (RunSpec.varied): --recommend's candidates, one model and data each."""
        spec = self.spec.varied(micro, activation_checkpointing)
        cfg = self.cfg.with_flags(micro_batch_size=micro, activation_checkpointing=activation_checkpointing)
        varied = dataclasses.replace(self, cfg=cfg, spec=spec, strategy=type(self.strategy)(), phases=dict(self.phases))
        if micro == self.batch.micro and "_planned_shapes" in vars(self):  # the same batches: the same shapes
            vars(varied)["_planned_shapes"] = self._planned_shapes
        return varied

    @property
    def total_params(self) -> int:
        """The model's parameters, LoRA adapters included."""
        return models.count_params_from_config(self.model_config)["total"] + (self.lora_params or 0)

    def _params_row(self) -> str:
        total = self.total_params
        trainable = self.lora_params if self.peft == "lora" else total
        per_rank = self.strategy.params_per_rank(self)
        groups: list[list] = []  # consecutive ranks holding the same count
        for rank, n in enumerate(per_rank):
            if groups and groups[-1][0] == n:
                groups[-1][2] = rank
            else:
                groups.append([n, rank, rank])
        ranks = ", ".join(f"{n:,} (rank{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''})" for n, a, b in groups)
        return f"total {total:,}, trainable {trainable:,}; held per rank: {ranks}"

    def config_record(self, world_size: int) -> dict:
        """config.json: everything that defines this run, resolved (no "auto" left)."""
        from bench.summary import environment
        b = self.batch
        return {"run": self.cfg.to_dict(), "ds_config": self.ds,
                "layout": self.layout.as_dict(),
                "world_size": world_size, "batch": {"global": b.global_, "micro": b.micro, "grad_accum": b.grad_accum},
                "peft": self.peft, "device": {"type": self.device_type, "name": self.device_name,
                                              "dtype": str(self.dtype)},
                "model_config": self.model_config.to_dict(), **environment()}

    def throughput(self, step_times: list[float], work: list[int] | None = None) -> dict:
        """metrics.throughput with this run's constants: real and computed tokens/s, samples/s, TFLOP/s, MFU, HFU.
        work: those steps' [real tokens, computed tokens, real pairs, computed pairs] (bench/data.py MicroBatch.work);
        None: every step's global batch taken as full --seq_len rows (a checkpoint from before work was counted)."""
        if work is None:
            rows = len(step_times) * self.batch.global_
            seq = self.cfg.data.seq_len
            work = [rows * seq, rows * seq] + [rows * seq ** 2] * 2
        model = models.flop_coefficients(self.model_config, self.lora_params)
        hardware = models.flop_coefficients(self.model_config, self.lora_params,
                                            self.cfg.model.activation_checkpointing)
        return metrics.throughput(step_times, work, self.batch.global_, self.layout.world_size, model, hardware,
                                  self.peak_tflops)

    @property
    def micro_shape(self) -> tuple[int, int]:
        """(rows, width) of this run's mean micro-batch: what the planner plans activations, communication and
        FLOPs for (--seq_len-wide rows unless packed or padded to the longest sample)."""
        return self._planned_shapes[0]

    @property
    def micro_shapes(self) -> list[tuple[int, int]]:
        """Every distinct (rows, width) of the micro-batches this run will see: its memory peaks at one of them."""
        return self._planned_shapes[1]

    @functools.cached_property
    def _planned_shapes(self) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        if self.collate.mode == "max":
            return (self.batch.micro, self.cfg.data.seq_len), [(self.batch.micro, self.cfg.data.seq_len)]
        sharded = data.ShardedBatches(self.train_data, self.batch.micro, self.batch.grad_accum,
                                      self.layout.data_parallel, 0, self.cfg.training.seed, self.collate)
        return sharded.planned_shapes(self.cfg.training.max_steps)

    @property
    def consumed(self) -> str:
        """How many samples the run tokenized, in words."""
        if self.train_data is None:
            return "not read: rows padded to --seq_len plan the same whatever the data holds"
        n = self.train_data.input_ids.shape[0] + self.val_data.input_ids.shape[0]
        return f"{n} tokenized: what {self.cfg.training.max_steps} steps and the evaluations consume"

    @property
    def batching(self) -> str:
        """How samples become rows, in words (the console table, summary.json)."""
        if self.train_data is not None and self.train_data.kind == "text":
            return f"text cut into full {self.cfg.data.seq_len}-token rows"
        return {"packed": "packed: each micro-batch's samples in one row",
                "longest": "one row per sample, padded to the micro-batch's longest",
                "max": f"one row per sample, padded to {self.cfg.data.seq_len}"}[self.collate.mode]

    @functools.cached_property
    def attention(self) -> dict:
        """The attention path this run takes (bench/attention.py describe): summary.json's `attention`. Cached: the
        planner asks for it per rank, and on a GPU it asks the device for its capability."""
        from bench.attention import describe, varlen_runs
        drops = any(d.drops_mask for d in self.layout.declared())
        capability = None
        # the run's own GPU; a plan for another assumes one
        if self.device_type == "cuda" and not self.cfg.training.dry_run:
            import torch
            capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        varlen = varlen_runs(self.device_type, self.dtype, models.head_dim(self.model_config), capability)
        m = self.cfg.model
        return describe(m.attn_implementation, m.attn_mask, self.collate.mode, drops, self.device_type, varlen)

    @property
    def dtype(self):
        import torch
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ds_config.precision_of(self.ds)]

    def _streams(self) -> str:
        """Which dimensions' ranks make the data-parallel streams besides DP itself, in words ("" if none)."""
        extra = [d.key for d in self.layout.declared() if d.streams]
        return f" ({' x '.join(['dp', *extra])})" if extra else ""

    def table(self) -> str:
        cfg, b, mc = self.cfg, self.batch, self.model_config
        m, t, out = cfg.model, cfg.training, cfg.logging
        rows = [
            ("strategy", cfg.parallelism.strategy), ("engine", self.strategy.engine),
            ("ds_config", cfg.parallelism.ds_config),
            ("layout", self.layout.describe()),
            ("zero_stage", self.zero_stage), ("model", f"{m.name} ({type(mc).__name__}, init={m.init})"),
            ("architecture", f"L={mc.num_hidden_layers} hidden={mc.hidden_size} heads={mc.num_attention_heads}/"
                             f"{mc.num_key_value_heads} vocab={mc.vocab_size}"
                             + (f" experts={mc.num_local_experts} top{mc.num_experts_per_tok}"
                                if models.is_moe(mc) else "")),
            ("peft", self.peft + (f" (r={m.lora_r}, alpha={m.lora_alpha}, targets={m.lora_targets})"
                                  if self.peft == "lora" else "")),
            ("device", f"{self.device_type} ({self.device_name or 'unknown'}), dtype={str(self.dtype)[6:]}"),
            ("batch", f"global {b.global_} = micro {b.micro} x grad_accum {b.grad_accum} x data-parallel "
                      f"{self.layout.data_parallel}" + self._streams()),
            ("seq_len", cfg.data.seq_len), ("steps", f"{t.max_steps} (first {t.warmup_steps} excluded from timing)"),
            ("parameters", self._params_row()),
            ("FLOPs per token", f"{self.flops_per_token:.4g} (training, matmuls; docs/metrics.md)"),
            ("MFU peak", (f"{self.peak_tflops:g} TFLOP/s, " if self.peak_tflops else "MFU not reported: ")
                         + self.peak_source),
            ("lr", self.ds["optimizer"]["params"]["lr"]),
            ("data", f"{cfg.data.source}: " + (f"{self.train_data.size} train / {self.val_data.size} val "
                                               if self.train_data is not None else "")
                     + f"({self.consumed}), {self.batching}"),
            ("attention", "{implementation}: {kernel}, {mask} mask".format(**self.attention)),
            ("compile", "off (eager)" if cfg.compile.enable == "off" else
             f"on: engine.compile(), backend {cfg.compile.backend}"
             + (" with DeepCompile" if compiling.deepcompile_asked(self.ds) else "")
             + "; the memory plan and cost model are eager's (docs/planner.md)"),
            ("output", f"{out.output_dir}/ (W&B {out.wandb_mode}, project {out.wandb_project})"),
        ]
        return config.format_table(rows, "resolved configuration")


@functools.lru_cache(maxsize=None)  # asked while the spec is resolved, then for the plan
def _device(local_rank: int) -> tuple[str, str | None, bool]:
    import torch
    from deepspeed.accelerator import get_accelerator
    kind = get_accelerator().device_name()
    if kind == "cuda":
        index = device_index(local_rank, torch.cuda.device_count())
        return "cuda", torch.cuda.get_device_name(index), torch.cuda.is_bf16_supported()
    return kind, None, False  # CPU: bf16 "auto" means off (no fast bf16 GEMMs to measure)


def resolve(cfg: config.RunConfig, env, device: tuple | None = None) -> Plan:
    """The run's plan, every check made: bad input, and on a GPU a layout predicted not to fit, refused in one
    line. device: (type, name, bf16 supported) to plan for another machine than this one (bench-plan --gpu)."""
    t0 = time.time()
    here = device is None  # this machine runs it (planning for another GPU needs no kernels here)

    def device_kind() -> tuple[str, bool]:  # asked once the spec's cheap checks have passed (it may start CUDA)
        kind, _, bf16 = _device(env.local_rank) if here else device
        return kind, bf16

    world = cfg.parallelism.world_size or env.world_size  # --dry_run --world_size N plans N processes from this one
    spec = spec_of(cfg, world, device_kind)
    model = load_model(cfg)
    device = _device(env.local_rank) if here else device
    share = 1.0
    if device[0] == "cpu":  # ranks that share the host's cores (the cost features: bench/calibrate.py)
        from bench.distributed import device_share
        share = device_share(env, world)
    plan = assemble(cfg, spec, device, model, lambda: load_data(cfg, spec, model, env), here, t0,
                    device_capacity(device[0], env.local_rank) if here else None, share)
    if here:
        plan.memory_plan  # noqa: B018 - the GPU guard: refuses here, before any process group, if it will not fit
    if cfg.checkpoint.resume == "auto":
        check_resume(plan, world)
    return plan


@dataclass(frozen=True)
class Model:
    """What planning needs of the model: its config (no weights) and its tokenizer's source."""
    config: object
    tokenizer_source: str


def load_model(cfg: config.RunConfig) -> Model:
    model_config, tok_source, _ = models.load_config(cfg.model.name, cfg.model.init, offline=cfg.training.dry_run)
    return Model(model_config, tok_source)


def load_data(cfg: config.RunConfig, spec: RunSpec, model: Model, env) -> tuple[data.Tokenized, data.Tokenized]:
    """The train and validation splits the run consumes: tokenized once per node (bench/data_cache.py)."""
    tok = models.load_tokenizer(model.tokenizer_source)
    if tok.vocab_size > model.config.vocab_size:
        raise config.BenchError(f"tokenizer has {tok.vocab_size} tokens but the model only "
                                f"{model.config.vocab_size}")
    t, d = cfg.training, cfg.data
    need = data.Need(spec.batch.global_, t.max_steps, t.eval_batches * spec.batch.micro)  # tokenize only these
    return data_cache.load(d.source, tok, model.tokenizer_source, d.seq_len, d.val_fraction, t.seed, need,
                           env.local_rank, t.dist_timeout_s)


def reads_data(cfg: config.RunConfig) -> bool:
    """Whether planning this run reads its data file: packed rows and rows padded to the micro-batch's longest take
    their shapes from the samples; rows padded to --seq_len (and text data's full rows) do not, so a dry run of
    them plans without the data. A run that trains reads it."""
    return not (cfg.training.dry_run and cfg.data.packing == "off" and cfg.data.padding == "max")


def assemble(cfg: config.RunConfig, spec: RunSpec, device: tuple, model: Model, splits, here: bool = False,
             t0: float | None = None, capacity: int | None = None, device_share: float = 1.0) -> Plan:
    """The plan of a spec with its model, device and data (splits: -> the train and validation splits, asked for
    once the model's checks have passed): every check that needs the model or the data, in one line each.
    here: the device is this machine's, which must have the kernels."""
    t0 = time.time() if t0 is None else t0
    device_type, device_name, _ = device
    cfg = cfg.with_flags(strategy=spec.strategy, peft=spec.peft)  # recorded resolved, like every "auto"
    layout, batch, model_config = spec.layout, spec.batch, model.config
    strategy = STRATEGIES[cfg.parallelism.strategy]()  # fresh: this run's own
    for d in DIMENSIONS.values():  # a dimension's own flags need a strategy made of it
        if any(cfg.flag(flag) for flag in d.flags) and d.key not in strategy.dimensions:
            names = " or ".join(n for n, s in STRATEGIES.items() if d.key in s.dimensions)
            raise config.BenchError(f"--{' and --'.join(d.flags)} run with --strategy {names} (they need its {d.key} "
                                    f"dimension); drop them or use --strategy {names}")
    strategy.check(cfg, spec.ds, layout, model_config)  # a --strategy the layout is not refuses here, in one line
    compiling.check(cfg, spec.ds, device_type, strategy.compile_problem(device_type))
    lora_params = lora_adapter_params(cfg, model_config) if spec.peft == "lora" else None
    if cfg.data.seq_len > model_config.max_position_embeddings:
        raise config.BenchError(f"--seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                                f"({model_config.max_position_embeddings})")
    if cfg.model.attn_mask == "dense" and cfg.model.attn_implementation.startswith("flash"):
        raise config.BenchError(f"--attn_mask dense builds transformers' dense masks, which "
                                f"--attn_implementation {cfg.model.attn_implementation} never takes: drop --attn_mask "
                                "dense, or use sdpa or eager")
    problem = attention_problem(cfg.model.attn_implementation, device_type) if here else None
    if problem:
        raise config.BenchError(problem)
    t_data = time.time()
    train = val = None
    if reads_data(cfg):
        train, val = splits()
        dp = layout.data_parallel
        data.ShardedBatches(train, batch.micro, batch.grad_accum, dp, 0, cfg.training.seed)  # validates the sizes
        if val.size < batch.micro * dp:
            raise config.BenchError(f"the validation split ({val.size} samples) is smaller than one "
                                    f"micro batch per data-parallel rank ({batch.micro * dp}); raise --val_fraction")
    collate = data.Collate.of(train.kind if train else None, cfg.data.packing, cfg.data.padding, layout.sequence_split,
                              dense=cfg.model.attn_mask == "dense" or cfg.model.attn_implementation == "eager")
    plan = Plan(cfg, spec, strategy, model_config, model.tokenizer_source, train, val, collate, device_type,
                device_name, lora_params, models.flops_per_token(model_config, cfg.data.seq_len, lora_params),
                *gpus.peak_tflops(device_name, cfg.logging.peak_tflops),
                phases={"resolve_s": t_data - t0, "data_s": time.time() - t_data}, capacity=capacity,
                device_share=device_share)
    if not cfg.training.dry_run:  # the ops its ds_config needs (planning may happen on another machine than the run)
        check_ops(plan.ds, device_type)
    return plan


def planning_config(args: list[str], world: int) -> config.RunConfig:
    """bench/run.py's flags as a dry run of `world` processes from this one."""
    return config.parse_args([*args, "--dry_run", "--world_size", str(world), "--wandb_mode", "disabled"])


def plan_layout(args: list[str], world: int, gpu: str | None = None) -> Plan:
    """A layout planned from this one process without launching it (bench-plan, sweeps, tests): bench/run.py's
    flags as a dry run of `world` processes, resolved as on a GPU named `gpu` (bf16 "auto" on) or, without one, as
    on this machine."""
    from bench.distributed import DistEnv
    return resolve(planning_config(args, world), DistEnv(0, 0, 1), device=("cuda", gpu, True) if gpu else None)


def device_capacity(device_type: str, local_rank: int) -> int | None:
    """This rank's GPU memory in bytes (None on the CPU)."""
    if device_type != "cuda":
        return None
    import torch
    return torch.cuda.get_device_properties(device_index(local_rank, torch.cuda.device_count())).total_memory


def check_memory(plan: Plan, capacity: int | None = None) -> dict | None:
    """The planner's prediction for this run (summary.json memory_plan). On a GPU it is compared with the
    device's memory before any weight is loaded: a layout predicted not to fit is refused (every rank decides
    the same, before a process group exists), unless --ignore_memory_plan. On the CPU it is only recorded."""
    from bench import cost_model, estimate
    from bench.calibrate import features
    from bench.plan_report import suggestions
    try:
        est = estimate.estimate(plan, capacity, device=plan.device_type)
        est["cost_features"] = features(plan, est)  # what bench-plan --calibrate fits this run's step time with
        gpu = gpus.match(plan.device_name) if plan.device_type == "cuda" else None
        if gpu and gpu.key in gpus.plannable():  # the uncalibrated cost model's step, which the report sets
            # beside the measured one (it has constants for the catalog's GPUs only)
            est["predicted_step"] = {**cost_model.step_breakdown(plan, est, gpu.key), "gpu": gpu.key}
    except Exception as e:  # noqa: BLE001 - an architecture the formulas do not know must not stop the run
        log.warning(f"the planner cannot plan {plan.cfg.model.name} under --strategy {plan.cfg.parallelism.strategy} "
                    f"({type(e).__name__}: {e}); running without a memory plan")
        return None
    if est["fits"] is False and not plan.cfg.training.ignore_memory_plan:
        which = "loading" if est["load_peak_bytes"] > est["training_peak_bytes"] else "training"
        raise config.BenchError(
            f"predicted {which} peak {est['peak_bytes'] / gpus.GIB:.1f} GiB per GPU against "
            f"{capacity / gpus.GIB:.1f} GiB on {plan.device_name}: this layout will not fit; try "
            f"{' or '.join(suggestions(plan))} (bench-plan shows the breakdown; --ignore_memory_plan runs "
            "it anyway)")
    return est


def check_resume(plan: Plan, world_size: int) -> None:
    """Resuming continues the same experiment: refuse, one line per difference, when the run directory was
    started with other settings (every rank reads the same config.json, before any process group exists)."""
    from bench.checkpoint import resume_differences
    path = os.path.join(plan.cfg.logging.output_dir, plan.cfg.logging.run_name, "config.json")
    if not os.path.isfile(path):
        return  # nothing to resume yet: this is the run's first start
    with open(path) as fh:
        recorded = json.load(fh)
    lines = resume_differences(recorded, json.loads(json.dumps(plan.config_record(world_size), default=str)))
    if lines:
        raise config.BenchError("\n".join([f"--resume auto: {path} was started with other settings; resuming "
                                           "would mix two experiments (start a new --run_name instead):", *lines]))


if __name__ == "__main__":  # python -m bench.plan: the planner's command line (bench/plan_cli.py), as bench-plan
    import runpy  # run, not imported: plan_cli imports this module
    runpy.run_module("bench.plan_cli", run_name="__main__")
