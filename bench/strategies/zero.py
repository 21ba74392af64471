"""ZeRO data parallelism (stages 0-3), with or without LoRA: every rank holds the whole model (stage 3:
a partition of it) and a different slice of each global batch."""
from __future__ import annotations

from bench.config import BenchError
from bench.strategies.base import Strategy


class ZeroDP(Strategy):
    name, default_peft = "dp", "lora"

    def check(self, cfg, ds: dict, layout, model_config) -> None:
        self.reject_foreign_sections(ds)
        zero = ds.get("zero_optimization")
        if not isinstance(zero, dict) or "stage" not in zero:
            raise BenchError("--strategy dp needs a 'zero_optimization' section with a 'stage' in "
                             f"{cfg.parallelism.ds_config} (see ds_configs/dp_zero*.json)")
        check_stage(ds)
        check_offload(cfg, ds)
    # prepare: nothing; the ds_config's zero_optimization does the work inside deepspeed.initialize


def check_stage(ds: dict) -> None:
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise BenchError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")


def check_offload(cfg, ds: dict) -> None:
    """ZeRO offload: parameters only under stage 3, and DeepSpeed's CPU Adam must be buildable."""
    from bench.ds_config import offloaded, zero_stage
    kinds = offloaded(ds)
    if not kinds:
        return
    if "param" in kinds and zero_stage(ds) != 3:
        raise BenchError(f"{cfg.parallelism.ds_config}: offload_param needs ZeRO stage 3 "
                         "(see ds_configs/dp_zero3_offload.json)")
    if zero_stage(ds) == 0:
        raise BenchError(f"{cfg.parallelism.ds_config}: offload_optimizer needs a ZeRO stage of 1 or more")
    if cfg.training.dry_run:
        return  # planning (bench-plan, --dry_run) may happen on another machine than the run
    from bench.ops import cpu_adam_problem
    problem = cpu_adam_problem()
    if problem:
        raise BenchError(f"{cfg.parallelism.ds_config} offloads to the CPU, which needs DeepSpeed's CPU Adam: "
                         f"{problem}; use a config without offload")
