"""PyTorch's own data parallelism, beside DeepSpeed's ZeRO on the same job: `--strategy ddp` (DistributedDataParallel,
ds_configs/ddp.json, beside dp_zero0.json) and `--strategy fsdp2` (fully_shard, ds_configs/fsdp2.json beside
dp_zero3.json, fsdp2_no_reshard.json beside dp_zero2.json). The config file is the same ds_config format with an
"engine" key naming the engine (bench/engines): batch sizes, optimizer, learning rate and clipping are read from
the same keys by every engine, so two configs of one job differ in the engine and nothing else. With or without
LoRA (peft wraps the model before the engine does); data parallelism only (no model-parallel section)."""
from __future__ import annotations

from bench.config import BenchError
from bench.ds_config import offloaded
from bench.strategies.base import Strategy


class TorchDP(Strategy):
    default_peft = "lora"  # as ZeRO data parallelism's: the comparisons put them side by side

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        where = cfg.parallelism.ds_config
        if ds.get("engine") != self.engine:
            raise BenchError(f"--strategy {self.name} needs \"engine\": \"{self.engine}\" in {where} (see "
                             f"ds_configs/{self.name}.json)")
        self.reject_foreign_sections(ds)
        for key in ("zero_optimization", "scheduler", "fp16"):
            if key in ds:
                raise BenchError(f"{where}: the {self.engine} engine does not read '{key}' (DeepSpeed's); remove it "
                                 f"or use a DeepSpeed config")
        if offloaded(ds):
            raise BenchError(f"{where}: the {self.engine} engine offloads nothing; remove the offload settings")
        if any((ds.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16")):  # resolved: "auto" is not yet
            raise BenchError(f"the {self.engine} engine runs fp32 only so far (bf16 mixed precision is not built "
                             "yet): add --precision fp32")
        if cfg.compile.enable == "on":
            raise BenchError(f"--compile on compiles DeepSpeed's engine (engine.compile()); the {self.engine} "
                             "engine is not compiled yet: drop --compile")

    def resolve_ds(self, ds: dict, model_config) -> dict:
        ds.pop("zero_optimization", None)  # never present (check); DeepSpeed's ZeRO section means nothing here
        return ds


class DDP(TorchDP):
    name = engine = "ddp"


class FSDP2(TorchDP):
    name = engine = "fsdp2"
