"""LoRA adapters that follow AutoTP's split (DeepSpeed has none: its AutoTP replaces peft's wrapped layers whole).

peft wraps the projections first, on the whole model, so every rank starts from the one-process adapters. Inside
deepspeed.initialize, AutoTP must see plain nn.Linear layers: the wrappers step aside for its partitioning and
come back around the TP layer it built, before the optimizer is created. Each adapter then follows its layer:

- column-parallel base (q/k/v/gate/up; output split): B is split along the output like the base weight, A is
  replicated. A's output passes DeepSpeed's ColumnParallel (identity forward, all-reduce backward), so A's
  gradient and the input's gradient through the adapter are whole on every rank.
- row-parallel base (o/down; input split, output all-reduced): A is split along the input like the base weight,
  B is replicated. A's partial product passes DeepSpeed's RowParallel (all-reduce forward, identity backward),
  so B sees the whole rank-r activation and its gradient is whole on every rank.

Each costs one all-reduce of tokens x r elements per layer per micro-batch (r / out of the layer's own output
reduction). The split tensor is marked tensor_model_parallel, as AutoTP marks its shards, so ZeRO's gradient
norm counts it on every TP rank and the replicated tensor once.
"""
from __future__ import annotations

import contextlib
import functools

from bench.config import BenchError


def detach_wrappers(model) -> list[tuple]:
    """Put each peft LoRA layer's base layer in its place; -> [(parent, attribute, wrapper, name)] to restore."""
    from peft.tuners.lora import LoraLayer
    detached = []
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                setattr(module, attr, child.base_layer)
                detached.append((module, attr, child, f"{name}.{attr}" if name else attr))
    return detached


def reattach(detached: list[tuple]) -> None:
    """Each wrapper back around whatever now stands in its place (AutoTP's layer), its adapter split to match."""
    for parent, attr, wrapper, name in detached:
        base = getattr(parent, attr)
        wrapper.base_layer = base
        follow_split(wrapper, base, name)
        setattr(parent, attr, wrapper)


def follow_split(wrapper, base, name: str) -> None:
    from deepspeed.module_inject.layers import (ColumnParallel, LinearAllreduce, LinearLayer, RowParallel,
                                                TensorParallel_Layer)
    if not isinstance(base, TensorParallel_Layer) or not base.is_tp_parallel:
        return  # left whole by AutoTP: the adapter is an ordinary replicated parameter
    kind = type(base)
    column = kind is LinearLayer and not base.gather_output
    row = kind is LinearAllreduce  # (not its subclass that scatters a replicated input itself)
    if not (column or row):
        raise BenchError(f"--lora_targets: AutoTP made {name} a {kind.__name__}, whose split a LoRA adapter cannot "
                         "follow here; target the attention and MLP projections (q/k/v/o/gate/up/down_proj)")
    group, sizes, index = base.mp_group, base._partition_sizes, base.tp_index
    for adapter in wrapper.lora_A:
        a, b = wrapper.lora_A[adapter], wrapper.lora_B[adapter]
        split, dim = (b.weight, 0) if column else (a.weight, 1)
        split.data = split.data.split(sizes, dim=dim)[index].contiguous()
        if split is a.weight:
            a.in_features = split.shape[1]
        else:
            b.out_features = split.shape[0]
        split.tensor_model_parallel = True
        split.gather_whole = functools.partial(base._all_gather_shards, partition_sizes=sizes, dim=dim)
        if column:
            a.register_forward_hook(lambda m, i, out, g=group: ColumnParallel.apply(g, out))
        else:
            a.register_forward_hook(lambda m, i, out, g=group: RowParallel.apply(g, out, False))


@contextlib.contextmanager
def adapters_follow_autotp(model):
    """Around deepspeed.initialize: the wrappers step aside for AutoTP's partitioning and return, split, right
    after it (the engine builds its optimizer later from the module's parameters, adapters included)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.tensor_parallel.config import _get_hf_tp_plan
    original = DeepSpeedEngine._apply_autotp_partitioning
    # AutoTP reads the model-level part of Hugging Face's tp_plan (the LM head's split) from the model's own
    # class; peft's wrapper class has none, so without this the head would stay whole under LoRA.
    plan = _get_hf_tp_plan(model.get_base_model())
    if plan:
        model._tp_plan = plan
    detached = detach_wrappers(model)

    def partition_then_reattach(self, module, tp_config):
        sources = original(self, module, tp_config)
        reattach(detached)
        loss_reaches_base_model(model)
        return sources

    DeepSpeedEngine._apply_autotp_partitioning = partition_then_reattach
    try:
        yield
    finally:
        DeepSpeedEngine._apply_autotp_partitioning = original


def loss_reaches_base_model(model) -> None:
    """A tied LM head becomes vocabulary-parallel under AutoTP (its logits stay split) and DeepSpeed installs the
    matching loss as the given module's `loss_function` (engine.py `finalize_autotp` ->
    sequence/cross_entropy.py `_set_vocab_parallel_loss`). Given the peft wrapper, that attribute lands on the
    wrapper, while the base model's forward calls its own: hand it down, or the stock loss meets split logits."""
    loss = vars(model).get("loss_function")
    if loss is not None:
        model.get_base_model().loss_function = loss


def whole(param):
    """The whole tensor of a split adapter (a collective over its TP group), else the parameter itself."""
    gather = getattr(param, "gather_whole", None)
    return gather(param.data) if gather else param.data
