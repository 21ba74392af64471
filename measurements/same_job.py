"""What the bare DeepSpeed loop and the Hugging Face Trainer share when they redo a harness run's job.

The job is the harness's own plan, rebuilt from the run's config.json (bench/plan.py: model, weights, LoRA, the
resolved ds_config, the data and its batches in the same order), so all three train the same thing. Each rank
writes what it measured to OUT/WAY-rankR.json; `merge` combines the ranks as the harness does (bench/train.py):
a step's time is the slowest rank's, its loss the mean over ranks.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def leave() -> None:
    """End the process once its record is written, without the interpreter's teardown: there, native backend
    threads destroyed in arbitrary order occasionally abort a rank that finished ("terminate called without an
    active exception"), as bench/run.py notes for the harness; seen here in a CI run of the bare loop."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def load(run_dir: str):
    """-> (env, plan) for this process. discover() sets the launcher defaults, the shared extension cache and
    the threads per rank exactly as a harness rank does, before torch is imported."""
    from bench import distributed, plan as planning
    from bench.config import RunConfig, recorded_flags
    env = distributed.discover()
    with open(os.path.join(run_dir, "config.json")) as fh:
        recorded = json.load(fh)
    cfg = RunConfig.from_flags({**recorded_flags(recorded["run"]), "resume": "none", "wandb_mode": "disabled"})
    plan = planning.resolve(cfg, env)
    if plan.layout.world_size != env.world_size or plan.ds != recorded["ds_config"]:
        sys.exit(f"{run_dir} ran on {recorded['layout']['world_size']} processes with another resolved ds_config; "
                 f"launch {plan.layout.world_size} processes here")
    return env, plan


def build_model(plan, device):
    """The harness's model build (bench/builder.py): same seed, weights and LoRA adapters. -> (model, the ZeRO-3
    construction context, which must stay alive until deepspeed.initialize)."""
    from bench import models
    from bench.attention import model_implementation
    from bench.strategies.common import apply_lora
    cfg = plan.cfg
    zero3 = plan.ds if plan.zero_stage == 3 else None
    model, keep_alive = models.build_model(cfg.model.name, cfg.model.init, plan.model_config, plan.dtype, device, zero3,
                                           cfg.training.seed,
                                           model_implementation(cfg.model.attn_implementation, cfg.model.attn_mask))
    if plan.peft == "lora":
        model = apply_lora(model, cfg)
    return model, keep_alive


def batches(plan, env):
    """This rank's micro-batches, step by step, as the harness's ZeRO data parallelism feeds them (packed or
    padded as the harness's run was)."""
    from bench.data import ShardedBatches
    return ShardedBatches(plan.train_data, plan.batch.micro, plan.batch.grad_accum, plan.layout.data_parallel,
                          env.rank, plan.cfg.training.seed, plan.collate)


class StepRecorder:
    """Per optimizer step on this rank: device-synchronized time of the step, time since the end of the first
    step, loss (mean over its micro-batches) and grad norm."""

    def __init__(self, device):
        from deepspeed.accelerator import get_accelerator
        self.sync = get_accelerator().synchronize  # as the harness times (bench/train.py)
        self.device_type = device.type
        self.steps, self._t0, self._first_end = [], None, None

    def begin(self) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.sync()
        now = time.perf_counter()
        self._first_end = self._first_end or now
        self._stopped = {"step_time_s": now - self._t0, "since_first_s": now - self._first_end}

    def result(self, loss: float, grad_norm) -> None:
        """The step just stopped computed this loss and grad norm."""
        self.steps.append({**self._stopped, "loss": loss, "grad_norm": None if grad_norm is None else float(grad_norm)})

    def write(self, out_dir: str, way: str, rank: int) -> None:
        import torch
        from bench.device import MemoryPeaks
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{way}-rank{rank}.json"), "w") as fh:
            json.dump({"steps": self.steps, "memory": MemoryPeaks().now(),
                       "threads": torch.get_num_threads()}, fh)


def merge(out_dir: str, way: str) -> dict:
    """The ranks' records as one run: per step the slowest rank's time, the mean loss, rank 0's grad norm (the
    global norm, equal on every rank) and the elapsed time on rank 0; the peak memory of the largest rank."""
    ranks = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(f"{way}-rank"):
            with open(os.path.join(out_dir, name)) as fh:
                ranks.append(json.load(fh))
    steps = [list(s) for s in zip(*(r["steps"] for r in ranks))]
    return {
        "step_time_s": [max(x["step_time_s"] for x in s) for s in steps],
        "elapsed_s": [s[0]["since_first_s"] for s in steps],
        "loss": [sum(x["loss"] for x in s) / len(s) for s in steps],
        "grad_norm": [s[0]["grad_norm"] for s in steps],
        "peak_memory_mib": peak_mib([r["memory"] for r in ranks]),
    }


def from_harness(summary: dict, records: list[dict]) -> dict:
    """A harness run (summary.json, metrics.jsonl) in merge's shape: its records already hold the slowest rank's
    time and the mean loss."""
    return {**{k: [r[k] for r in records] for k in ("step_time_s", "elapsed_s", "loss", "grad_norm")},
            "peak_memory_mib": peak_mib(summary["memory"]["per_rank"])}


def peak_mib(per_rank: list[dict]) -> float:
    """The largest rank's peak: the allocator's on GPUs, RSS on the CPU."""
    return max(r["peak_allocated_mib"] or r["peak_rss_mib"] for r in per_rank)


def wall_per_step(m: dict, warmup: int) -> float:
    """Seconds per measured step, everything between steps included: from the end of the last warm-up step to the
    end of the last step."""
    return (m["elapsed_s"][-1] - m["elapsed_s"][warmup - 1]) / (len(m["elapsed_s"]) - warmup)
