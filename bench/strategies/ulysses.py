"""DeepSpeed Ulysses sequence parallelism (ALST) for Hugging Face models: strategy `sp`.

The ds_config's `sequence_parallel_size` S groups consecutive ranks; the ranks of one group read the same
micro-batches and each takes 1/S of every sequence. In every attention layer DeepSpeed's UlyssesSPAttentionHF
exchanges q, k and v all-to-all, so each rank attends over the whole sequence for heads/S heads, and back. ZeRO
(1-3) splits the model states over every rank (DeepSpeed's sequence-data-parallel group).

The loss is the harness's, token-weighted over the whole micro-batch: each rank sums the cross-entropy of its
slice (labels shifted by one before slicing, so a slice boundary loses no target) and divides by the micro-batch's
target-token count, which every rank of the group knows (it holds the whole batch). The ranks' losses add up to
the one-process loss, and their gradients add up to its gradient. DeepSpeed then averages over the data-parallel
ranks: ZeRO-0/1/2 divide the summed gradients by world/S, ZeRO-3's reduce-scatter by the world, so under ZeRO-3
each rank's loss is scaled by S before backward (docs/parity.md: measured both ways).
"""
from __future__ import annotations

import math

from bench.config import BenchError
from bench.ds_config import zero_stage
from bench.attention import KWARGS
from bench.data import IGNORE
from bench.models import head_dim, is_moe
from bench.strategies.autoep import allow_frozen_experts, check_ep, experts_not_held, with_peft_names
from bench.layout import Dimension, register
from bench.strategies.base import EngineRunner
from bench.strategies.common import ModelParallel
from bench.strategies.zero import check_stage



def check_sp(cfg, ds: dict, layout, model_config) -> None:
    sp = layout.sp
    if sp <= 1:
        raise BenchError(f"--strategy sp needs \"sequence_parallel_size\": N>1 in {cfg.parallelism.ds_config} "
                         "(see ds_configs/sp2.json)")
    if "pipeline" in ds:
        raise BenchError("sequence parallelism with pipeline parallelism is refused: DeepSpeed's Ulysses attention "
                         "runs inside whole models, not pipeline stages; use --strategy sp or --strategy pp")
    if cfg.data.seq_len % sp:
        raise BenchError(f"--seq_len {cfg.data.seq_len} is not divisible by the sequence-parallel size {sp}; choose a "
                         f"multiple of {sp}")
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % sp or (kv % sp and sp % kv):
        raise BenchError(f"sequence-parallel size {sp} must divide the attention heads ({heads}) and divide or be a "
                         f"multiple of the key/value heads ({kv}) of {cfg.model.name}")
    if cfg.model.attn_implementation == "eager":
        raise BenchError("--attn_implementation eager cannot run under sequence parallelism (it needs the whole "
                         "4-D attention mask); use sdpa or flash_attention_2")
    if cfg.parallelism.tiled_mlp and is_moe(model_config):
        raise BenchError("--tiled_mlp tiles dense MLPs (gate/up/down projections); Mixtral's experts route each "
                         "token and are not tiled here: drop --tiled_mlp")
    check_stage(ds)


def comm_bytes(plan, rank: int, w: int) -> dict:
    """What Ulysses moves per step on a rank (bench/estimate.py sums the dimensions): each layer's q, k, v and
    output all-to-all, forward and backward (k and v with their heads repeated up to the SP size when there are
    fewer), and its position ids gathered in forward."""
    c, lay = plan.model_config, plan.layout
    (micro, seq), accum = plan.micro_shape, plan.batch.grad_accum
    tokens, hd, L = micro * seq // lay.sp, head_dim(c), c.num_hidden_layers
    q, kv = tokens * c.num_attention_heads * hd, tokens * max(c.num_key_value_heads, lay.sp) * hd
    return {"all_to_all": accum * L * 2 * (2 * q + 2 * kv) * w, "all_gather": accum * L * tokens * 8}


def comm_calls(plan, rank: int) -> dict:
    """The calls comm_bytes counts (measured: tests/support assert_plan_matches): per layer and micro-batch, q, k,
    v and the output exchanged forward and backward, and one gather of the position ids; under LoRA the first
    layer's backward may skip an exchange whose gradient nothing needs (measured once: 31 of 32)."""
    layers = plan.batch.grad_accum * plan.model_config.num_hidden_layers
    return {"all_to_all": 8 * layers, "all_gather": layers}


SP = register(Dimension(
    "sp", "sequence_parallel_size", "sequence_parallel_size", degree=lambda ds: ds.get("sequence_parallel_size", 1),
    comm_bytes=comm_bytes, comm_calls=comm_calls,
    span=lambda lay: lay.sp, gather_group=lambda lay: lay.sp,  # consecutive ranks
    order=20,  # inside the data axis, outside TP's (Ulysses' sequence groups are consecutive ranks)
    zero_shards=True,  # ZeRO splits over DeepSpeed's sequence-data-parallel group: every rank
    splits_sequence=True,
    flags=("tiled_mlp", "tiled_loss"),  # DeepSpeed's ALST tiling, applied by this module's runner
    drops_mask=True,  # padded rows: Ulysses' attention runs causal SDPA without one
    # runtime/engine.py sets communication_data_type from seq_parallel_communication_data_type, whose default is
    # fp32 even in bf16 (runtime/constants.py)
    reduce_dtype=lambda ds: ds.get("seq_parallel_communication_data_type", "fp32"),
    tiles_mlp=lambda plan: plan.cfg.parallelism.tiled_mlp, tiles_loss=lambda plan: plan.cfg.parallelism.tiled_loss,
    loss_slice=lambda plan, shape: loss_slice_bytes(plan, shape),  # defined below
    folds=("ep",)))  # the SP x EP cross term: AutoEP's groups fold over the SP ranks (DeepSpeed's "sp" ordering)


class SequenceParallel(ModelParallel):
    """Ulysses alone, or with AutoEP for MoE models (its groups folded over the SP ranks: world = dp x sp)."""
    name, default_peft, dimensions = "sp", "none", ("sp", "ep")

    def params_not_held(self, plan) -> int:  # the cross term: AutoEP's groups folded over the SP ranks
        return experts_not_held(plan) if plan.layout.ep > 1 else 0

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        check_sp(cfg, ds, layout, model_config)
        self.reject_foreign_sections(ds)
        if layout.ep > 1:
            if zero_stage(ds) == 3:
                raise BenchError("AutoEP with ZeRO-3 under sequence parallelism is refused: DeepSpeed 0.19.8 does not "
                                 "support it ('AutoEP with ZeRO Stage 3 does not support sequence parallelism'); use "
                                 "ZeRO-1 or 2 (ds_configs/sp2_zero1.json with an expert_parallel section)")
            check_ep(cfg, ds, layout, model_config, "sp")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        return with_peft_names(ds)

    def prepare(self, model, plan):
        """Ulysses attention in place of the model's own (registered with transformers) and DeepSpeed's
        sequence-parallel groups, which deepspeed.initialize gets as its mpu."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from bench.models import head_dim
        cfg, ds = plan.cfg, plan.ds
        config = model.config.get_text_config()
        if getattr(config, "head_dim", None) is None:  # Mixtral's config holds head_dim=None, which DeepSpeed takes
            config.head_dim = head_dim(config)         # for the width itself: set what the layers computed
        if cfg.model.attn_implementation == "sdpa" and cfg.model.attn_mask == "dense" and plan.collate.mode == "packed":
            confine_sdpa_to_packed_samples()
        rows = 1 if plan.collate.mode == "packed" else ds["train_micro_batch_size_per_gpu"]  # Ulysses fixes them
        # the model's own implementation (bench/attention.py NAME for sdpa): DeepSpeed wraps that entry of
        # transformers' AttentionInterface and passes the collator's document offsets through to it
        self.mpu = UlyssesSPAttentionHF.register_with_transformers(
            model, core_attn_implementation=model.config._attn_implementation,
            sequence_parallel_size=ds["sequence_parallel_size"], micro_batch_size=rows,
            seq_length=cfg.data.seq_len, seq_length_is_variable=True)
        if "expert_parallel" in ds:
            self.mpu = without_tensor_parallelism(self.mpu)
            if cfg.model.peft == "lora":
                allow_frozen_experts()
        self.loss_scale = ds["sequence_parallel_size"] if zero_stage(ds) == 3 else 1
        self.tiled_loss = cfg.parallelism.tiled_loss
        if cfg.parallelism.tiled_mlp:
            tile_mlps(model, cfg.data.seq_len // ds["sequence_parallel_size"])
        return model

    def build_runner(self, engine, device):
        # DeepSpeed's engine itself: Ulysses scales the loss by its accumulation steps (gradient_accumulation_steps)
        return SequenceParallelRunner(engine.ds, self.mpu, self.loss_scale, self.tiled_loss)

    def after_initialize(self, plan, engine, shapes_before: dict) -> dict:
        """The experts' sharding under AutoEP; alone, SP shards no parameter (ZeRO-3's partitions are not TP's)."""
        return super().after_initialize(plan, engine, shapes_before) if plan.layout.ep > 1 else {}


def confine_sdpa_to_packed_samples() -> None:
    """--attn_mask dense: make transformers' "sdpa" attention build the per-sample mask of packed rows from the
    position ids it gets (the dense path kept for comparison; the default is bench/attention.py's document path).

    Ulysses drops every 4-D mask (its rank's slice's mask is wrong for the gathered sequence) and hands the core
    attention the gathered position ids instead (deepspeed/runtime/sequence_parallel/ulysses_sp.py,
    register_with_transformers' uattn_wrapper, and UlyssesSPAttentionHF.forward); flash attention finds the
    samples there, SDPA would attend causally across them. register_with_transformers takes the core attention
    from ALL_ATTENTION_FUNCTIONS["sdpa"] when called, so this goes in first. Only for packed rows: padded rows
    need no mask (causal attention never looks right, at the padding)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from bench.models import packed_causal_mask
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(sdpa, "confines_packed_samples", False):
        return

    def packed_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is None and kwargs.get("position_ids") is not None:
            attention_mask = packed_causal_mask(kwargs["position_ids"])
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    packed_sdpa.confines_packed_samples = True
    ALL_ATTENTION_FUNCTIONS["sdpa"] = packed_sdpa


def without_tensor_parallelism(mpu):
    """DeepSpeed's ALST mpu aliases model parallelism to SP, which AutoEP reads as tensor parallelism and refuses
    ("AutoEP does not currently support tensor model parallelism from mpu"), though its own groups know an "sp"
    folding. The same mpu, saying that there is no tensor parallelism; everything else (DeepSpeed recognises it by
    initialize_sequence_parallel) unchanged. Parity-tested (tests/integration/test_sequence_parallel.py)."""
    import types
    shim = types.SimpleNamespace(**{n: getattr(mpu, n) for n in dir(mpu) if not n.startswith("__")})
    shim.get_tensor_model_parallel_world_size = lambda: 1
    shim.get_tensor_model_parallel_rank = lambda: 0
    return shim


def loss_slice_bytes(plan, shape: tuple[int, int]) -> int:
    """--tiled_loss: the bytes one slice of the LM head and loss holds at once on a rank: its logits in the
    training dtype, their fp32 copy and gradient (tile_loss's slices of this rank's share of the row)."""
    rows, width = shape
    logits = rows * width // plan.layout.sp * plan.model_config.vocab_size
    return logits * (plan.dtype.itemsize + 8) // tile_count(logits * 4, 2 ** 30)


def tile_count(tokens: int, width: int) -> int:
    """Slices a tiled computation takes: one per `width` tokens as DeepSpeed's examples do (the MLP: the hidden
    size; the loss: enough that one slice's fp32 logits stay near 1 GiB), and at least two."""
    return max(2, math.ceil(tokens / width))


def tile_mlps(model, tokens: int) -> None:
    """Every dense MLP's forward through DeepSpeed's TiledMLP over `tokens`-long slices of this rank's sequence."""
    import types
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def mlp(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tiled(self, x):
        shards = tile_count(x.shape[-2], x.shape[-1])
        return TiledMLP.apply(mlp, self, x, shards, [p for p in self.parameters() if p.requires_grad])

    for module in model.modules():
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = types.MethodType(tiled, module)


class SequenceParallelRunner(EngineRunner):
    """Each micro-batch sliced along the sequence for this rank; the loss summed over the slice, divided by the
    whole micro-batch's target tokens (see the module's docstring)."""

    def __init__(self, engine, mpu, loss_scale: int, tiled_loss: bool = False):
        super().__init__(engine)
        self.group = mpu.get_sequence_parallel_group()
        self.size, self.rank = mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()
        self.loss_scale, self.tiled_loss = loss_scale, tiled_loss
        self.loss_parts = self.size  # each rank's train loss is its slice's part of the micro-batch's
        model = engine.module.get_base_model() if hasattr(engine.module, "get_base_model") else engine.module
        self.head = model.get_output_embeddings()

    def _slice(self, batch) -> tuple[dict, object, int]:
        """-> (model inputs of this rank's slice, its shifted labels, the micro-batch's target tokens: the
        collator's host count, bench/data.py MicroBatch, so nothing is read back from the device)."""
        import torch
        ids, labels = batch["input_ids"], batch["labels"]
        b, s = ids.shape
        shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE)], dim=1)
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(s, device=ids.device).expand(b, s)
        part = slice(self.rank * s // self.size, (self.rank + 1) * s // self.size)
        # no attention mask: Ulysses attends causally over the gathered sequence, which is exact for the harness's
        # right-padded rows (a real token never looks right, at the padding); packed rows are confined to each
        # sample by the whole row's document offsets, which every rank of the group holds (bench/attention.py)
        inputs = {"input_ids": ids[:, part], "position_ids": positions[:, part],
                  **{k: batch[k] for k in KWARGS if k in batch}}
        return inputs, shifted[:, part], batch.target_tokens

    def _loss_sum(self, out, labels):
        import torch.nn.functional as F
        logits = out.logits.float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")

    def _hidden_states(self, inputs: dict):
        """The model's forward up to the LM head: its input is taken and the head gets an empty slice, so no
        logits are made (the engine's own forward still runs, ZeRO-3's parameter fetching included)."""
        kept = {}

        def take(module, args):
            kept["h"] = args[0]
            return (args[0][:, :0],)

        handle = self.head.register_forward_pre_hook(take)
        try:
            out = self.engine(**inputs)
        finally:
            handle.remove()
        return out, kept["h"]

    def _tiled_loss(self, hidden, labels, scale: float):
        """DeepSpeed's TiledFusedLogitsLoss: head and cross-entropy slice by slice, their backward run at once. It
        backpropagates 1 into each slice, so the slices' sums carry every factor the gradient needs (scale);
        -> the scaled loss, to pass to engine.backward as it is."""
        import torch.nn.functional as F
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss
        vocab = self.head.weight.ds_shape[0] if hasattr(self.head.weight, "ds_shape") else self.head.weight.shape[0]
        shards = tile_count(hidden.shape[0] * hidden.shape[1] * vocab * 4, 2 ** 30)

        def loss_fn(head, x, y):
            logits = head(x).float()
            return F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum") * scale

        return TiledFusedLogitsLoss.apply(loss_fn, self.head, hidden, labels, None, shards,
                                          [p for p in self.head.parameters() if p.requires_grad], "sum")

    def forward(self, batch: dict):
        """This rank's slice through the model; the loss too, unless tiled (then it is made in backward, outside
        the counted forward, never keeping the log-probabilities)."""
        inputs, labels, tokens = self._slice(batch)
        if self.tiled_loss:
            out, hidden = self._hidden_states(inputs)
            return out, (hidden, labels, tokens)
        out = self.engine(**inputs)
        return out, self._loss_sum(out, labels) / max(tokens, 1)

    def backward(self, out, pending):
        """-> this rank's part of the micro-batch's loss: the parts of a group add up to it (loss_parts). They are
        added up by the training loop's per-step gather, after the timed step: no collective of the harness's own
        inside it."""
        if self.tiled_loss:  # the head's gradient is made inside, before the engine divides by gas: pre-divide
            hidden, labels, tokens = pending
            gas = self.engine.gradient_accumulation_steps()
            scaled = self._tiled_loss(hidden, labels, self.loss_scale / (max(tokens, 1) * gas))
            self.engine.backward(scaled * gas)
            loss = scaled.detach() * gas / self.loss_scale
        else:
            loss = pending
            self.engine.backward(loss * self.loss_scale)
        return loss.detach()

    def eval_loss(self, batch: dict) -> float:
        import torch.distributed as dist
        inputs, labels, tokens = self._slice(batch)
        if self.tiled_loss:
            part = self._tiled_loss(self._hidden_states(inputs)[1], labels, 1.0)
        else:
            part = self._loss_sum(self.engine(**inputs), labels)
        dist.all_reduce(part, group=self.group)
        return float(part) / max(tokens, 1)
