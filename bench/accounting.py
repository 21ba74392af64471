"""What each rank holds, counted from the tensors themselves (summary.json "accounting"; docs/metrics.md).

- params_bytes: the storages behind the module's parameters (under ZeRO-3, each parameter's partition, plus the
  whole parameter where it is gathered: the small "persistent" ones stay whole on every rank), each storage once:
  ZeRO-1/2's flat buffers hold every parameter as a view and count once, at their padded size.
- optimizer_bytes: the inner optimizer's states (Adam's exp_avg and exp_avg_sq, step counters) and the
  parameters it updates where they are not the module's own (ZeRO's fp32 master partitions).
- grads_bytes: at the accumulation boundary (after the step's last backward, before its update), the gradients
  the engine holds: the parameters' .grad and every other tensor the ZeRO optimizer holds that is neither a
  parameter, an optimizer state nor a reduction bucket (its gradient partitions).
- buffers_bytes: the ZeRO optimizer's reduction buckets held at that moment (ZeRO-3 keeps one for the whole run;
  ZeRO-1/2 free theirs after each backward, so they count 0 here: the planner adds them to the peak).
- activation_bytes: the tensors autograd saves for backward during one micro-batch's forward (saved-tensor
  hooks), each storage once, parameters excluded; logits_bytes: the logits tensor of that forward.

Counting storages, not tensors, is what makes views, flat buffers and tied weights count once. Meta tensors
(DeepSpeed keeps shape-only copies) hold no memory and count nothing.
"""
from __future__ import annotations

import contextlib

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this rank stores of t: a DTensor's local shard (FSDP2's parameters, gradients and Adam states)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta":
        return None
    s = t.untyped_storage()
    return (s.data_ptr(), t.device.type, t.device.index) if s.nbytes() else None


def storage_bytes(tensors, exclude: set = frozenset()) -> tuple[int, set]:
    """Bytes of the distinct non-empty storages behind tensors, leaving out the keys in exclude.
    -> (bytes, the keys counted)."""
    seen, total = set(), 0
    for t in map(_local, tensors):
        key = _storage_key(t)
        if key is None or key in exclude or key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total, seen


def _tensors_in(obj, depth: int = 4, path: str = ""):
    """(attribute path, tensor) for the tensors held in obj's lists, tuples and dicts and in the attributes of
    DeepSpeed's own helper objects (ZeRO keeps lists of lists, and its buckets in small objects), a few levels
    deep; modules are not entered (their parameters are counted as parameters)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif not depth or isinstance(obj, torch.nn.Module):
        return
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x, depth - 1, path)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth - 1, path)
    elif type(obj).__module__.startswith("deepspeed.") and hasattr(obj, "__dict__"):
        for name, x in vars(obj).items():
            yield from _tensors_in(x, depth - 1, f"{path}.{name}")


def _parameters(module):
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition this rank holds
            yield p.ds_tensor
        yield p  # empty (counts nothing) under ZeRO-3 unless gathered, as persistent parameters always are


def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer


def model_states(engine) -> dict:
    """params_bytes and optimizer_bytes (any time after deepspeed.initialize; the optimizer's states exist after
    the first update), and the keys they cover, for grads_bytes to leave out."""
    params, p_keys = storage_bytes(_parameters(engine.module))
    inner = _inner_optimizer(engine)
    held = [t for state in inner.state.values() for _, t in _tensors_in(state)]
    held += [p for group in inner.param_groups for p in group["params"]]
    optimizer, o_keys = storage_bytes(held, exclude=p_keys)
    return {"params_bytes": params, "optimizer_bytes": optimizer, "_keys": p_keys | o_keys}


def gradient_bytes(engine, exclude: set) -> tuple[int, int]:
    """-> (grads_bytes, buffers_bytes) (see the module docstring), called at the accumulation boundary."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    buckets = []
    if engine.optimizer is not _inner_optimizer(engine):  # a ZeRO optimizer: its gradient partitions and buckets
        for name, t in (x for attr, v in vars(engine.optimizer).items() for x in _tensors_in(v, path=attr)):
            (buckets if "ipg" in name else grads).append(t)  # ipg: its "independent partition gradient" buckets
    buffers, b_keys = storage_bytes(buckets, exclude=exclude)
    return storage_bytes(grads, exclude=exclude | b_keys)[0], buffers


class ActivationCounter:
    """Saved-for-backward bytes of the forwards run inside `with counter:`, each storage once. Parameters, which
    autograd saves by reference (under ZeRO-3: the gathered full weight, which is freed after use), and the
    storages in exclude (what the rank holds anyway) are left out."""

    def __init__(self, exclude: set = frozenset()):
        self.exclude, self.keys, self.bytes = exclude, set(), 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        key = None if isinstance(t, torch.nn.Parameter) else _storage_key(t)
        if key is not None and key not in self.keys and key not in self.exclude:
            self.keys.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


FIELDS = ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes", "activation_bytes",
          "logits_bytes", "comm_bytes_per_step", "comm_calls_per_step")  # summary.accounting.per_rank[], besides "rank"


class StepCounter:
    """Counts one training step of a DeepSpeedEngine as it runs (EngineRunner calls the hooks): the first
    micro-batch's forward under an ActivationCounter, the gradients at the accumulation boundary, and the model
    states after the update. -> result()."""

    def __init__(self, engine):
        self.engine = engine
        self.held = model_states(engine)["_keys"]  # what the rank holds anyway: not activations, not gradients
        self.activations = ActivationCounter(exclude=self.held)
        self.grads = self.buffers = self.logits = 0

    def forward(self, index: int):
        return self.activations if index == 0 else contextlib.nullcontext()

    def after_forward(self, out) -> None:
        self.logits = self.logits or out.logits.untyped_storage().nbytes()

    def at_boundary(self) -> None:
        # the parameters again: a ZeRO-3 gather may have given a whole parameter a new storage since __init__
        self.grads, self.buffers = gradient_bytes(self.engine, exclude=self.held | model_states(self.engine)["_keys"])

    def result(self) -> dict:
        states = model_states(self.engine)  # after the update: Adam's states exist now
        return {"params_bytes": states["params_bytes"], "grads_bytes": self.grads,
                "optimizer_bytes": states["optimizer_bytes"], "buffers_bytes": self.buffers,
                "activation_bytes": self.activations.bytes,
                "logits_bytes": self.logits}


INSTRUMENTED_STEPS = 2  # counted_step's first two steps of a process: never timed (bench/train.py)


def counted_step(accounting: dict, engine, run, comm_counter=None):
    """One training step of a runner that counts (EngineRunner, PipelineRunner): run(counter) does the step, with
    a StepCounter on the first (what the rank holds), under a CommCounter on the second (what it communicates:
    the first sets things up; comm_counter: an engine's own, bench/engines/torch_base.py), plainly after that. The
    counts go into `accounting`. -> run's loss."""
    if "comm_bytes_per_step" in accounting:  # every step after the second
        return run(None)
    if not accounting:
        counter = StepCounter(engine)
        loss = run(counter)
        accounting.update(counter.result())
        return loss
    with (comm_counter or CommCounter)() as comm:
        loss = run(None)
    accounting.update(comm_bytes_per_step=comm.bytes, comm_calls_per_step=comm.calls)
    return loss


# deepspeed.comm's collectives by kind (the function names its comms logger reports)
COMM_KINDS = {
    "all_reduce": ("all_reduce", "inference_all_reduce", "all_reduce_coalesced", "reduce"),
    "reduce_scatter": ("reduce_scatter_tensor", "reduce_scatter"),
    "all_gather": ("all_gather", "all_gather_into_tensor"),
    "all_to_all": ("all_to_all_single", "all_to_all"),
    "send_recv": ("send", "recv", "isend", "irecv", "batch_isend_irecv"),
    "broadcast": ("broadcast", "broadcast_object_list"),
}
_KIND_OF = {name: kind for kind, names in COMM_KINDS.items() for name in names}


class CommCounter:
    """Bytes and calls of DeepSpeed's collectives while active, by kind: what DeepSpeed's own comms logger sees
    (every call through deepspeed.comm; the harness's own bookkeeping uses torch.distributed and is not counted).
    A call's bytes are those of the tensor it names, as the logger counts them (deepspeed/comm/utils.py
    get_tensor_position: the argument named "tensor"): an all-gather's input shard, a reduce-scatter's whole input. The logger synchronizes the device around every call, so count one step only."""

    def __init__(self):
        self.bytes, self.calls = {}, {}

    def _append(self, raw_name, record_name, latency, msg_size):
        kind = _KIND_OF.get(raw_name, raw_name)
        self.bytes[kind] = self.bytes.get(kind, 0) + int(msg_size)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def __enter__(self):
        from deepspeed.comm import comm
        self._logger = comm.comms_logger
        self._saved = (self._logger.enabled, self._logger.prof_all)
        self._logger.enabled, self._logger.prof_all = True, True
        self._logger.append = self._append  # instead of its own record (which keeps every latency)
        return self

    def __exit__(self, *exc):
        self._logger.enabled, self._logger.prof_all = self._saved
        del self._logger.append  # the class's method again
