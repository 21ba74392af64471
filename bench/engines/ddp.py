"""PyTorch DistributedDataParallel behind the seam (the "ddp" engine, ds_configs/ddp.json): every rank holds the
whole model and its optimizer states; the gradients are averaged in buckets, all-reduced while backward runs
(torch/nn/parallel/distributed.py, its C++ Reducer). Beside DeepSpeed's ZeRO-0 (dp_zero0.json), the same job on
PyTorch's own data parallelism. In bf16, torch.autocast (PyTorch's mixed-precision recipe for DDP): fp32 master
weights and fp32 gradient buckets, bf16 matrix products."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from bench.engines.torch_base import TorchEngine, keep_master_weights, make_optimizer


class DDPEngine(TorchEngine):
    name = "ddp"

    @classmethod
    def create(cls, plan, model) -> "DDPEngine":
        from torch.nn.parallel import DistributedDataParallel
        device = next(model.parameters()).device
        keep_master_weights(model, plan.dtype)
        # a module whose parameters all have requires_grad is not required: frozen weights (LoRA) are left out
        # of the buckets by DDP itself
        # gradient_as_bucket_view: each .grad is a view into its all-reduce bucket, so the gradients are held once
        # (not in the buckets and again in .grad) and the accounting sees all DDP holds for them
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
        # DDP's default reduction, as a Python hook (torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py
        # allreduce_hook: "the same as the case where no hook was registered"), so that each bucket's all-reduce
        # passes through torch.distributed.all_reduce, where the accounting's counter sees it (torch_base.py)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        ddp.register_comm_hook(None, allreduce_hook)
        optimizer = make_optimizer(plan.ds, [p for p in model.parameters() if p.requires_grad])
        return cls(ddp, model, optimizer, plan)

    def _sync_context(self):
        # the reduction happens in the backward of a forward run with gradient sync on: only the boundary's
        return contextlib.nullcontext() if self.at_boundary else self.wrapped.no_sync()

    def _precision_context(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(next(self.module.parameters()).device.type, dtype=self.compute_dtype)

    def _save_state(self, path: str) -> None:
        if dist.get_rank() == 0:  # every replica holds the same states
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       os.path.join(path, "ddp_states.pt"))
        dist.barrier()

    def _load_state(self, path: str) -> None:
        states = torch.load(os.path.join(path, "ddp_states.pt"), map_location=next(self.module.parameters()).device,
                            weights_only=False)
        self.module.load_state_dict(states["model"])
        self.optimizer.load_state_dict(states["optimizer"])
