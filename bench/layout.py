"""How WORLD_SIZE ranks split: data parallelism times every model-parallel dimension, each declared by its own
module (bench/strategies: tp in autotp.py, ep in autoep.py, pp in pipeline.py, sp in ulysses.py) as a `Dimension`.

Layout composes whatever dimensions are registered; it names none of them. A dimension says where its ranks sit
in the rank mesh (`order`: consecutive ranks innermost; the data axis at DATA_ORDER), whether its ranks read
separate data (`streams`), whether ZeRO splits dense states over them (`zero_shards`), and which other dimensions
fold their groups over its ranks instead of adding ranks (`folds`: the combined layout's cross term, owned by one
of the two). `Layout.coords(rank)` is the only place rank topology is computed.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable

from bench.config import BenchError

DATA_ORDER = 50  # the data axis's place in the rank mesh: dimensions of a lower order are inside it


@dataclass(frozen=True)
class Dimension:
    """A model-parallel dimension, as its own module declares it."""
    key: str                          # its degree's name: Layout's attribute, summary.json's layout, a comm source
    section: str                      # the ds_config key that turns it on; strategies not made of it refuse it
    degree_key: str                   # where its degree is read, as messages name it
    degree: Callable[[dict], object]  # ds_config -> its degree (1 when off)
    comm_bytes: Callable[..., dict]   # (plan, rank, width) -> {kind: bytes} per step, on the critical path
    comm_calls: Callable[..., dict]   # (plan, rank) -> {kind: calls} per step of those collectives (each a latency)
    span: Callable[["Layout"], int]   # the ranks its collectives reach across (inside a node or not)
    gather_group: Callable[["Layout"], int]  # the ranks one of its all-gathers gathers from
    order: int | None = None          # its axis's place in the rank mesh (None: its groups lie in the data axis)
    streams: bool = False             # its ranks read separate data (more data-parallel streams)
    zero_shards: bool = False         # ZeRO splits dense parameters' states over its ranks too
    splits_sequence: bool = False     # each of its ranks holds a slice of every sequence
    splits_weights: bool = False      # its ranks hold different parts of the weights: a rank materializes only its
    #                                   own shard of a model built on the meta device (bench/loading.py)
    folds: tuple[str, ...] = ()       # dimensions whose groups fold over its ranks where it is on (adding none)
    coord: Callable[["Layout", int], int] | None = None  # a rank's place in it, where not its axis index
    flags: tuple[str, ...] = ()       # run flags (RunConfig fields) that need a strategy made of it
    # its terms of the planner's model (bench/estimate.py) beyond comm_bytes:
    drops_mask: bool = False          # its runner computes padded rows causally, passing attention no mask
    reduce_dtype: Callable[[dict], str] | None = None  # ds_config -> the dtype ZeRO's reductions run in under it
    tiles_mlp: Callable[..., bool] | None = None   # plan -> whether its runner tiles (and recomputes) dense MLPs
    tiles_loss: Callable[..., bool] | None = None  # plan -> whether its runner tiles the LM head and loss ...
    loss_slice: Callable[..., int] | None = None   # ... and (plan, (rows, width)) -> the bytes one slice holds
    # ... what a rank holds of the weights, what it runs and what it keeps while loading ...
    local_numel: Callable[..., Callable[[str, int], int]] | None = None  # plan -> (name, numel) -> a rank's part
    expert_group: Callable[["Layout", int], tuple[int, int]] | None = None  # (layout, rank) -> (degree, index) of
    #                                   the ranks holding the same experts: expert parameters form their own ZeRO group
    adapter_sizes: Callable[..., list] | None = None  # plan -> (name, numel on a rank) of every LoRA tensor
    placement: Callable[..., "Placement"] | None = None  # (plan, rank) -> the layers, embedding and head it runs
    in_flight: Callable[..., list[int]] | None = None  # plan -> micro-batches whose activations each rank holds
    load_transient: Callable[..., int] | None = None  # (plan, bytes per element) -> a rank's load peak beyond its
    #                                   shard: the whole tensor it slices its part from
    vocab_split: Callable[..., int] | None = None  # plan -> a rank's logits are the vocabulary divided by this
    expert_width_split: Callable[["Layout"], int] | None = None  # the experts' intermediate width divided by this
    saves_extra_q: bool = False       # measured: one more q-sized tensor per layer saved on rows without a mask
    # its terms of the cost model (bench/cost_model.py): how it shapes a decoder layer's GEMMs on a rank (TP's split
    # heads and MLP width are the planner's activation split too) ...
    gemm_split: Callable[["Layout"], int] | None = None  # each GEMM's split side divided by this (TP's columns/rows)
    expert_tokens: Callable[["Layout"], int] | None = None  # an expert's tokens multiplied by this (EP's exchange)
    # ... and, for a dimension that schedules micro-batches over its ranks:
    compute_share: Callable[..., float] | None = None  # plan -> the slowest rank's compute over the mean rank's
    idle: Callable[..., float] | None = None  # (plan, busy seconds of the slowest rank) -> its idle seconds per step
    defers_reduction: bool = False    # ZeRO's gradient reduction waits for the last micro-batch: nothing overlaps it
    representatives: Callable[["Layout"], list[int]] | None = None  # ranks that move every distinct byte count


@dataclass(frozen=True)
class Placement:
    """What part of the model's depth a rank runs (a pipeline stage's; WHOLE: all of it)."""
    layers: set | None        # indices of the decoder layers it runs (None: every layer)
    first: bool               # it holds the embedding (and reads the ids and labels)
    last: bool                # it holds the final norm, the head and the loss


WHOLE = Placement(None, True, True)

DIMENSIONS: dict[str, Dimension] = {}  # filled as bench/strategies imports each dimension's module


def register(dimension: Dimension) -> Dimension:
    DIMENSIONS[dimension.key] = dimension
    return dimension


@dataclass(frozen=True)
class Coords:
    """Where one rank sits in its layout (Layout.coords)."""
    data: int          # data stream: which micro-batches it reads (0 .. Layout.data_parallel - 1)
    zero: int          # place in the group ZeRO splits dense parameters over (0 .. Layout.zero_degree - 1)
    places: tuple      # (dimension key, its place in that dimension) for every registered dimension

    def __getitem__(self, key: str) -> int:
        return dict(self.places)[key]


class Layout:
    """world = dp x the ranks each dimension adds, DP being the remainder. Immutable; `lay.tp`, `lay.sp`, ... read a
    registered dimension's degree (1 when off). The dimensions register as bench.strategies is imported."""

    def __init__(self, dp: int, **degrees: int):
        unknown = set(degrees) - set(DIMENSIONS)
        if unknown:
            raise TypeError(f"no dimension {sorted(unknown)} is registered (bench/strategies)")
        object.__setattr__(self, "dp", dp)
        object.__setattr__(self, "degrees", types.MappingProxyType({k: degrees.get(k, 1) for k in DIMENSIONS}))

    def __getattr__(self, key: str) -> int:
        degrees = self.__dict__.get("degrees", {})
        if key in degrees:
            return degrees[key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        raise AttributeError("Layout is immutable")

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        return f"Layout({', '.join(f'{k}={v}' for k, v in self.as_dict().items())})"

    def __reduce__(self):  # copies and pickles rebuild it (its degrees are a read-only view)
        return Layout._of, (self.as_dict(),)

    @staticmethod
    def _of(recorded: dict) -> "Layout":
        return Layout(**recorded)

    def folded(self, key: str) -> str | None:
        """The dimension whose ranks `key`'s groups fold over, or None where it adds ranks of its own."""
        return next((o for o, d in DIMENSIONS.items() if key in d.folds and self.degrees[o] > 1), None)

    def ranks(self, key: str) -> int:
        """The factor a dimension multiplies the world by: its degree, or 1 where it folds over another's ranks."""
        return 1 if self.folded(key) else self.degrees[key]

    def _product(self, keep: Callable[[Dimension], bool]) -> int:
        return math.prod(self.ranks(k) for k, d in DIMENSIONS.items() if keep(d))

    @property
    def world_size(self) -> int:
        return self.dp * self._product(lambda d: True)

    @property
    def data_parallel(self) -> int:
        """Distinct data streams: DP and the dimensions whose ranks read separate data (EP's)."""
        return self.dp * self._product(lambda d: d.streams)

    @property
    def zero_degree(self) -> int:
        """Ranks ZeRO splits a dense parameter's states over: the data-parallel ones and, under a dimension that
        shards with them, its ranks too (SP: DeepSpeed's sequence-data-parallel group)."""
        return self.data_parallel * self._product(lambda d: d.zero_shards)

    @property
    def sequence_split(self) -> int:
        """How many slices each sequence is cut into across ranks (1: every rank holds whole rows)."""
        return self._product(lambda d: d.splits_sequence)

    def on(self) -> set[str]:
        """The dimensions this layout turns on."""
        return {k for k, v in self.degrees.items() if v > 1}

    def declared(self) -> list[Dimension]:
        """The declarations of the dimensions it turns on, in registration order: what the planner, the cost model,
        loading and the records read of each (their terms live with the dimension)."""
        return [d for k, d in DIMENSIONS.items() if self.degrees[k] > 1]

    def _axes(self) -> list[tuple[str, int]]:
        """(name, size) of the rank mesh's axes, innermost first: the data axis and each dimension's own."""
        axes = [(DATA_ORDER, "data", self.data_parallel)]
        axes += [(d.order, k, self.ranks(k)) for k, d in DIMENSIONS.items() if d.order is not None]
        return [(name, size) for _, name, size in sorted(axes)]

    def coords(self, rank: int) -> Coords:
        """The one place rank topology is computed: a mixed radix over the mesh's axes (e.g. DeepSpeed's (data,
        tensor) mesh with TP innermost; its PipeDataParallelTopology with pipeline stages outermost), ZeRO's place
        running over the data axis and the axes that shard with it, and a dimension's own place where it says."""
        stride, zero, zero_stride, index = 1, 0, 1, {}
        for name, size in self._axes():
            index[name] = rank // stride % size
            stride *= size
            if name == "data" or DIMENSIONS[name].zero_shards:
                zero += index[name] * zero_stride
                zero_stride *= size
        places = tuple((k, d.coord(self, rank) if d.coord else index.get(k, 0)) for k, d in DIMENSIONS.items())
        return Coords(data=index["data"], zero=zero, places=places)

    def ranks_at(self, key: str, place: int) -> list[int]:
        """The ranks at one place of a dimension (e.g. one pipeline stage's): coords' inverse."""
        return [r for r in range(self.world_size) if self.coords(r)[key] == place]

    @staticmethod
    def fit(world_size: int, **degrees: int) -> "Layout":
        """The layout of world_size ranks with these model-parallel degrees (read from a ds_config by layout_of),
        DP taking the rest; one line when they do not fit."""
        shape = Layout(1, **degrees)
        model_par = shape.world_size
        if world_size % model_par:
            named = "*".join(f"{k}({v})" for k, v in shape.degrees.items())
            raise BenchError(f"layout does not fit: dp(?)*{named} != WORLD_SIZE({world_size}); WORLD_SIZE must be a "
                             f"multiple of {'*'.join(shape.degrees)} = {model_par}: start that many processes "
                             f"(deepspeed --num_gpus {model_par} bench/run.py ..., torchrun --nproc_per_node "
                             f"{model_par}), or plan it from one with --dry_run --world_size {model_par}")
        for key, degree in shape.degrees.items():
            if world_size % degree:  # only a folded dimension's degree can fail to divide here
                folder = DIMENSIONS[shape.folded(key)]
                raise BenchError(f"{DIMENSIONS[key].degree_key} {degree} must divide WORLD_SIZE ({world_size}): under "
                                 f"{folder.degree_key} {shape.degrees[folder.key]} its groups fold over the ranks there "
                                 "are")
        return Layout(world_size // model_par, **degrees)

    def describe(self) -> str:
        folded = [f"{k}({v}) folded over them" for k, v in self.degrees.items() if v > 1 and self.folded(k)]
        named = "".join(f"*{k}({v})" for k, v in self.degrees.items() if not (v > 1 and self.folded(k)))
        return f"dp({self.dp}){named} = {self.world_size}" + (f" ({', '.join(folded)})" if folded else "")

    def as_dict(self) -> dict:
        """What summary.json and config.json record as "layout"."""
        return {"dp": self.dp, **self.degrees}


def layout_of(ds: dict, world_size: int) -> Layout:
    """How world_size ranks split under this ds_config: each dimension's degree, read where it says."""
    degrees = {}
    for d in DIMENSIONS.values():
        value = d.degree(ds)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise BenchError(f"ds_config {d.degree_key} must be a positive integer, got {value!r}")
        degrees[d.key] = value
    return Layout.fit(world_size, **degrees)
