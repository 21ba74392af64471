"""What PyTorch's own data-parallel engines (ddp.py, fsdp2.py) share behind the seam: the optimizer, gradient
accumulation, clipping and checkpoint files, read from the same resolved ds_config a DeepSpeed run of the job gets
(batch sizes, optimizer and its parameters, gradient_clipping), so a comparison differs in the engine alone.

As DeepSpeed does for a ZeRO run (runtime/engine.py `backward`: the loss divided by gradient_accumulation_steps;
`_take_model_step`: clip, step, zero the gradients at the boundary; `get_global_grad_norm`: the norm before
clipping), so the two compute the same update from the same gradients:
- backward takes loss / grad_accum; gradients are averaged over the data-parallel ranks by the engine's reduction;
- step(), after every micro-batch, applies the update at the accumulation boundary: clip_grad_norm_ (its return
  value, the norm before clipping, is grad_norm()), optimizer.step(), zero_grad(set_to_none=True).

In bf16 (`--precision bf16`) they train as PyTorch's own recipes do, with what DeepSpeed's bf16 keeps: the model
arrives in bf16 (built as for DeepSpeed), the trained parameters become fp32 master weights (upcast from those
bf16 values, as DeepSpeed's bf16 optimizer makes its fp32 copy) while frozen ones stay bf16, the forward and
backward compute in bf16 and the gradients are reduced and applied in fp32: FSDP2 through its
MixedPrecisionPolicy, DDP through torch.autocast.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from bench.config import BenchError
from bench.engines.base import Engine

# the DeepSpeed-only keys of an optimizer's params (DeepSpeed reads them, torch.optim does not take them)
_DS_ONLY = ("torch_adam", "adam_w_mode", "fp32_optimizer_states")


def make_optimizer(ds: dict, params) -> torch.optim.Optimizer:
    """torch.optim.AdamW with the ds_config's parameters: what DeepSpeed builds for "type": "AdamW" with
    torch_adam (runtime/engine.py _configure_basic_optimizer) on the CPU, and what these engines use everywhere."""
    section = ds.get("optimizer") or {}
    kind = str(section.get("type", "AdamW"))
    if kind.lower() not in ("adamw", "adam"):
        raise BenchError(f"the {ds.get('engine')} engine builds torch.optim.AdamW; the ds_config asks for {kind}")
    kw = {k: v for k, v in (section.get("params") or {}).items() if k not in _DS_ONLY}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    if kind.lower() == "adam":  # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false
        if not (section.get("params") or {}).get("adam_w_mode", True):
            return torch.optim.Adam(params, **kw)
    return torch.optim.AdamW(params, **kw)


def keep_master_weights(model, compute_dtype) -> None:
    """Under bf16 the trained parameters in fp32 (the optimizer's and the gradients' dtype), the frozen ones as
    built (bf16): the dtypes DeepSpeed's bf16 holds, less its second, bf16 copy of the trained weights."""
    if compute_dtype == torch.float32:
        return
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


# torch.distributed's collectives by kind (accounting.COMM_KINDS' names) -> (kind, position, keyword) of the tensor
# a call is counted by, as DeepSpeed's comms logger counts its own calls (deepspeed/comm/utils.py
# get_tensor_position: the argument named "tensor"): an all-gather's input shard, a reduce-scatter's whole input
_COUNTED = {"all_gather_single": ("all_gather", 1, "input"),
            "all_gather_into_tensor": ("all_gather", 1, "input_tensor"),
            "reduce_scatter_single": ("reduce_scatter", 1, "input"),
            "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
            "all_reduce": ("all_reduce", 0, "tensor"), "broadcast": ("broadcast", 0, "tensor")}


class TorchCommCounter:
    """Bytes and calls of the collectives a PyTorch engine issues while active, by kind, counted as
    accounting.CommCounter counts DeepSpeed's: torch.distributed's collectives called from Python (FSDP2's
    all-gathers and reduce-scatters, torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py), wrapped while
    active, DDP's bucket all-reduces among them (its Python comm hook: DDPEngine). Not seen: collectives
    traced as functional collectives (FSDP2's gradient-norm all-reduce of one scalar per step)."""

    def __init__(self):
        self.bytes, self.calls = {}, {}

    def add(self, kind: str, tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def __enter__(self):
        self._saved = {name: getattr(dist, name) for name in _COUNTED if hasattr(dist, name)}
        for name, fn in self._saved.items():
            kind, position, keyword = _COUNTED[name]

            def counted(*args, _fn=fn, _kind=kind, _at=position, _key=keyword, **kw):
                self.add(_kind, args[_at] if len(args) > _at else kw[_key])
                return _fn(*args, **kw)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


class TorchEngine(Engine):
    """The shared part; a subclass wraps the model (`wrap`), says which forward skips the gradient reduction
    (`_sync_context`) and how its states are saved (`_state`, `_load_state`)."""

    def __init__(self, wrapped, module, optimizer, plan):
        self.wrapped, self.module, self.optimizer = wrapped, module, optimizer
        self.compute_dtype = plan.dtype
        self.grad_accum = plan.batch.grad_accum
        self.clip = float(plan.ds.get("gradient_clipping") or 0.0)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._micro, self._norm = 0, None

    @property
    def at_boundary(self) -> bool:
        """Whether the micro-batch now running is its optimizer step's last."""
        return (self._micro + 1) % self.grad_accum == 0

    def __call__(self, **batch):
        with self._sync_context(), self._precision_context():
            return self.wrapped(**batch)

    def _sync_context(self):
        raise NotImplementedError

    def _precision_context(self):
        return contextlib.nullcontext()  # FSDP2: its MixedPrecisionPolicy casts

    def backward(self, loss) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        boundary = self.at_boundary
        self._micro += 1
        if not boundary:
            return
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        self._norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    comm_counter = TorchCommCounter  # what the runner counts the second step's communication with (accounting.py)

    @property
    def skipped_steps(self) -> int:
        return 0  # no loss scaling: every update is applied

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> float | None:
        return self._norm

    def train(self) -> None:
        self.wrapped.train()

    def eval(self) -> None:
        self.wrapped.eval()

    def describe(self) -> dict:
        groups = self.optimizer.param_groups
        kinds = {t: ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in self.module.parameters()
                                     if p.requires_grad == t})) or None for t in (True, False)}
        return {"optimizer": {"name": f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}",
                              "fused": bool(groups[0].get("fused")), "wrapper": None},
                "dtypes": {"trainable": kinds[True], "frozen": kinds[False], "grad_accum": kinds[True],
                           "compute": str(self.compute_dtype).removeprefix("torch.")}}

    # checkpoints: the engine's states (subclass), and each rank's own file of the harness's state
    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        path = os.path.join(ckpt_dir, tag)
        os.makedirs(path, exist_ok=True)
        self._save_state(path)
        mine = os.path.join(path, f"client_rank{dist.get_rank()}.pt")
        torch.save({"client": client_state, "micro": self._micro}, mine)

    def load(self, ckpt_dir: str, tag: str) -> dict | None:
        path = os.path.join(ckpt_dir, tag)
        mine = os.path.join(path, f"client_rank{dist.get_rank()}.pt")
        if not os.path.isfile(mine):
            return None
        self._load_state(path)
        saved = torch.load(mine, weights_only=False)
        self._micro = saved["micro"]
        return saved["client"]

    def _save_state(self, path: str) -> None:
        raise NotImplementedError

    def _load_state(self, path: str) -> None:
        raise NotImplementedError
