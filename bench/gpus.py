"""The one catalog of GPUs: what MFU divides by, what the planner fits into, what the cost model moves bytes over.

A GPU is told apart by its exact product, as CUDA names it (torch.cuda.get_device_name): the H200 NVL (835 bf16
dense TFLOP/s) is not the H200 SXM (989), the GB200 is not the B200, the H100 PCIe is not the SXM part. Names are
matched as whole words after "NVIDIA ", most specific first, so no product matches a prefix of another
("H20" is not "H200", "B200" is not "GB200"). A GPU that is not here has no peak: MFU is then null, never guessed.

Sources (bf16 dense, no sparsity; memory as torch reports total_memory, a little under the marketed GB; NVLink one
direction per GPU): NVIDIA's A100, H100, H200, B200 and GB200 NVL72 datasheets; streaming multiprocessors: the A100
and H100 architecture whitepapers (A100 108, H100 SXM5 132, H100 PCIe 114; H200 and GH200 carry the H100 SXM's
GH100), not listed where no whitepaper says. B200 and GB200 memory is the
marketed size less the H100's measured 1.1 % reserve: planned, not measured.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from bench.config import BenchError

GIB = 2 ** 30
GPUS_PER_NODE = 8  # an HGX/DGX node: where the sweep splits nodes and the cost model leaves NVLink


@dataclass(frozen=True)
class Gpu:
    key: str                   # what bench-plan --gpu takes
    pattern: str               # a whole-word regex over the CUDA device name, "NVIDIA " removed
    bf16_tflops: float         # dense peak
    memory_gib: float | None   # usable, as torch.cuda.get_device_properties().total_memory (None: varies by SKU)
    link_bytes_s: float | None  # per GPU, one direction, within a node (None: not planned)
    source: str
    sms: int | None = None     # streaming multiprocessors (the cost model's GEMM waves; None: not modelled)


CATALOG = (
    Gpu("GB200", r"GB200", 2500.0, 184.0, 900e9, "GB200 NVL72 datasheet: 5 PFLOPS dense bf16 per 2-GPU superchip"),
    Gpu("B200-180GB", r"B200", 2250.0, 178.0, 900e9, "HGX B200 datasheet: 2.25 PFLOPS dense bf16 per GPU"),
    Gpu("GH200", r"GH200", 989.0, None, 450e9, "GH200 datasheet: the H100 SXM's 989 TFLOPS dense bf16", 132),
    Gpu("H200-NVL-141GB", r"H200 NVL", 835.0, 139.8, 64e9,
        "H200 NVL datasheet: 835 TFLOPS dense bf16 (a 600 W PCIe card; NVLink bridges pairs, PCIe 5 beyond)"),
    Gpu("H200-141GB", r"H200", 989.0, 139.8, 450e9, "H200 SXM datasheet: 989 TFLOPS dense bf16", 132),
    Gpu("H100-NVL-94GB", r"H100 NVL", 835.0, 93.1, 64e9,
        "H100 NVL datasheet: 835 TFLOPS dense bf16 (cards bridged in pairs, PCIe 5 beyond)"),
    Gpu("H100-PCIe-80GB", r"H100 PCIe", 756.0, 79.1, 64e9, "H100 PCIe datasheet: 756 TFLOPS dense bf16", 114),
    Gpu("H100-80GB", r"H100", 989.0, 79.1, 450e9, "H100 SXM datasheet: 989 TFLOPS dense bf16", 132),
    Gpu("A100-40GB", r"A100(?:-SXM4|-PCIE)?-40GB", 312.0, 39.4, 300e9, "A100 datasheet: 312 TFLOPS dense bf16", 108),
    Gpu("A100-80GB", r"A100", 312.0, 79.2, 300e9, "A100 datasheet: 312 TFLOPS dense bf16", 108),
)
BY_KEY = {g.key: g for g in CATALOG}


def match(device_name: str | None) -> Gpu | None:
    """The catalog entry of a CUDA device name (or a bench-plan key), or None."""
    if not device_name:
        return None
    if device_name in BY_KEY:
        return BY_KEY[device_name]
    name = re.sub(r"^NVIDIA\s+", "", device_name.strip(), flags=re.IGNORECASE)
    for gpu in CATALOG:
        if re.search(rf"(?<!\w){gpu.pattern}(?!\w)", name, flags=re.IGNORECASE):
            return gpu
    return None


def peak_tflops(device_name: str | None, override: float | None = None) -> tuple[float | None, str]:
    """MFU's denominator and where it came from: --peak_tflops wins; then the catalog; else (None, why)."""
    if override:
        return float(override), "--peak_tflops"
    gpu = match(device_name)
    if gpu is None:
        what = f"{device_name!r} is not in the GPU catalog" if device_name else "no GPU"
        return None, f"unknown ({what}; --peak_tflops sets it)"
    return gpu.bf16_tflops, f"bench/gpus.py {gpu.key}: {gpu.source}"


def capacity_bytes(key: str) -> int | None:
    gpu = BY_KEY.get(key)
    return int(gpu.memory_gib * GIB) if gpu and gpu.memory_gib else None


def plannable() -> list[str]:
    """The --gpu names bench-plan accepts: those with a known capacity and link."""
    return [g.key for g in CATALOG if g.memory_gib and g.link_bytes_s]


def gpu_capacity(name: str | None, gib: float | None) -> int | None:
    """--gpu NAME or --gpu_memory_gib X -> bytes (None: plan without a capacity, as on the CPU)."""
    if gib is not None:
        if gib <= 0:
            raise BenchError(f"--gpu_memory_gib must be positive, got {gib}")
        return int(gib * GIB)
    if name is None:
        return None
    if name not in plannable():
        raise BenchError(f"unknown --gpu {name!r}; known: {', '.join(plannable())} (or give --gpu_memory_gib)")
    return capacity_bytes(name)
