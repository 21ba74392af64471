"""Loading a model so that a rank materializes only what it keeps (docs/planner.md, "Loading").

Model-parallel strategies (AutoTP, AutoEP, TP x EP, pipeline) build the model on the meta device: names and
shapes, no bytes. Each parameter is materialized on the rank's device at the moment it is needed, from its
`Weights` (a local safetensors checkpoint, read one tensor at a time, or the seeded random init):

- a weight AutoTP splits: whole, just before DeepSpeed's own partitioning slices it (`_tp_partition` of every
  deepspeed/module_inject/layers.py TensorParallel_Layer), which keeps the slice and frees the rest: one whole
  tensor at a time is the transient (from a checkpoint, a column or row split reads only the rank's slice);
- experts AutoEP distributes: only this rank's experts (deepspeed/moe/ep_repack.py `repack_expert_weights`, given
  a stand-in holding just the local rows), read expert by expert from the checkpoint;
- a pipeline stage: only the layers PipelineModule keeps (deepspeed/runtime/pipe/module.py `_build`), the others
  stay on the meta device;
- everything else (norms, the router, an unsplit embedding, LoRA's adapters): whole, before the engine moves the
  module to its device (runtime/engine.py `_configure_distributed_model`).

The random init is defined here, per parameter name, so a sharded rank and one process draw the same values
without the whole model: N(0, initializer_range) for matrices (each expert of a 3-D expert tensor its own
stream), ones for norm weights, zeros for biases, and peft's LoRA init (A uniform in +-1/sqrt(in), B zero).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import zlib

import torch

from bench.config import BenchError

PEFT_PREFIX = "base_model.model."


def canonical(name: str) -> str:
    """A parameter's name in the plain Hugging Face model (checkpoint names): peft's prefix and base_layer out."""
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")


# ---------------------------------------------------------------------------------------------------------
# Where values come from

class Weights:
    """The values of every parameter by canonical name: from a local safetensors checkpoint (`checkpoint`), else
    the seeded random init. `rows(name, start, end)` is rows [start, end) of a 3-D expert tensor, read or drawn
    without the others."""

    def __init__(self, model_config, seed: int, checkpoint: str | None = None):
        self.config, self.seed = model_config, seed
        self.files = _safetensors_index(checkpoint) if checkpoint else None

    # -- random init
    def _generator(self, name: str, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))

    def _drawn(self, name: str, shape, device) -> torch.Tensor:
        """fp32, so a bf16 run starts from the fp32 run's values rounded."""
        g = self._generator(name, device)
        if ".lora_B." in name or name.endswith(".bias"):
            return torch.zeros(shape, device=device)
        if ".lora_A." in name:  # peft: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / shape[1] ** 0.5
            return torch.empty(shape, device=device).uniform_(-bound, bound, generator=g)
        if len(shape) == 1:
            return torch.ones(shape, device=device)
        return torch.empty(shape, device=device).normal_(0.0, self.config.initializer_range, generator=g)

    # -- the checkpoint
    def _read(self, key: str, device) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.files[key], "pt", device=str(device)) as f:
            value = f.get_tensor(key)
        # on the CPU the tensor is a view of the file's mapping, paged in only when first touched: a copy, so the
        # rank holds (and the load measures) what it keeps
        return value.clone() if value.device.type == "cpu" else value

    def _read_rows(self, key: str, start: int, end: int, device) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.files[key], "pt", device=str(device)) as f:
            value = f.get_slice(key)[start:end]
        return value.clone() if value.device.type == "cpu" else value

    def slice(self, name: str, dim: int, start: int, size: int, device) -> torch.Tensor:
        """[start, start + size) along dim 0 or 1 of a checkpoint's 2-D (or, dim 0, 1-D) tensor, read alone."""
        from safetensors import safe_open
        key = self._key(name)
        with safe_open(self.files[key], "pt", device=str(device)) as f:
            part = f.get_slice(key)
            value = part[start:start + size] if dim == 0 else part[:, start:start + size]
        return value.clone() if value.device.type == "cpu" else value

    def _legacy_experts(self, name: str):
        """Mixtral checkpoints keep one tensor per expert (block_sparse_moe.experts.E.w1/w2/w3), which transformers
        fuses at load into mlp.experts.gate_up_proj = [w1; w3] and down_proj = w2 (conversion_mapping.py)."""
        m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if not m:
            return None
        key = m.group(1) + ".block_sparse_moe.experts.{}.{}.weight"
        parts = ("w1", "w3") if m.group(2) == "gate_up_proj" else ("w2",)
        return [key.format("{}", p) for p in parts]

    def _key(self, name: str) -> str:
        if name in self.files:
            return name
        legacy = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        if legacy in self.files:
            return legacy
        raise BenchError(f"the checkpoint has no tensor for {name} (looked for {name!r} and {legacy!r}); is it "
                         "a checkpoint of this architecture?")

    def full(self, name: str, shape, dtype, device) -> torch.Tensor:
        if self.files is None or ".lora_" in name:  # adapters are never in the base model's checkpoint
            if len(shape) == 3:  # experts: one stream per expert, so a rank can draw only its own
                return self.rows(name, 0, shape[0], shape, dtype, device)
            return self._drawn(name, shape, device).to(dtype)
        if self._legacy_experts(name) and name not in self.files:
            return self.rows(name, 0, shape[0], shape, dtype, device)
        value = self._read(self._key(name), device)
        if tuple(value.shape) != tuple(shape):
            raise BenchError(f"checkpoint tensor for {name} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(shape)}")
        return value.to(dtype)

    def rows(self, name: str, start: int, end: int, shape, dtype, device) -> torch.Tensor:
        """Rows [start, end) of the 3-D expert tensor `name` of full shape `shape`."""
        if self.files is None:
            return torch.stack([self._drawn(f"{name}.{e}", shape[1:], device) for e in range(start, end)]).to(dtype)
        if name in self.files:
            return self._read_rows(name, start, end, device).to(dtype)
        keys = self._legacy_experts(name)
        if keys is None or keys[0].format(start) not in self.files:
            raise BenchError(f"the checkpoint has no tensor for {name}; is it a checkpoint of this architecture?")
        return torch.stack([torch.cat([self._read(k.format(e), device) for k in keys]) for e in range(start, end)]
                           ).to(dtype)


def _safetensors_index(directory: str) -> dict[str, str]:
    """{tensor name: file} of a Hugging Face checkpoint directory (one file or a sharded index)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            return {k: os.path.join(directory, f) for k, f in json.load(fh)["weight_map"].items()}
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise BenchError(f"{directory} has no .safetensors weights; a model-parallel run loads each rank's shard "
                         "from safetensors (convert the checkpoint with transformers' save_pretrained)")
    from safetensors import safe_open
    out = {}
    for path in files:
        with safe_open(path, "pt") as f:
            out.update({k: path for k in f.keys()})
    return out


# ---------------------------------------------------------------------------------------------------------
# Materializing

class Materializer:
    """Fills the meta parameters of one model from its Weights, on `device`, keeping every parameter's identity
    (torch.utils.swap_tensors: tied weights, peft's wrappers and the pipeline's stages keep pointing at it)."""

    def __init__(self, model, weights: Weights, device):
        self.weights, self.device = weights, device
        self.names = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), canonical(n))  # a tied weight: by its first name, the embedding's

    def fill_adapters(self, model) -> None:
        """LoRA's adapters, whole, before deepspeed.initialize: tensor parallelism splits some of them
        (bench/strategies/tp_lora.py), and a split must be of the one-process values."""
        self.fill_module(model, only=lambda name: ".lora_" in name)

    def fill(self, param, overwrite: bool = False) -> None:
        """A meta parameter gets its values; a real one only with `overwrite` (in place, on its own device)."""
        if not (param.is_meta or overwrite):
            return
        value = self.weights.full(self.names[id(param)], param.shape, param.dtype,
                                  self.device if param.is_meta else param.device)
        if param.is_meta:
            torch.utils.swap_tensors(param, torch.nn.Parameter(value, requires_grad=param.requires_grad))
        else:
            with torch.no_grad():
                param.copy_(value)

    def fill_slice(self, param, dim: int, sizes, index: int) -> None:
        """A meta parameter as a whole-shaped tensor of which only part `index` of its split along `dim` into
        `sizes` is read from the checkpoint (the part AutoTP keeps)."""
        if not param.is_meta:
            return
        start = sum(sizes[:index])
        value = torch.empty(param.shape, dtype=param.dtype, device=self.device)
        value.narrow(dim, start, sizes[index]).copy_(
            self.weights.slice(self.names[id(param)], dim, start, sizes[index], self.device))
        torch.utils.swap_tensors(param, torch.nn.Parameter(value, requires_grad=param.requires_grad))

    def fill_module(self, module, only=None) -> None:
        """Every meta parameter (whose canonical name passes `only`) and buffer of `module`."""
        for p in module.parameters():
            if p.is_meta and (only is None or only(self.names[id(p)])):
                self.fill(p)
        if only is None:
            rebuild_buffers(module, self.device)

    def local_experts(self, experts, start: int, end: int) -> torch.nn.Module:
        """A stand-in for an experts module holding only rows [start, end) of each of its tensors."""
        stand_in = torch.nn.Module()
        for attr, p in experts.named_parameters(recurse=False):
            rows = self.weights.rows(self.names[id(p)], start, end, p.shape, p.dtype, self.device)
            stand_in.register_parameter(attr, torch.nn.Parameter(rows, requires_grad=p.requires_grad))
        return stand_in


def rebuild_buffers(module, device) -> None:
    """Meta buffers are computed, not loaded: the rotary embedding's inverse frequencies, rebuilt from its config."""
    for sub in module.modules():
        if not any(b.is_meta for b in sub.buffers(recurse=False)):
            continue
        if not hasattr(sub, "config") or not type(sub).__name__.endswith("RotaryEmbedding"):
            raise BenchError(f"cannot materialize the buffers of {type(sub).__name__} from the meta device")
        fresh = type(sub)(sub.config)
        for name, buf in fresh.named_buffers(recurse=False):
            setattr(sub, name, buf.to(device))


def materialize_whole(model, weights: Weights, device) -> None:
    Materializer(model, weights, device).fill_module(model)


def init_adapters(model, seed: int) -> None:
    """LoRA's adapters drawn by name (peft's init, seeded per tensor), so one process, every strategy and a meta
    build start from the same adapters; adapters on the meta device are filled with the rest of their shard."""
    mat = Materializer(model, Weights(model.config, seed), device=None)
    for name, p in model.named_parameters():
        if ".lora_" in name and not p.is_meta:
            mat.fill(p, overwrite=True)


def overwrite_partitioned(model, weights: Weights) -> None:
    """ZeRO-3 --init random: each parameter built under zero.Init gathered once and overwritten with the seeded
    init (every rank draws the same values), so ZeRO-3 starts from the weights every other strategy does."""
    import deepspeed
    mat = Materializer(model, weights, device=None)
    for p in model.parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            mat.fill(p, overwrite=True)


def shards_at_load(plan) -> bool:
    """Whether the layout splits the model itself (a dimension that splits_weights: TP, EP, PP): then each rank
    materializes only its shard. ZeRO-3 partitions at construction instead (deepspeed.zero.Init); the other layouts
    hold the whole model anyway."""
    return plan.zero_stage != 3 and any(d.splits_weights for d in plan.layout.declared())


@contextlib.contextmanager
def shards_only(mat: Materializer, placed=lambda: None):
    """Around deepspeed.initialize for a model-parallel model built on the meta device: DeepSpeed's partitioning
    steps see whole tensors one at a time (AutoTP) or only the local experts (AutoEP); what is still on the meta
    device is filled whole before the engine moves the module to its device, after which `placed()` is called
    (the load's memory is read there, before the engine builds its optimizer)."""
    from deepspeed.module_inject import auto_ep_layer, layers
    from deepspeed.moe import ep_repack
    from deepspeed.runtime import engine as engine_module
    from deepspeed.utils.debug import debug_extract_module_and_param_names
    patches = []

    def patch(owner, attr, make):
        original = getattr(owner, attr)
        patches.append((owner, attr, original))
        setattr(owner, attr, make(original))

    # The layers whose _tp_partition keeps `split(_partition_sizes, dim)[tp_index]` of a tensor (weight, and for a
    # column split its bias): from a checkpoint only that slice is read, into a whole-shaped tensor whose other
    # rows stay unwritten (the rank still allocates the whole tensor for DeepSpeed to slice, but reads 1/tp of it).
    sliced = {layers.LinearLayer: 0, layers.LinearAllreduce: 1}

    def partition(original):
        def run(self, params_list):
            dim = sliced.get(type(self)) if mat.weights.files is not None else None
            for i, p in enumerate(params_list):
                if p is not None and dim is not None and (i == 0 or dim == 0):
                    mat.fill_slice(p, dim, self._partition_sizes, self.tp_index)
                elif p is not None:
                    mat.fill(p)
            return original(self, params_list)
        return run

    for cls in _subclasses(layers.TensorParallel_Layer):
        if "_tp_partition" in vars(cls):
            patch(cls, "_tp_partition", partition)

    def repack(original):
        def run(experts_source, spec, ep_rank, ep_size):
            if not any(p.is_meta for p in experts_source.parameters()):
                return original(experts_source, spec, ep_rank, ep_size)
            start, end = ep_repack._local_expert_range(spec, ep_rank, ep_size)
            # rank 0 of the same EP size owns rows [0, end - start): exactly the stand-in's
            return original(mat.local_experts(experts_source, start, end), spec, 0, ep_size)
        return run
    patch(auto_ep_layer, "repack_expert_weights", repack)

    def moe_layer(original):
        def init(self, spec, source_module, *args, **kwargs):
            experts = getattr(source_module, spec.experts_name)
            mine = {id(p) for p in experts.parameters()}
            for p in source_module.parameters():  # the router: copied whole by AutoEP
                if id(p) not in mine:
                    mat.fill(p)
            return original(self, spec, source_module, *args, **kwargs)
        return init
    patch(auto_ep_layer.AutoEPMoELayer, "__init__", moe_layer)

    # The engine's debug name map holds a weakref finalizer on every parameter (deepspeed/utils/debug.py), which
    # torch.utils.swap_tensors refuses: it is taken once every parameter is filled, of the parameters then held.
    patch(engine_module, "debug_extract_module_and_param_names", lambda original: lambda model: None)

    def distributed(original):
        def run(self, module):
            mat.fill_module(module)
            debug_extract_module_and_param_names(module)
            out = original(self, module)
            placed()
            return out
        return run
    patch(engine_module.DeepSpeedEngine, "_configure_distributed_model", distributed)
    try:
        yield mat
    finally:
        for owner, attr, original in reversed(patches):
            setattr(owner, attr, original)


@contextlib.contextmanager
def stage_layers_only(mat: Materializer):
    """Around building PipelineModule: once it has kept this stage's layers (`_build`), fill those; the other
    stages' layers stay on the meta device."""
    from deepspeed.pipe import PipelineModule
    original = PipelineModule._build

    def build(self):
        original(self)
        mat.fill_module(self)
    PipelineModule._build = build
    try:
        yield
    finally:
        PipelineModule._build = original


@contextlib.contextmanager
def host_memory_returned():
    """While loading: every host allocation of 1 MiB or more is its own mapping, returned to the system when freed.
    glibc otherwise raises its mmap threshold to the largest block freed so far (up to 32 MiB), so each whole
    tensor freed after its shard was kept stays in the heap as a hole the next, larger tensor does not fit: on the
    CPU, where host memory is the device, that is 20-25 % of a shard again (measurements/load_memory.py).
    Afterwards the threshold is glibc's dynamic ceiling, 32 MiB, so training allocates as before. Elsewhere than
    glibc: nothing."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    m_mmap_threshold = -3  # malloc.h
    mallopt(m_mmap_threshold, 2 ** 20)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 * 2 ** 20)


def _subclasses(cls) -> list:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out
