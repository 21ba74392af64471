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

from bench.config import BenchError, zero_stage
from bench.strategies.base import EngineRunner, Strategy
from bench.strategies.common import reject_foreign_sections

IGNORE = -100


def check_sp(cfg, ds: dict, layout, model_config) -> None:
    sp = layout.sp
    if sp <= 1:
        raise BenchError(f"--strategy sp needs \"sequence_parallel_size\": N>1 in {cfg.ds_config} "
                         "(see ds_configs/sp2.json)")
    if "pipeline" in ds:
        raise BenchError("sequence parallelism with pipeline parallelism is refused: DeepSpeed's Ulysses attention "
                         "runs inside whole models, not pipeline stages; use --strategy sp or --strategy pp")
    if cfg.seq_len % sp:
        raise BenchError(f"--seq_len {cfg.seq_len} is not divisible by the sequence-parallel size {sp}; choose a "
                         f"multiple of {sp}")
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % sp or (kv % sp and sp % kv):
        raise BenchError(f"sequence-parallel size {sp} must divide the attention heads ({heads}) and divide or be a "
                         f"multiple of the key/value heads ({kv}) of {cfg.model}")
    if cfg.attn_implementation == "eager":
        raise BenchError("--attn_implementation eager cannot run under sequence parallelism (it needs the whole "
                         "4-D attention mask); use sdpa or flash_attention_2")
    if zero_stage(ds) not in (0, 1, 2, 3):
        raise BenchError(f"zero_optimization.stage must be 0-3, got {zero_stage(ds)!r}")


class SequenceParallel(Strategy):
    name, default_peft = "sp", "none"

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        check_sp(cfg, ds, layout, model_config)
        reject_foreign_sections("sp", ds, allowed=("sequence_parallel_size",))

    def prepare(self, model, cfg, ds: dict):
        """Ulysses attention in place of the model's own (registered with transformers) and DeepSpeed's
        sequence-parallel groups, which deepspeed.initialize gets as its mpu."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from bench.models import head_dim
        config = model.config.get_text_config()
        if getattr(config, "head_dim", None) is None:  # Mixtral's config holds head_dim=None, which DeepSpeed takes
            config.head_dim = head_dim(config)         # for the width itself: set what the layers computed
        self.mpu = UlyssesSPAttentionHF.register_with_transformers(
            model, core_attn_implementation=cfg.attn_implementation,
            sequence_parallel_size=ds["sequence_parallel_size"], micro_batch_size=ds["train_micro_batch_size_per_gpu"],
            seq_length=cfg.seq_len, seq_length_is_variable=True)
        self.loss_scale = ds["sequence_parallel_size"] if zero_stage(ds) == 3 else 1
        return model

    def build_runner(self, engine, device):
        return SequenceParallelRunner(engine, self.mpu, self.loss_scale)


class SequenceParallelRunner(EngineRunner):
    """Each micro-batch sliced along the sequence for this rank; the loss summed over the slice, divided by the
    whole micro-batch's target tokens (see the module's docstring)."""

    def __init__(self, engine, mpu, loss_scale: int):
        super().__init__(engine)
        self.group = mpu.get_sequence_parallel_group()
        self.size, self.rank = mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()
        self.loss_scale = loss_scale

    def _slice(self, batch: dict) -> tuple[dict, object, int]:
        """-> (model inputs of this rank's slice, its shifted labels, the micro-batch's target tokens)."""
        import torch
        ids, labels = batch["input_ids"], batch["labels"]
        b, s = ids.shape
        shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE)], dim=1)
        positions = torch.arange(s, device=ids.device).expand(b, s)
        part = slice(self.rank * s // self.size, (self.rank + 1) * s // self.size)
        # no attention mask: Ulysses attends causally over the gathered sequence, which is exact for the harness's
        # right-padded batches (a real token never looks right, at the padding)
        inputs = {"input_ids": ids[:, part], "position_ids": positions[:, part]}
        return inputs, shifted[:, part], int((shifted != IGNORE).sum())

    def _loss_sum(self, out, labels):
        import torch.nn.functional as F
        logits = out.logits.float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")

    def _step(self, micro_batches: list[dict], counter=None):
        import contextlib
        import torch.distributed as dist
        loss_sum = 0.0
        for i, b in enumerate(micro_batches):
            inputs, labels, tokens = self._slice(b)
            with counter.forward(i) if counter else contextlib.nullcontext():
                out = self.engine(**inputs)
                loss = self._loss_sum(out, labels) / max(tokens, 1)
            if counter:
                counter.after_forward(out)
            self.engine.backward(loss * self.loss_scale)
            if counter and i == len(micro_batches) - 1:
                counter.at_boundary()
            self.engine.step()
            whole = loss.detach().clone()
            dist.all_reduce(whole, group=self.group)  # the micro-batch's loss: the slices' parts add up
            loss_sum = loss_sum + whole
        return loss_sum / len(micro_batches)

    def eval_loss(self, batch: dict) -> float:
        import torch.distributed as dist
        inputs, labels, tokens = self._slice(batch)
        part = self._loss_sum(self.engine(**inputs), labels)
        dist.all_reduce(part, group=self.group)
        return float(part) / max(tokens, 1)
