"""One rank of a real-size layout, sharded by DeepSpeed's own AutoEP and AutoTP code on the meta device, against
the planner: `python tests/support/meta_sharding.py WORLD RANK bench/run.py-flags...` prints one JSON line.

A fake process group of WORLD ranks (torch's "fake" backend: collectives are no-ops) stands in for the cluster,
and the engine's own replacement steps run on an engine that is never initialized further: the steps
deepspeed.initialize takes before it builds an optimizer, which is all the sharding there is. No weight is ever
allocated, so LLaMA 3.1 8B and Mixtral 8x7B are checked at their real size on this CPU."""
import json
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore


def main(world: int, rank: int, flags: list[str]) -> dict:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    import deepspeed
    from accelerate import init_empty_weights
    from deepspeed.module_inject import set_autotp_mode
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine
    from bench import estimate
    from bench.plan import plan_layout
    from bench.architecture import meta_model
    from bench.strategies.common import apply_lora
    deepspeed.init_distributed(dist_backend="fake")
    plan = plan_layout([*flags, "--init", "random"], world, "H100-80GB")
    model = meta_model(plan.model_config)
    if plan.peft == "lora":
        model = apply_lora(model, plan.cfg)
    ds = {k: v for k, v in plan.ds.items() if k not in ("bf16", "optimizer")}
    ds.update(train_micro_batch_size_per_gpu=plan.batch.micro, gradient_accumulation_steps=plan.batch.grad_accum,
              train_batch_size=plan.batch.micro * plan.batch.grad_accum * world)
    if "tensor_parallel" in ds:
        set_autotp_mode(training=True)
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # only its replacement steps run
    torch.nn.Module.__init__(engine)
    engine._config, engine.mpu, engine.local_rank = DeepSpeedConfig(ds), None, rank
    with init_empty_weights():  # AutoEP's new layers on the meta device too (its probes stay real tensors)
        engine._configure_expert_parallel(model, collect_sources=False)
    if engine.autotp_size() > 1:
        with plan.strategy.initializing(plan, model):
            engine._configure_tensor_parallel(model, engine.tensor_parallel_config())
    dense, expert = estimate._local_sizes(plan, rank)
    return {"held": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "planned_held": plan.strategy.params_per_rank(plan)[rank], "planned_trainable": sum(dense + expert),
            "whole_model": plan.total_params,
            "meta": all(p.is_meta for p in model.parameters())}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])), flush=True)
    sys.stdout.flush()
