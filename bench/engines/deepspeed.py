"""DeepSpeed's engine behind the seam (base.py): deepspeed.initialize with the plan's resolved ds_config, every
strategy's model-parallel state (mpu) and only the trainable parameters for the optimizer."""
from __future__ import annotations

from bench import compiling
from bench.engines.base import Engine


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, ds):
        self.ds = ds  # deepspeed's own engine: for the strategies built on its features (pipeline, Ulysses)
        self.module, self.optimizer = ds.module, ds.optimizer

    @classmethod
    def create(cls, plan, model) -> "DeepSpeedEngine":
        import deepspeed
        ds, *_ = deepspeed.initialize(model=model, config=plan.ds, mpu=plan.strategy.mpu,
                                      model_parameters=(q for q in model.parameters() if q.requires_grad))
        _keep_fp32_grad_norm(ds)
        if plan.cfg.compile.enable == "on":
            compiling.compile_engine(ds, plan.cfg.compile.backend)
        return cls(ds)

    def __call__(self, **batch):
        return self.ds(**batch)

    def backward(self, loss) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()  # applies the update only at the accumulation boundary (DeepSpeed counts micro-batches)

    @property
    def skipped_steps(self) -> int:
        return self.ds.skipped_steps

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def grad_norm(self) -> float | None:
        return self.ds.get_global_grad_norm()

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        self.ds.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)

    def load(self, ckpt_dir: str, tag: str) -> dict | None:
        path, client = self.ds.load_checkpoint(ckpt_dir, tag=tag)
        return None if path is None else (client or {})

    def describe(self) -> dict:
        return {"optimizer": _optimizer_record(self.ds), "dtypes": _dtypes_held(self.ds)}


def _keep_fp32_grad_norm(engine) -> None:
    """Without ZeRO, fp16 or bf16 (plain data parallelism in fp32) DeepSpeed clips the gradients and drops their norm
    (runtime/engine.py, clip_fp32_gradients), so get_global_grad_norm() stays None; keep the norm its own
    clip_grad_norm_ returns (before clipping, as every other path reports it)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)
    engine.clip_fp32_gradients = clip


def _optimizer_record(engine) -> dict:
    """What updated the weights: the torch optimizer's class, whether fused, and DeepSpeed's wrapper around it."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    groups = getattr(inner, "param_groups", None) or [{}]
    return {"name": f"{type(inner).__module__}.{type(inner).__name__}", "fused": bool(groups[0].get("fused")),
            "wrapper": type(opt).__name__ if inner is not opt else None}


def _dtypes_held(engine) -> dict:
    """The dtypes the engine trains with, as held after deepspeed.initialize: ZeRO-1/2 cast every module parameter,
    LoRA adapters included, to bf16 (runtime/engine.py, _cast_module_mixed_precision) while a model built under
    zero.Init keeps its adapters fp32; the gradient accumulation dtype is DeepSpeed's own (get_data_types)."""
    def kinds(trainable: bool) -> str | None:
        found = sorted({str(p.dtype).removeprefix("torch.") for p in engine.module.parameters()
                        if p.requires_grad == trainable})
        return ",".join(found) or None
    return {"trainable": kinds(True), "frozen": kinds(False),
            "grad_accum": str(engine.get_data_types()[1]).removeprefix("torch.")}
