"""One benchmark run from process group to summary.json, in the order things happen: join the process group, open
the run's records (bench/recorder.py), build the model and its engine (bench/builder.py), train (bench/train.py),
record the results. The recorder tells how the run ended, whatever ends it."""
from __future__ import annotations

import os
from dataclasses import asdict

from bench import builder, checkpoint, device, distributed, signals
from bench.config import BenchError
from bench.data import ShardedBatches, val_batches
from bench.recorder import RunRecorder
from bench.train import Console, Trainer
from bench.watchdog import HangWatchdog


class Session:
    def __init__(self, cfg, env, plan, process_start: float):
        self.cfg, self.env, self.plan = cfg, env, plan
        self.recorder = RunRecorder(cfg, env, plan, process_start)

    def run(self) -> int:
        rec = self.recorder
        try:
            device_index = distributed.init(self.env, self.cfg.training.dist_timeout_s)
        except (BenchError, signals.Stopped) as e:
            return rec.refused(e)
        rec.phase("process_group_s")  # rendezvous, and DeepSpeed's communication ops (built or loaded)
        rec.peaks = device.MemoryPeaks()  # its first phase, the load, runs from process start
        with rec.ending():
            rec.open()
            self._train(device_index)
        return rec.code

    def _train(self, device_index: int) -> None:
        cfg, rec = self.cfg, self.recorder
        torch_device = self._set_up_device(device_index)
        rec.start_monitor()  # before the model: the load's peak is one the monitor must see too
        rec.peaks.mark_before_model()
        built = builder.build(self.plan, torch_device, rec.peaks, rec.phase, rec.is_main)
        rec.record.set(**built.sections)
        rec.peaks.close("load", then="warmup")  # from here on the peaks are training's, not the load's
        trainer = rec.trainer = self._trainer(built.engine, torch_device)
        start, save = self._checkpointing(built.engine)
        rec.phase("setup_s")
        t = cfg.training
        res = trainer.run(t.max_steps, t.warmup_steps, t.eval_interval, start, cfg.checkpoint.save_interval, save)
        if res.preempted:
            rec.stopped(res)
        rec.results(res, built)
        if self.plan.peft == "lora":  # the adapters, loadable into peft (pipeline stages are not a peft model)
            from bench.strategies.common import save_adapters
            save_adapters(built.engine, os.path.join(rec.run_dir, "adapter"), rec.is_main)

    def _set_up_device(self, device_index: int):
        import torch
        env = self.env
        torch.set_num_threads(env.cpu_threads)  # torch may have been imported before OMP_NUM_THREADS was set
        per_task = os.environ.get("SLURM_CPUS_PER_TASK")  # what srun gave this task (slurm/common.sh passes it on)
        rec = self.recorder.record
        rec.set(cpu_threads={"per_rank": torch.get_num_threads(), "source": env.cpu_threads_source,
                             "local_ranks": env.local_world_size, "affinity_cpus": env.affinity_cpus,
                             "slurm_cpus_per_task": int(per_task) if per_task and per_task.isdigit() else None})
        rec.set(versions={**rec["versions"], **device.versions()})
        return device.torch_device(device_index)  # selected with the process group (distributed.init)

    def _trainer(self, engine, torch_device) -> Trainer:
        cfg, p, rec = self.cfg, self.plan, self.recorder
        dp, dp_rank = p.layout.data_parallel, p.layout.coords(self.env.rank).data
        batches = ShardedBatches(p.train_data, p.batch.micro, p.batch.grad_accum, dp, dp_rank, cfg.training.seed,
                                 p.collate)
        val = val_batches(p.val_data, p.batch.micro, dp, dp_rank, cfg.training.eval_batches, p.collate)
        rec.console = Console(cfg.training.max_steps, p.batch.global_) if rec.is_main else None
        hangs = HangWatchdog(cfg.training.hang_timeout_s, cfg.training.dist_timeout_s, rec.hung)
        return Trainer(engine, p.strategy.build_runner(engine, torch_device), batches, val, p.batch.global_,
                       torch_device, p.throughput, rec.step if rec.is_main else None, rec.peaks, hangs,
                       compiled=cfg.compile.enable == "on")

    def _checkpointing(self, engine):
        """-> (the result to resume from or None, save(step, result) or None). Resumable runs save when
        preempted."""
        cfg = self.cfg
        ckpt_dir = cfg.checkpoint.checkpoint_dir or os.path.join(self.recorder.run_dir, "checkpoints")
        start = self.recorder.resume(engine, ckpt_dir) if cfg.checkpoint.resume == "auto" else None
        save = None
        if cfg.checkpoint.save_interval or cfg.checkpoint.checkpoint_dir or cfg.checkpoint.resume == "auto":
            save = lambda step, r: checkpoint.save(engine, ckpt_dir, step, {"result": asdict(r)})  # noqa: E731
        return start, save
