"""Pipeline parallelism (pp) and pipeline x data parallelism (hybrid) for LLaMA, with DeepSpeed's PipelineModule
and its 1F1B schedule; micro-batches are the ds_config's gradient_accumulation_steps.

The Hugging Face model is cut into [embedding] + decoder layers + [norm + LM head]; the loss (shifted token
cross-entropy, mean over target tokens of the micro-batch, as Hugging Face computes it) runs on the last stage.
Hidden states and position ids travel between stages: each stage recomputes the rotary embedding itself, because
passing (cos, sin) between stages breaks DeepSpeed's pipeline backward ("element 0 of tensors does not require
grad"; integer tensors are left out of it, deepspeed/runtime/pipe/engine.py _exec_send_grads). Padded rows are
padded on the right and attention is causal, so no attention mask travels: a real token never attends to the
padding that follows it. Packed rows (--packing) carry their document offsets from stage to stage
(bench/attention.py); under --attn_mask dense each stage builds the per-sample mask from the position ids
instead (bench/models.py packed_causal_mask).
"""
from __future__ import annotations

import functools
import time

import torch

from bench import metrics
from bench.config import BenchError
from bench.ds_config import precision_of, zero_stage
from bench.data import IGNORE
from bench.models import is_moe
from bench.layout import Dimension, Placement, register
from bench.strategies.base import Strategy

PARTITIONS = {"uniform": "uniform", "parameters": "parameters"}


def check_pp(cfg, ds: dict, layout, model_config, strategy: str) -> None:
    section = ds.get("pipeline") or {}
    if layout.pp <= 1:
        raise BenchError(f"--strategy {strategy} needs \"pipeline\": {{\"stages\": N>1}} in "
                         f"{cfg.parallelism.ds_config} (see ds_configs/pp2.json)")
    if is_moe(model_config):
        raise BenchError("pipeline parallelism is built for dense LLaMA models; Mixtral under PP is refused "
                         "(its MoE blocks would need expert-aware stage partitioning): use --strategy ep or tp_ep")
    if layout.pp > model_config.num_hidden_layers:
        raise BenchError(f"{layout.pp} pipeline stages but the model has only {model_config.num_hidden_layers} "
                         "decoder layers; use at most one stage per layer")
    if section.get("partition", "parameters") not in PARTITIONS:
        raise BenchError(f"pipeline.partition must be one of {', '.join(PARTITIONS)}, got {section['partition']!r}")
    stage = zero_stage(ds)
    if stage > 1:
        raise BenchError(f"DeepSpeed's pipeline engine supports ZeRO stage 0 or 1, got stage {stage}")


# ---------------------------------------------------------------------------------------------------------
# The stages

class EmbeddingStage(torch.nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, inputs):
        return (self.embed(inputs[0]), *inputs[1:])  # position ids (and a packed row's document offsets) go on


class DecoderStage(torch.nn.Module):
    """One decoder layer on (hidden states, position ids[, document offsets]). A packed row's offsets travel
    between stages beside the position ids and reach the attention as the collator's keyword arguments
    (bench/attention.py); only its longest document stays behind (a host int cannot travel), so the varlen kernel
    gets the row's width as its bound."""

    def __init__(self, layer, rotary, masked: bool):
        super().__init__()
        self.layer, self.rotary, self.masked = layer, rotary, masked

    def forward(self, inputs):
        from bench.models import packed_causal_mask
        hidden, positions, *bounds = inputs
        # --attn_mask dense: the packed row's block-diagonal mask, as transformers would build it; otherwise none
        mask = packed_causal_mask(positions) if self.masked else None
        documents = {"cu_seq_lens_q": bounds[0], "cu_seq_lens_k": bounds[0]} if bounds and not self.masked else {}
        out = self.layer(hidden, attention_mask=mask, position_ids=positions,
                         position_embeddings=self.rotary(hidden, positions), **documents)
        return ((out[0] if isinstance(out, tuple) else out), positions, *bounds)


class HeadStage(torch.nn.Module):
    def __init__(self, norm, head):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, inputs):
        return self.head(self.norm(inputs[0]))


def tied_logits(embedding: EmbeddingStage, hidden):
    """The LM head of a tied model: the embedding's own weight (a TiedLayerSpec's forward_fn)."""
    return torch.nn.functional.linear(hidden, embedding.embed.weight)


def ties_head(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def causal_lm_loss(logits, labels):
    """Hugging Face's causal-LM loss: next-token cross-entropy, mean over the micro-batch's target tokens."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE)


def build_stages(model, ds: dict, batching: str = "max"):
    """The model as a PipelineModule. batching (bench/data.py Collate): packed rows get a per-sample mask on each
    stage unless flash attention reads the samples from the position ids; rows that change width between
    micro-batches (packed, or padded to the longest sample) make the stages exchange shapes before every send
    (DeepSpeed's PipelineModule dynamic_shape)."""
    from deepspeed.pipe import PipelineModule
    from bench.attention import NAME
    attn = getattr(model.config, "_attn_implementation", "sdpa")
    if attn not in (NAME, "sdpa", "flash_attention_2", "flash_attention_3"):
        raise BenchError(f"pipeline stages rely on causal-by-default attention (sdpa/flash), got {attn!r}")
    if hasattr(model, "base_model") and hasattr(model.base_model, "model"):
        model = model.base_model.model  # a peft model: its adapters live inside the layers the stages reuse
    inner = model.model
    if ties_head(model):
        # One weight on two stages: DeepSpeed keeps a copy on each, broadcasts the first stage's at build and
        # all-reduces their gradients before the step (deepspeed/runtime/pipe/module.py, _index_tied_modules;
        # pipe/engine.py, _exec_reduce_tied_grads), so both train the one-process tied weight; separate
        # modules would train two diverging copies.
        from deepspeed.pipe import TiedLayerSpec
        tied = dict(tied_weight_attr=["embed.weight"])
        first = [TiedLayerSpec("embedding", EmbeddingStage, inner.embed_tokens, **tied)]
        last = [HeadStage(inner.norm, torch.nn.Identity()),  # the norm; the logits follow on the tied weight
                TiedLayerSpec("embedding", EmbeddingStage, inner.embed_tokens, forward_fn=tied_logits, **tied)]
    else:
        first, last = [EmbeddingStage(inner.embed_tokens)], [HeadStage(inner.norm, model.lm_head)]
    masked = batching == "packed" and attn == "sdpa"  # --attn_mask dense
    layers = first + [DecoderStage(layer, inner.rotary_emb, masked) for layer in inner.layers] + last
    section = ds.get("pipeline") or {}
    return PipelineModule(layers=layers, num_stages=section["stages"], loss_fn=causal_lm_loss,
                          partition_method=section.get("partition", "parameters"), dynamic_shape=batching != "max")


# ---------------------------------------------------------------------------------------------------------
# Running it: the training loop's two calls, plus the per-stage busy-time measurement for the bubble

class BusyTimer:
    """Sums the time of the instructions it brackets without stalling the device between them: on GPUs a pair of
    CUDA events recorded on the stream per instruction, read once per step after the loop's own synchronize (a
    synchronize around each instruction would serialize the stage's sends and receives with its compute inside the
    timed step); on the CPU, where an op has finished when it returns, the wall clock."""

    def __init__(self):
        from deepspeed.accelerator import get_accelerator
        self.acc = get_accelerator()
        self.events = self.acc.device_name() == "cuda"
        self.reset()

    def reset(self) -> None:
        self._pairs, self._wall = [], 0.0

    def start(self):
        if not self.events:
            return time.perf_counter()
        event = self.acc.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, mark) -> None:
        if not self.events:
            self._wall += time.perf_counter() - mark
            return
        event = self.acc.Event(enable_timing=True)
        event.record()
        self._pairs.append((mark, event))

    def total(self) -> float:
        return self._wall + sum(a.elapsed_time(b) for a, b in self._pairs) / 1000.0  # elapsed_time: milliseconds


def stage_inputs(batch: dict) -> tuple:
    """((input ids, position ids[, document offsets]), labels): what the first stage and the loss get from a
    micro-batch."""
    ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()  # sent between stages
    bounds = (batch["cu_seq_lens_q"],) if "cu_seq_lens_q" in batch else ()
    return (ids, positions, *bounds), batch["labels"]


class PipelineRunner:
    """train_step/eval_loss for a PipelineEngine. Forward, backward and optimizer instructions are timed
    (BusyTimer: no synchronization inside the step) on every stage, so a stage's idle fraction is 1 - busy / step time. Like EngineRunner,
    it counts what the stage holds in its first step (the first micro-batch's forward saved for backward, the
    gradients just before the optimizer step) and what it communicates in its second (bench/accounting.py)."""

    loss_parts = 1  # train_batch returns the whole mean loss on every stage

    def __init__(self, engine, device):
        from deepspeed.runtime.pipe import schedule
        self.engine, self.device = engine, device
        self.timer = BusyTimer()
        self.accounting, self._counter, self._forwards = {}, None, 0
        timed = {schedule.ForwardPass, schedule.BackwardPass, schedule.OptimizerStep}
        base = type(engine)._INSTRUCTION_MAP

        def count(kind, fn, eng, **kw):
            c = self._counter
            if c is not None and kind is schedule.ForwardPass:
                self._forwards += 1
                with c.forward(self._forwards - 1):
                    return fn(eng, **kw)
            if c is not None and kind is schedule.OptimizerStep:
                c.at_boundary()
            return fn(eng, **kw)

        def wrap(kind, fn):
            def run(eng, **kw):
                mark = self.timer.start()
                count(kind, fn, eng, **kw)
                self.timer.stop(mark)
            return run
        # An instance attribute shadows the class's map only for this engine.
        engine._INSTRUCTION_MAP = {k: (wrap(k, v) if k in timed else v) for k, v in base.items()}

    @property
    def busy_s(self) -> float:
        """This step's compute seconds; read after the training loop synchronized the device."""
        return self.timer.total()

    def train_step(self, micro_batches: list[dict]):
        from bench.accounting import counted_step
        self.timer.reset()
        data = iter([stage_inputs(b) for b in micro_batches])

        def run(counter):
            self._counter, self._forwards = counter, 0  # the wrapped instructions call its hooks
            try:
                return self.engine.train_batch(data_iter=data)  # mean micro-batch loss, on every stage
            finally:
                self._counter = None
        loss = counted_step(self.accounting, self.engine, run)
        if self.accounting.get("logits_bytes") == 0:
            self.accounting["logits_bytes"] = None  # the head's logits stay inside the loss: not counted
        return loss

    def eval_loss(self, batch: dict) -> float | None:
        """This micro-batch's own loss on the last stage (None elsewhere). eval_batch's default would average
        over data-parallel ranks, which breaks the token weighting of val_loss."""
        data = iter([stage_inputs(batch)])
        out = self.engine.eval_batch(data, num_micro_batches=1, reduce_output=None, bcast_loss=False)
        return float(out[0]) if self.engine.is_last_stage() else None

    def stage(self) -> int:
        return self.engine.stage_id


# ---------------------------------------------------------------------------------------------------------
# The strategies

def comm_bytes(plan, rank: int, w: int) -> dict:
    """What the pipeline moves per step on a rank (bench/estimate.py sums the dimensions): each micro-batch's
    activations forward and gradients backward across this stage's boundaries, and the tied embedding's two
    copies summing their gradients (pipe/engine.py, _exec_reduce_tied_grads; in fp32: the bf16 optimizer's
    master gradient)."""
    c, lay = plan.model_config, plan.layout
    (micro, seq), accum = plan.micro_shape, plan.batch.grad_accum
    stage = lay.coords(rank)["pp"]
    sends = (stage < lay.pp - 1) + (stage > 0)  # activations forward, gradients backward
    out = {"send_recv": accum * 2 * sends * micro * seq * c.hidden_size * w}  # logged by sender and receiver
    if c.tie_word_embeddings and plan.peft != "lora" and stage in (0, lay.pp - 1):
        out["all_reduce"] = c.vocab_size * c.hidden_size * (2 if precision_of(plan.ds) == "fp16" else 4)
    return out


def comm_calls(plan, rank: int) -> dict:
    """The calls comm_bytes counts (measured: tests/support assert_plan_matches): per micro-batch and boundary of
    this stage, the hidden states and the position ids forward and the hidden states' gradient backward: padded
    rows (packed ones also send their offsets and shapes, not counted: a lower bound); the tied embedding's one
    reduction is the step's."""
    lay = plan.layout
    stage = lay.coords(rank)["pp"]
    return {"send_recv": plan.batch.grad_accum * 3 * ((stage < lay.pp - 1) + (stage > 0))}


def stage_of(plan, rank: int) -> tuple[int, set | None]:
    """(pipeline stage, indices of the decoder layers it runs; None: every layer, no pipeline)."""
    lay = plan.layout
    if lay.pp == 1:
        return 0, None
    stage = lay.coords(rank)["pp"]
    b = stage_bounds(plan)
    # partition positions: 0 is the embedding, 1..L the decoder layers, then the norm and head (build_stages)
    return stage, {i - 1 for i in range(b[stage], b[stage + 1]) if 1 <= i <= plan.model_config.num_hidden_layers}


def placement(plan, rank: int) -> Placement:
    """The decoder layers this rank's stage runs; the first stage holds the embedding, the last the head."""
    stage, layers = stage_of(plan, rank)
    return Placement(layers, stage == 0, stage == plan.layout.pp - 1)


def in_flight(plan) -> list[int]:
    """Micro-batches whose activations each rank holds at its peak under 1F1B: min(stages - stage, micro-batches)
    (the first stage holds the most)."""
    lay = plan.layout
    return [min(lay.pp - lay.coords(r)["pp"], plan.batch.grad_accum) for r in range(lay.world_size)]


def slowest_stage_share(plan) -> float:
    """The pipeline stage with the most FLOPs, as a multiple of the mean stage's: a stage's decoder layers plus,
    on the last, the LM head (DeepSpeed balances stages by parameters, stage_bounds, so the embedding's stage
    computes less and the head's more)."""
    from bench import models
    lay, c = plan.layout, plan.model_config
    per_token, per_pair = models.flop_coefficients(c, plan.lora_params)
    head = models.head_flops_per_token(c, lora=plan.lora_params is not None)
    layer = (per_token - head + per_pair * plan.micro_shape[1]) / c.num_hidden_layers
    stages = [len(stage_of(plan, lay.ranks_at("pp", s)[0])[1]) * layer + (head if s == lay.pp - 1 else 0)
              for s in range(lay.pp)]
    return max(stages) / (sum(stages) / lay.pp)


def bubble(plan, busy: float) -> float:
    """1F1B's idle time per step: (stages - 1) micro-batches' worth of the slowest stage's work."""
    return busy * (plan.layout.pp - 1) / plan.batch.grad_accum


PP = register(Dimension(
    "pp", "pipeline", "pipeline.stages", degree=lambda ds: (ds.get("pipeline") or {}).get("stages", 1),
    comm_bytes=comm_bytes, comm_calls=comm_calls, splits_weights=True, placement=placement, in_flight=in_flight,
    compute_share=slowest_stage_share, idle=bubble,
    # the pipeline engine reduces once, after the last micro-batch's backward (pipe/engine.py _exec_reduce_grads)
    defers_reduction=True,
    representatives=lambda lay: [lay.ranks_at("pp", s)[0] for s in range(lay.pp)],  # one rank per stage
    span=lambda lay: lay.dp * 2,  # a stage's neighbours sit data-parallel-degree ranks away
    gather_group=lambda lay: 1,  # it gathers nothing
    drops_mask=True,  # stages pass hidden states, position ids and labels, no mask (build_stages)
    order=90))  # stages outermost: DeepSpeed's PipeDataParallelTopology (rank = stage * dp + data rank)


class Pipeline(Strategy):
    name, default_peft, dimensions = "pp", "lora", ("pp",)

    @classmethod
    def claims(cls, layout) -> bool:
        return layout.dp == 1  # as many processes as stages

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        self.reject_foreign_sections(ds)
        check_pp(cfg, ds, layout, model_config, "pp")
        if layout.dp > 1:
            raise BenchError(f"--strategy pp with {layout.describe()}: the world has room for data parallelism "
                             "too; use --strategy hybrid (e.g. ds_configs/pp2_dp2.json) or as many processes as "
                             "stages")

    def prepare(self, model, plan):
        return build_stages(model, plan.ds, plan.collate.mode)

    def build_runner(self, engine, device):
        return PipelineRunner(engine.ds, device)  # DeepSpeed's pipeline engine: its schedule is what runs

    def after_training(self, plan, res, params_per_rank: list) -> dict:
        return {"pipeline": pipeline_summary(plan.layout, plan.batch.grad_accum, res, params_per_rank)}

    def params_per_rank(self, plan) -> list[int]:
        """What each stage's layers hold (stage_layers), for every rank of the stage."""
        from bench.models import count_params_from_config
        c = count_params_from_config(plan.model_config)
        full, _ = _layer_params(plan, c)
        bounds = stage_bounds(plan)
        per_stage = [sum(full[bounds[s]:bounds[s + 1]]) for s in range(plan.layout.pp)]
        return [per_stage[plan.layout.coords(rank)["pp"]] for rank in range(plan.layout.world_size)]


def _layer_params(plan, c) -> tuple[list[int], list[int]]:
    """(all, trainable) parameters of the layers PipelineModule partitions, as build_stages lists them: [embedding]
    + decoder layers + [norm + head], or for a tied head [norm] + [the embedding again] (the last stage's copy)."""
    lora_per_layer = (plan.lora_params or 0) // c["layers"]
    layer = sum(c["layer"][k] for k in ("attention", "mlp", "norms")) + lora_per_layer
    tied = plan.model_config.tie_word_embeddings
    last = [c["final_norm"], c["embedding"]] if tied else [c["final_norm"] + c["head"]]
    full = [c["embedding"]] + [layer] * c["layers"] + last
    trainable = [0] + [lora_per_layer] * c["layers"] + [0] * len(last) if plan.peft == "lora" else full
    return full, trainable


def stage_bounds(plan) -> list[int]:
    """DeepSpeed's own partitioner over the stages' layers, weighted as PipelineModule weighs them: trainable
    parameters per layer ('parameters'), or layer count ('uniform'). -> stage s runs layers [b[s], b[s+1]) of
    _layer_params' list. Ranks are (stage, data) with the stage outermost."""
    from bench.models import count_params_from_config
    full, trainable = _layer_params(plan, count_params_from_config(plan.model_config))
    uniform = (plan.ds.get("pipeline") or {}).get("partition", "parameters") == "uniform"
    return list(_partition(len(full) if uniform else tuple(trainable), plan.layout.pp))


@functools.lru_cache(maxsize=256)
def _partition(layers, stages: int) -> tuple:
    """deepspeed/runtime/utils.py: partition_uniform over a layer count, partition_balanced over layer weights.
    Cached: the planner asks for the same bounds once per rank and per candidate layout (--recommend)."""
    from deepspeed.runtime import utils as ds_utils
    if isinstance(layers, int):
        return tuple(ds_utils.partition_uniform(layers, stages))
    return tuple(ds_utils.partition_balanced(list(layers), stages))


class Hybrid(Pipeline):
    """Pipeline x data parallelism."""
    name = "hybrid"

    @classmethod
    def claims(cls, layout) -> bool:
        return layout.dp > 1

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        self.reject_foreign_sections(ds)
        check_pp(cfg, ds, layout, model_config, "hybrid")
        if layout.dp < 2:
            raise BenchError(f"--strategy hybrid needs data parallelism beside the pipeline, got "
                             f"{layout.describe()}; launch a multiple of {layout.pp} processes greater than "
                             f"{layout.pp}")


def pipeline_summary(layout, micro_batches: int, res, per_rank: list) -> dict:
    """Per stage: parameters, and the measured idle fraction next to 1F1B's theoretical bubble. Ranks are
    (stage, data) with the stage as the outer axis, as DeepSpeed's PipeDataParallelTopology numbers them."""
    stages = []
    for s in range(layout.pp):
        ranks = layout.ranks_at("pp", s)
        # no timed step (a run no longer than the untimed ones): nothing measured
        idle = [metrics.idle_fraction(res.busy_s[r], sum(res.step_times)) for r in ranks] if res.busy_s else None
        stages.append({"stage": s, "ranks": list(ranks), "params": per_rank[ranks[0]]["total"],
                       "trainable": per_rank[ranks[0]]["trainable"],
                       "measured_idle_fraction": sum(idle) / len(idle) if idle else None})
    return {"stages": layout.pp, "micro_batches": micro_batches,
            "theoretical_bubble": metrics.pipeline_bubble(layout.pp, micro_batches), "per_stage": stages}

