"""One benchmark run from process group to summary.json: build, train, record.

Rank 0 owns the run directory's files. Whatever happens after the directory exists, summary.json says how the
run ended (completed | failed | oom | preempted), and everything recorded before an error stays on disk.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict

from bench import checkpoint, distributed, metrics, models
from bench import summary as S
from bench.config import BenchError, format_table, print_error
from bench.data import ShardedBatches, val_batches
from bench.loggers import JsonlLogger, WandbLogger, write_json_atomic
from bench.strategies import STRATEGIES, autoep
from bench.strategies.common import apply_lora, format_sharding, param_counts, param_shapes, sharding_report
from bench.strategies.pipeline import PipelineRunner
from bench.train import Console, EngineRunner, Trainer, TrainResult, request_stop_on_signals

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the SLURM scripts requeue a job whose run exits with this


class Session:
    def __init__(self, cfg, env, plan, process_start: float):
        self.cfg, self.env, self.plan, self.t0 = cfg, env, plan, process_start
        self.is_main = env.rank == 0
        self.summary = S.skeleton(cfg, plan.layout, plan.batch, plan.ds, env.world_size, plan.peft)
        self.summary["startup_s"] = {"imports_and_resolve_s": time.time() - process_start, **plan.phases}
        self.jsonl = self.wandb = self.monitor = None

    def _default_name(self) -> str:
        model = os.path.basename(self.cfg.model.rstrip("/"))
        return f"{model}-{self.cfg.strategy}-{self.plan.peft}-w{self.env.world_size}-{time.strftime('%Y%m%d-%H%M%S')}"

    def run(self) -> int:
        distributed.init(self.cfg.dist_timeout_s)
        self.run_dir = distributed.make_run_dir(self.cfg.output_dir, self.cfg.run_name or self._default_name(),
                                                reuse=self.cfg.resume == "auto")
        self.summary["run_dir"] = self.run_dir
        if self.is_main:
            self._open_records()
        code = 0
        try:
            self._train()
            if self.summary["status"] == "preempted":
                code = PREEMPTED_EXIT
            else:
                self.summary["status"] = "completed"
        except BenchError as e:
            self.summary.update(status="failed", error=str(e))
            print_error(str(e))
            code = 2
        except Exception as e:  # noqa: BLE001 - recorded, then the traceback for the bug report
            oom = "OutOfMemoryError" in type(e).__name__
            self.summary.update(status="oom" if oom else "failed",
                                error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
            self._record_partial()
            traceback.print_exc()
            code = 3 if oom else 1
        finally:
            self._close_records(code)
            distributed.shutdown(clean=code in (0, PREEMPTED_EXIT))
        return code

    # -----------------------------------------------------------------------------------------------------
    def _open_records(self):
        d, p = self.run_dir, self.plan
        config = {"run": self.cfg.to_dict(), "ds_config": p.ds,
                  "layout": self.summary["layout"], "world_size": self.env.world_size,
                  "batch": {"global": p.batch.global_, "micro": p.batch.micro, "grad_accum": p.batch.grad_accum},
                  "peft": p.peft, "device": {"type": p.device_type, "name": p.device_name, "dtype": str(p.dtype)},
                  "model_config": p.model_config.to_dict(), **S.environment()}
        resume_id = None
        if self.cfg.resume == "auto" and os.path.isfile(os.path.join(d, "summary.json")):
            with open(os.path.join(d, "summary.json")) as fh:
                resume_id = json.load(fh).get("wandb_run_id")
        write_json_atomic(os.path.join(d, "config.json"), config)
        write_json_atomic(os.path.join(d, "summary.json"), self.summary)
        self.jsonl = JsonlLogger(os.path.join(d, "metrics.jsonl"))
        tags = [self.cfg.strategy, os.path.basename(self.cfg.model), f"world{self.env.world_size}",
                f"peft-{p.peft}", f"zero{self.summary['zero_stage']}"]
        self.wandb = WandbLogger(self.cfg, d, os.path.basename(d), config, tags, resume_id)
        self.summary["wandb_run_id"] = self.wandb.run_id

    def _close_records(self, code: int):
        if self.monitor is not None:
            devices = self.monitor.stop()
            if self.is_main:
                self.summary["memory"]["device"] = devices
        if not self.is_main:
            return
        self.summary["total_wall_time_s"] = time.time() - self.t0
        write_json_atomic(os.path.join(self.run_dir, "summary.json"), self.summary)
        self.jsonl.close()
        self.wandb.summary(self.summary)
        self.wandb.finish(exit_code=code)
        print(format_table(S.result_table(self.summary), "result"), flush=True)

    def _log(self, record: dict):
        """Every step goes to metrics.jsonl; W&B and the console get every --log_interval-th step, the steps
        that evaluated, and the last one (like torchtitan's log_freq: W&B costs ~1 ms of CPU per record)."""
        self.jsonl.log(record)
        step = record["step"]
        show = step % self.cfg.log_interval == 0 or step == self.cfg.max_steps or "val_loss" in record
        if show:
            self.wandb.log(record)
        self.console(record, show)

    def _train(self):
        import deepspeed
        import torch
        from deepspeed.accelerator import get_accelerator
        cfg, p, env = self.cfg, self.plan, self.env
        torch.set_num_threads(env.cpu_threads)  # torch may have been imported before OMP_NUM_THREADS was set
        self.summary["cpu_threads"] = {"per_rank": torch.get_num_threads(), "source": env.cpu_threads_source,
                                       "local_ranks": env.local_world_size}
        if p.device_type == "cuda":
            get_accelerator().set_device(env.local_rank)
        device = torch.device(get_accelerator().device_name(env.local_rank) if p.device_type == "cuda" else "cpu")

        t = time.time()
        zero3 = p.ds if self.summary["zero_stage"] == 3 else None
        model, _zero3_ctx = models.build_model(cfg.model, cfg.init, p.model_config, p.dtype, device, zero3, cfg.seed)
        before = param_counts(model)
        if p.peft == "lora":
            model = apply_lora(model, cfg)
        after = param_counts(model)
        model = STRATEGIES[cfg.strategy].prepare(model, cfg, p.ds)
        if self.is_main:
            print(_param_table(before, after, p.peft), flush=True)
        shapes = param_shapes(model)
        t_build = time.time()
        engine, *_ = deepspeed.initialize(model=model, config=p.ds,
                                          model_parameters=[q for q in model.parameters() if q.requires_grad])
        self.summary["startup_s"].update(model_build_s=t_build - t, ds_initialize_s=time.time() - t_build)
        if p.layout.tp > 1 or p.layout.ep > 1:  # model parallel: record what each rank really holds
            self.summary["sharding"] = sharding_report(shapes, engine.module)
            if p.layout.ep > 1:
                self.summary["experts_per_rank"] = autoep.experts_per_rank(engine.module)
            if self.is_main:
                print(format_sharding(self.summary["sharding"]), flush=True)

        lora_params = after["total"] - before["total"] if p.peft == "lora" else None
        fpt = models.flops_per_token(p.model_config, cfg.seq_len, lora_params)
        peak = metrics.device_peak_tflops(p.device_name, cfg.peak_tflops)
        self.summary.update(flops_per_token=fpt, peak_tflops=peak)
        world = env.world_size
        rates = lambda times: metrics.throughput(times, p.batch.global_, cfg.seq_len, world, fpt, peak)  # noqa: E731

        pids = distributed.node_pids()  # collective: every rank calls it
        if env.local_rank == 0:
            name = "device_monitor.csv" if self.is_main else f"device_monitor.{os.uname().nodename}.csv"
            from bench.monitor import DeviceMonitor
            self.monitor = DeviceMonitor(os.path.join(self.run_dir, name), cfg.monitor_interval_s,
                                         p.device_type, pids).start()

        dp, dp_rank = p.layout.data_parallel, p.layout.data_rank(env.rank)
        batches = ShardedBatches(p.train_data, p.batch.micro, p.batch.grad_accum, dp, dp_rank, cfg.seed)
        val = val_batches(p.val_data, p.batch.micro, dp, dp_rank, cfg.eval_batches)
        self.console = Console(cfg.max_steps, p.batch.global_) if self.is_main else None
        runner = PipelineRunner(engine, device) if p.layout.pp > 1 else EngineRunner(engine)
        self.trainer = trainer = Trainer(engine, runner, batches, val, p.batch.global_, device, rates,
                                         self._log if self.is_main else None)
        ckpt_dir = cfg.checkpoint_dir or os.path.join(self.run_dir, "checkpoints")
        start = self._resume(engine, ckpt_dir) if cfg.resume == "auto" else None
        save = None
        if cfg.save_interval or cfg.checkpoint_dir or cfg.resume == "auto":  # resumable runs save when preempted
            save = lambda step, r: checkpoint.save(engine, ckpt_dir, step, {"result": asdict(r)})  # noqa: E731
        request_stop_on_signals()
        res = trainer.run(cfg.max_steps, cfg.warmup_steps, cfg.eval_interval, start, cfg.save_interval, save)
        if res.preempted:
            self.summary.update(status="preempted", error=f"stopped by a signal after step {len(res.records)}")
        if self.console:
            self.console.close()

        S.fill_results(self.summary, res, global_batch=p.batch.global_, seq_len=cfg.seq_len, world_size=world,
                       flops_per_token=fpt, peak_tflops=peak, target_loss=cfg.target_loss)
        self.summary["time_to_first_step_s"] = res.first_step_end - self.t0
        mem = distributed.gather({"rank": env.rank, **metrics.rank_memory(p.device_type)})
        held = param_counts(engine.module)  # after deepspeed.initialize: TP shards, EP experts, ZeRO-3 partitions
        local = distributed.gather({"rank": env.rank, "total": held["local"], "trainable": held["local_trainable"]})
        self.summary["memory"]["per_rank"] = mem
        self.summary["params"] = {"total": after["total"], "trainable": after["trainable"],
                                  "before_peft": before["total"], "per_rank": local}
        if p.layout.pp > 1:
            self.summary["pipeline"] = _pipeline_summary(p.layout, p.batch.grad_accum, res, local)


    def _resume(self, engine, ckpt_dir: str) -> TrainResult:
        """Continue from the newest complete checkpoint (or from scratch without one). Steps metrics.jsonl holds
        beyond it were done and lost: they are dropped from the file, recomputed, and their time is counted."""
        tag = checkpoint.latest_complete(ckpt_dir)
        res = TrainResult(**checkpoint.load(engine, ckpt_dir, tag)["result"]) if tag else TrainResult()
        res.preempted = False
        if tag:
            res.resumed_at.append(len(res.records))
        lost = [0, 0.0]
        if self.is_main:
            dropped = self.jsonl.truncate_after(len(res.records))
            lost = [len(dropped), max(0.0, dropped[-1]["elapsed_s"] - res.train_wall_s) if dropped else 0.0]
        lost = distributed.gather(lost)[0]  # rank 0's file is the record; every rank uses its numbers
        res.lost_steps += lost[0]
        res.lost_s += lost[1]
        res.train_wall_s += lost[1]  # goodput's denominator includes the work that was lost
        if self.is_main:
            print(f"resuming after step {len(res.records)} ({tag or 'no checkpoint: from the start'}); "
                  f"{lost[0]} step(s) lost and recomputed", flush=True)
        return res

    def _record_partial(self):
        """After an error: what this rank measured so far, without collectives (other ranks may be gone)."""
        res = getattr(getattr(self, "trainer", None), "res", None)
        if res is not None and res.records:
            S.fill_results(self.summary, res, global_batch=self.plan.batch.global_, seq_len=self.cfg.seq_len,
                           world_size=self.env.world_size, flops_per_token=self.summary["flops_per_token"] or 0,
                           peak_tflops=self.summary["peak_tflops"], target_loss=self.cfg.target_loss)
        self.summary["memory"]["per_rank"] = [{"rank": self.env.rank, **metrics.rank_memory(self.plan.device_type)}]


def _pipeline_summary(layout, micro_batches: int, res, per_rank: list) -> dict:
    """Per stage: parameters, and the measured idle fraction next to 1F1B's theoretical bubble. Ranks are
    (stage, data) with the stage as the outer axis, as DeepSpeed's PipeDataParallelTopology numbers them."""
    stages = []
    for s in range(layout.pp):
        ranks = range(s * layout.dp, (s + 1) * layout.dp)
        idle = [metrics.idle_fraction(res.busy_s[r], sum(res.step_times)) for r in ranks]
        stages.append({"stage": s, "ranks": list(ranks), "params": per_rank[ranks[0]]["total"],
                       "trainable": per_rank[ranks[0]]["trainable"],
                       "measured_idle_fraction": sum(idle) / len(idle)})
    return {"stages": layout.pp, "micro_batches": micro_batches,
            "theoretical_bubble": metrics.pipeline_bubble(layout.pp, micro_batches), "per_stage": stages}


def _param_table(before: dict, after: dict, peft: str) -> str:
    rows = [("trainable params", f"{before['trainable']:,}"), ("non-trainable params", f"{before['non_trainable']:,}"),
            ("total params", f"{before['total']:,}")]
    out = format_table(rows, "parameters" + (" before LoRA" if peft == "lora" else ""))
    if peft == "lora":
        rows = [("trainable params", f"{after['trainable']:,} ({after['trainable'] / after['total']:.3%})"),
                ("non-trainable params", f"{after['non_trainable']:,}"), ("total params", f"{after['total']:,}")]
        out += "\n" + format_table(rows, "parameters after LoRA")
    return out
