"""PyTorch FSDP2 behind the seam (the "fsdp2" engine, ds_configs/fsdp2*.json): `fully_shard` on every decoder layer
and on the root (torch/distributed/fsdp/_fully_shard), so each rank holds 1/world of every parameter, gradient and
optimizer state, all-gathers a layer's parameters before its forward and backward and reduce-scatters its
gradients after. `"fsdp2": {"reshard_after_forward": true}` frees the gathered parameters after forward and
gathers them again for backward (ZeRO-3's schedule; dp_zero3.json); false keeps them from forward to backward
(ZeRO-2's memory for parameters, one all-gather per step). In bf16, MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32): the fp32 shards are all-gathered as bf16 and the gradients reduce-scattered in fp32.
`"cpu_offload": true` keeps the shards, their gradients and Adam's states in host memory (CPUOffloadPolicy): each
unit is copied to the device to be gathered and its gradients back, and the optimizer steps on the CPU (as
ZeRO-3's offload_param and offload_optimizer, ds_configs/fsdp2_offload.json beside dp_zero3_offload.json)."""
from __future__ import annotations

import contextlib

import torch

from bench.engines.torch_base import TorchEngine, keep_master_weights, make_optimizer


def decoder_layers(model) -> list:
    """The decoder layers (transformers' GradientCheckpointingLayer subclasses, LLaMA's and Mixtral's), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class FSDP2Engine(TorchEngine):
    name = "fsdp2"

    @classmethod
    def create(cls, plan, model) -> "FSDP2Engine":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        keep_master_weights(model, plan.dtype)
        section = plan.ds.get("fsdp2") or {}
        options = {"reshard_after_forward": bool(section.get("reshard_after_forward", True)),
                   "mp_policy": MixedPrecisionPolicy(param_dtype=plan.dtype, reduce_dtype=torch.float32)}
        if section.get("cpu_offload"):  # pinned host memory where there is a device to copy to
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=plan.device_type == "cuda")
        for layer in decoder_layers(model):
            fully_shard(layer, **options)
        fully_shard(model, **options)
        optimizer = make_optimizer(plan.ds, [p for p in model.parameters() if p.requires_grad])
        return cls(model, model, optimizer, plan)

    def _sync_context(self):
        # FSDP2 keeps accumulating unsharded gradients without reduce-scattering until the boundary's backward
        self.wrapped.set_requires_gradient_sync(self.at_boundary)
        return contextlib.nullcontext()

    def _save_state(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model, "optimizer": optim}, checkpoint_id=f"{path}/fsdp2")

    def _load_state(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model, optim = get_state_dict(self.module, self.optimizer)
        state = {"model": model, "optimizer": optim}
        dcp.load(state, checkpoint_id=f"{path}/fsdp2")
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
