"""One benchmark run from process group to summary.json: build, train, record.

Rank 0 owns the run directory's files. Whatever happens after the directory exists, summary.json says how the
run ended (completed | failed | oom | preempted | interrupted), and everything recorded before an error stays on
disk.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict

from bench import checkpoint, device, distributed, faults, liveness, loading, metrics, models, ops, signals
from bench.config import BenchError, format_table
from bench.log import log, note, show
from bench.attention import model_implementation
from bench.data import ShardedBatches, val_batches
from bench.loggers import JsonlLogger, WandbLogger, release_reserve, reserve_space, write_json_atomic
from bench.strategies.common import apply_lora, param_counts, param_shapes, save_adapters
from bench.summary import RunRecord, result_table
from bench.train import Console, Trainer, TrainResult
from bench.watchdog import HangWatchdog, dump_stacks


PEER_GRACE_S = 5.0  # how long the heartbeat's watch lets the main thread record a lost peer itself


class Session:
    def __init__(self, cfg, env, plan, process_start: float):
        self.cfg, self.env, self.plan, self.t0 = cfg, env, plan, process_start
        self.is_main = env.rank == 0
        self.record = RunRecord(plan, env.world_size)
        # Start-up phases are consecutive, so they add up to time_to_first_step_s (docs/metrics.md).
        self._phase_start = time.time()
        resolving = sum(plan.phases.values())
        self.record.startup(imports_s=self._phase_start - process_start - resolving, **plan.phases)
        self.jsonl = self.wandb = self.monitor = self.trainer = self.peaks = self.heartbeat = None
        # rank 0, resuming (_open_records): the earlier launches' wall time, and whether the run's start (its first
        # launch's time to first step and start-up phases) is kept from them
        self._prior_wall, self._kept_start = 0.0, False
        self._end_lock, self._ending = threading.Lock(), False
        self.device_index = 0

    def _default_name(self) -> str:
        model = os.path.basename(self.cfg.model.rstrip("/"))
        return f"{model}-{self.cfg.strategy}-{self.plan.peft}-w{self.env.world_size}-{time.strftime('%Y%m%d-%H%M%S')}"

    def _phase(self, name: str) -> None:
        """Closes the start-up phase `name` (seconds since the previous one ended)."""
        now = time.time()
        if not self._kept_start:  # a resume keeps the run's start: the first launch's phases
            self.record.startup(**{name: now - self._phase_start})
        self._phase_start = now

    def run(self) -> int:
        try:
            self.device_index = distributed.init(self.env, self.cfg.dist_timeout_s)
        except (BenchError, signals.Stopped) as e:  # before the run directory exists: refused like bad input
            signals.closing()
            stopped = isinstance(e, signals.Stopped)
            if stopped:  # not an error line: a launcher stops the other ranks this way when one failed to start
                note(f"{e} during start-up, before the run directory existed")
            else:
                log.error(str(e))
            distributed.shutdown(clean=False)
            return signals.EXIT_CODE[e.status] if stopped else 2
        self._phase("process_group_s")  # rendezvous, and DeepSpeed's communication ops (built or loaded)
        self.peaks = device.MemoryPeaks()  # its first phase, the load, runs from process start
        code, together = 0, False
        try:
            self.run_dir, self.launch_id = distributed.make_run_dir(
                self.cfg.output_dir, self.cfg.run_name or self._default_name(), reuse=self.cfg.resume == "auto",
                max_steps=self.cfg.max_steps)
            self.record.set(run_dir=self.run_dir)
            self.heartbeat = liveness.Heartbeat(self.run_dir, self.env.rank, self.env.world_size, self.launch_id,
                                                liveness.peer_timeout(self.cfg.dist_timeout_s), self._peer_lost)
            self.heartbeat.start()
            if self.is_main:
                self._open_records()
            self._phase("run_records_s")
            self._train()
            together = True  # every rank left the loop after the same step, so they can meet once more
            self._own_the_ending()  # ranks finish at different moments: no verdict on a peer from here on
            if self.record["status"] in signals.EXIT_CODE:
                code = signals.EXIT_CODE[self.record["status"]]
            else:
                self.record.end("completed")
        except distributed.AlreadyCompleted as e:  # a sweep submitted again: its finished runs stay as they are
            signals.closing()
            if self.is_main:
                log.info(str(e))
            together = True
        except signals.Stopped as e:  # before training began, or a second Ctrl-C
            self._own_the_ending()
            res = self.trainer.res if self.trainer is not None else None
            where = f"during step {len(res.records) + 1} (signalled twice)" if e.twice else "during start-up"
            # the launcher's SIGTERM after a sibling died is that failure, not a preemption
            code = self._failed(self._lost_peer(), then=f"{e} {where}")
            if code is None:
                self.record.end(e.status, f"{e} {where}")
                self._record_partial()
                log.error(f"{e.status}: {self.record['error']}")
                code = signals.EXIT_CODE[e.status]
        except BenchError as e:
            signals.closing()  # leaving: a launcher's SIGTERM to the ranks must not cut the recording short
            self._own_the_ending()
            self.record.end("failed", str(e))
            self._record_partial()
            log.error(str(e))
            code = 2
        except OSError as e:  # a full disk, a lost mount: the path and the reason, not a traceback
            signals.closing()
            self._own_the_ending()
            self.record.end("failed", f"I/O error: {e.filename or ''}: {e.strerror or e}")
            self._record_partial()
            log.error(self.record["error"])
            code = 1
        except Exception as e:  # noqa: BLE001 - recorded, then the traceback for the bug report
            signals.closing()
            self._own_the_ending()
            oom = "OutOfMemoryError" in type(e).__name__
            what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            # a collective that failed because a peer died (gloo raises at once): say which peer
            code = None if oom else self._failed(self._lost_peer(wait_s=3.0), then=what)
            if code is None:
                self.record.end("oom" if oom else "failed", what)
                self._record_partial()
                traceback.print_exc()
                code = 3 if oom else 1
        finally:
            self._close_records(code)
            distributed.shutdown(clean=together)
        return code

    # -----------------------------------------------------------------------------------------------------
    # A peer that died without a word (bench/liveness.py)

    def _own_the_ending(self) -> None:
        """The main thread records how the run ended, not the heartbeat's watch; if the watch got there first
        (a collective hung on a dead peer, then raised), it is recording and will end the process: wait for it."""
        with self._end_lock:
            mine, self._ending = not self._ending, True
        if not mine:
            while True:
                time.sleep(1)

    def _lost_peer(self, wait_s: float = 0.0) -> tuple[int, str] | None:
        """The first peer found lost, waiting up to wait_s for the evidence (a killed process is reaped a moment
        after its sockets close)."""
        if self.heartbeat is None or self.env.world_size == 1:
            return None
        deadline = time.monotonic() + wait_s
        while (found := self.heartbeat.check()) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def _failed(self, lost: tuple[int, str] | None, then: str) -> int | None:
        """Record the run failed because a peer was lost (-> exit code 1), or None when no peer was lost."""
        if lost is None:
            return None
        rank, why = lost
        steps = len(self.trainer.res.records) if self.trainer is not None and self.trainer.res else 0
        self.record.end("failed", f"rank {rank} stopped answering after step {steps}: {why}; rank "
                                  f"{self.env.rank} recorded it ({then})"[:500])
        self._record_partial()
        log.error(self.record["error"])
        return 1

    def _peer_lost(self, rank: int, why: str) -> None:
        """The heartbeat's watch found a peer lost. Under gloo the main thread's next collective raises at once and
        records it; under NCCL it may hang until the watchdog aborts the process, recording nothing. So after a
        grace the watch records the failure itself and ends the process."""
        deadline = time.monotonic() + PEER_GRACE_S
        while time.monotonic() < deadline:
            if self._ending:
                return  # the main thread is recording
            time.sleep(0.2)
        with self._end_lock:
            if self._ending:
                return
            self._ending = True
        signals.closing()
        code = self._failed((rank, why), then="its collectives hung")
        try:
            self._close_records(code)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _hung(self, step: int, silent: float, limit: float, frame: str) -> None:
        """The hang watchdog found no step completing (bench/watchdog.py): every thread's stack to the run
        directory, the run recorded failed with where the main thread waits, and the process ends, since its
        main thread may never return from the collective it waits in."""
        with self._end_lock:
            if self._ending:
                return
            self._ending = True
        signals.closing()
        code = 1
        try:
            dump_stacks(self.run_dir, self.env.rank)
            if not self.is_main:
                # Rank 0's watchdog fires within a poll of this one's and records the hang; this rank's exit must
                # not reach it first as a lost peer. It records only where rank 0 was lost already.
                rank0_lost = self.heartbeat is not None and (self.heartbeat.check() or (None,))[0] == 0
                time.sleep(PEER_GRACE_S)
                if not rank0_lost:
                    log.error(f"hung at step {step}: no step completed for {silent:.0f} s; rank {self.env.rank}'s "
                                f"main thread waits in {frame}; its stacks in hang.rank{self.env.rank}.txt")
                    return
            self.record.end("failed", f"hung at step {step}: no step completed for {silent:.0f} s (bound "
                                      f"{limit:.0f} s, --hang_timeout_s); rank {self.env.rank}'s main thread "
                                      f"waits in {frame}; every rank's stacks in hang.rank*.txt")
            self._record_partial()
            log.error(self.record["error"])
            self._close_records(code)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    # -----------------------------------------------------------------------------------------------------
    # Records: rank 0 owns the run directory's files

    def _open_records(self):
        d, p = self.run_dir, self.plan
        config = p.config_record(self.env.world_size)
        earlier = {}  # the summary of the launch this one resumes
        if self.cfg.resume == "auto" and os.path.isfile(os.path.join(d, "summary.json")):
            with open(os.path.join(d, "summary.json")) as fh:
                earlier = json.load(fh)
        resume_id = earlier.get("wandb_run_id")
        # The record keeps the run's start and its earlier launches' wall time from the first write on, so a
        # launch that dies without recording its end (a SIGKILL, the node) still leaves them for the next resume
        self._prior_wall = earlier.get("total_wall_time_s") or 0.0
        self.record.set(total_wall_time_s=earlier.get("total_wall_time_s"))
        if earlier.get("time_to_first_step_s") is not None:
            self._kept_start = True
            self.record.set(time_to_first_step_s=earlier["time_to_first_step_s"], startup_s=earlier["startup_s"])
        write_json_atomic(os.path.join(d, "config.json"), config)
        self.record.write(os.path.join(d, "summary.json"))
        reserve_space(d)
        self.jsonl = JsonlLogger(os.path.join(d, "metrics.jsonl"))
        tags = [self.cfg.strategy, os.path.basename(self.cfg.model), f"world{self.env.world_size}",
                f"peft-{p.peft}", f"zero{p.zero_stage}"]
        self.wandb = WandbLogger(self.cfg, d, os.path.basename(d), config, tags, resume_id)
        self.record.set(wandb_run_id=self.wandb.run_id)
        self.record.write(os.path.join(d, "summary.json"))  # with the W&B id: a survivor keeps it if rank 0 dies

    def _close_records(self, code: int):
        """Whatever ended the run, and however far start-up got: the summary says how it ended."""
        signals.closing()
        if self.monitor is not None:
            devices = self.monitor.stop()
            if self.is_main:
                self.record.memory(device=devices)
        if self.record["run_dir"] is None or not self._writes_records():
            return
        path = os.path.join(self.run_dir, "summary.json")
        prior = self._prior_wall
        if not self.is_main:  # rank 0 is gone: the earlier launches' wall time is what it wrote at the start
            prior = self.record.read_value(path, "total_wall_time_s") or 0.0
        # every launch of the run, this one's from its process start (a resume adds to the earlier launches')
        self.record.set(total_wall_time_s=prior + time.time() - self.t0)
        if not self.is_main:  # and the rest it recorded at the start (its W&B id, the run's start, ...)
            self.record.adopt(path)
        for attempt in (1, 2):
            try:
                self.record.write(path)
                break
            except OSError as e:  # the previous summary.json stays as it was (written atomically)
                if attempt == 1 and release_reserve(self.run_dir):
                    continue  # a full disk: the space kept for this write is free now
                log.error(f"could not write {path}: {e.strerror or e}; it still says how far the run got before")
        release_reserve(self.run_dir)
        liveness.release(self.run_dir, self.launch_id)  # the run has said how it ended: the directory is free
        if self.jsonl is not None:
            try:
                self.jsonl.close()
            except OSError:
                pass  # its last line may be cut short; readers skip it
        if self.wandb is not None:
            self.wandb.summary(self.record.data)
            self.wandb.finish(exit_code=code)
        show(format_table(result_table(self.record.data), "result"))

    def _writes_records(self) -> bool:
        """Rank 0 writes the run's records; when rank 0 is lost, the lowest surviving rank writes summary.json."""
        if self.is_main:
            return True
        lost = self.heartbeat.lost if self.heartbeat is not None else None
        return bool(lost and lost[0] == 0 and self.heartbeat.lowest_alive() == self.env.rank)

    def _warn(self, message: str) -> None:
        log.warning(message)

    def _log(self, record: dict):
        """Every step goes to metrics.jsonl; W&B and the console get every --log_interval-th step, the steps
        that evaluated, and the last one (like torchtitan's log_freq: W&B costs ~1 ms of CPU per record)."""
        line = self.jsonl.log(record)
        step = record["step"]
        visible = step % self.cfg.log_interval == 0 or step == self.cfg.max_steps or "val_loss" in record
        if visible:
            self.wandb.log(line)
        self.console(record, visible)

    # -----------------------------------------------------------------------------------------------------
    # Training, in the order it happens

    def _train(self):
        device = self._set_up_device()
        self._start_monitor()  # before the model: the load's peak is one the monitor must see too
        self.peaks.mark_before_model()
        with loading.host_memory_returned():
            model, counts = self._build_model(device)
            self._phase("model_build_s")
            engine = self._initialize(model)
        self._phase("ds_initialize_s")
        self.peaks.close("load", then="warmup")  # from here on the peaks are training's, not the load's
        trainer = self._make_trainer(engine, device)
        start, save = self._checkpointing(engine)
        self._phase("setup_s")
        res = trainer.run(self.cfg.max_steps, self.cfg.warmup_steps, self.cfg.eval_interval, start,
                          self.cfg.save_interval, save)
        if res.preempted:
            by = signals.requested_signal() or "a signal to another rank"
            self.record.end(res.stop_status, f"stopped by {by} after step {len(res.records)}")
        if self.console:
            self.console.close()
        self._record_results(res, engine, counts)

    def _set_up_device(self):
        import torch
        env = self.env
        torch.set_num_threads(env.cpu_threads)  # torch may have been imported before OMP_NUM_THREADS was set
        per_task = os.environ.get("SLURM_CPUS_PER_TASK")  # what srun gave this task (slurm/common.sh passes it on)
        self.record.set(cpu_threads={"per_rank": torch.get_num_threads(), "source": env.cpu_threads_source,
                                     "local_ranks": env.local_world_size, "affinity_cpus": env.affinity_cpus,
                                     "slurm_cpus_per_task": int(per_task) if per_task and per_task.isdigit()
                                     else None})
        self.record.set(versions={**self.record["versions"], **device.versions()})
        return device.torch_device(self.device_index)  # selected with the process group (distributed.init)

    def _build_model(self, device):
        """The model as the strategy wants it (weights, LoRA, stages); -> (model, parameter counts before and
        after LoRA). A model-parallel layout builds on the meta device and materializes each rank's shard inside
        deepspeed.initialize (bench/loading.py)."""
        cfg, p = self.cfg, self.plan
        faults.slow_load()  # tests: a model load that takes a while
        zero3 = p.ds if p.zero_stage == 3 else None
        sharded = loading.shards_at_load(p)
        model, self._zero3_ctx = models.build_model(cfg.model, cfg.init, p.model_config, p.dtype, device, zero3,
                                                    cfg.seed, model_implementation(cfg.attn_implementation,
                                                                                   cfg.attn_mask), sharded=sharded)
        if cfg.activation_checkpointing:
            # Per decoder layer, in the layer itself (transformers' GradientCheckpointingLayer), so pipeline stages,
            # which call the layers directly, recompute the same way. Non-reentrant: frozen inputs (LoRA) need no
            # enable_input_require_grads.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        before = param_counts(model)
        if p.peft == "lora":
            model = apply_lora(model, cfg)
        after = param_counts(model)
        self._materializer = None
        if sharded:
            weights = models.weights_of(cfg.model, cfg.init, p.model_config, cfg.seed)
            self._materializer = loading.Materializer(model, weights, device)
            self._materializer.fill_adapters(model)
        with loading.stage_layers_only(self._materializer) if sharded else contextlib.nullcontext():
            model = p.strategy.prepare(model, p)
        if self.is_main:
            show(_param_table(before, after, p.peft))
        return model, (before, after)

    def _initialize(self, model):
        import deepspeed
        p = self.plan
        shapes = param_shapes(model)
        shards = loading.shards_only(self._materializer, placed=self.peaks.mark_model_placed) \
            if self._materializer else contextlib.nullcontext()
        with shards, p.strategy.initializing(p, model):
            # lazy: the engine reads it after AutoEP/AutoTP replaced layers (and LoRA re-wrapped AutoTP's)
            engine, *_ = deepspeed.initialize(model=model, config=p.ds, mpu=p.strategy.mpu,
                                              model_parameters=(q for q in model.parameters() if q.requires_grad))
        sections = p.strategy.after_initialize(p, engine, shapes)
        ops.keep_fp32_grad_norm(engine)
        self.record.set(optimizer=ops.optimizer_record(engine), dtypes=ops.dtypes_held(engine))
        self.record.set(**sections)
        text = p.strategy.describe(sections) if sections else None
        if self.is_main and text:
            show(text)
        return engine

    def _start_monitor(self):
        pids = distributed.node_pids()  # collective: every rank calls it
        if self.env.local_rank == 0:
            name = "device_monitor.csv" if self.is_main else f"device_monitor.{os.uname().nodename}.csv"
            from bench.monitor import DeviceMonitor
            self.monitor = DeviceMonitor(os.path.join(self.run_dir, name), self.cfg.monitor_interval_s,
                                         self.plan.device_type, pids).start()

    def _make_trainer(self, engine, device) -> Trainer:
        cfg, p = self.cfg, self.plan
        dp, dp_rank = p.layout.data_parallel, p.layout.coords(self.env.rank).data
        batches = ShardedBatches(p.train_data, p.batch.micro, p.batch.grad_accum, dp, dp_rank, cfg.seed, p.collate)
        val = val_batches(p.val_data, p.batch.micro, dp, dp_rank, cfg.eval_batches, p.collate)
        self.console = Console(cfg.max_steps, p.batch.global_) if self.is_main else None
        hangs = HangWatchdog(cfg.hang_timeout_s, cfg.dist_timeout_s, self._hung)
        self.trainer = Trainer(engine, p.strategy.build_runner(engine, device), batches, val, p.batch.global_,
                               device, p.throughput, self._log if self.is_main else None, self.peaks, hangs)
        return self.trainer

    def _checkpointing(self, engine):
        """-> (the result to resume from or None, save(step, result) or None). Resumable runs save when
        preempted."""
        cfg = self.cfg
        ckpt_dir = cfg.checkpoint_dir or os.path.join(self.run_dir, "checkpoints")
        start = self._resume(engine, ckpt_dir) if cfg.resume == "auto" else None
        save = None
        if cfg.save_interval or cfg.checkpoint_dir or cfg.resume == "auto":
            save = lambda step, r: checkpoint.save(engine, ckpt_dir, step, {"result": asdict(r)})  # noqa: E731
        return start, save

    def _record_results(self, res, engine, counts):
        p, env = self.plan, self.env
        before, after = counts
        self.record.fill_results(res, p)
        if not self._kept_start and res.first_step_end is not None and res.first_step_end >= self.t0:
            # this process ran the run's first step (a resume keeps the first launch's, _open_records)
            self.record.startup(first_step_s=res.first_step_end - self._phase_start)
            self.record.set(time_to_first_step_s=res.first_step_end - self.t0)
        self.peaks.close("training", then=None)
        mem = distributed.gather({"rank": env.rank, **self.peaks.record()})
        held = param_counts(engine.module)  # after deepspeed.initialize: TP shards, EP experts, ZeRO-3 partitions
        local = distributed.gather({"rank": env.rank, "total": held["local"], "trainable": held["local_trainable"]})
        self.record.memory(per_rank=mem)
        if p.memory_plan:
            self.record.memory(plan_check=metrics.plan_check([r["total_bytes"] for r in p.memory_plan["per_rank"]],
                                                             [m["peak_allocated_mib"] for m in mem]))
        self.record.set(accounting={"per_rank": distributed.gather({"rank": env.rank, **self._accounting(engine)})})
        self.record.set(params={"total": after["total"], "trainable": after["trainable"],
                                "before_peft": before["total"], "per_rank": local})
        self.record.set(**p.strategy.after_training(p, res, local))
        if p.peft == "lora":  # the adapters, loadable into peft (pipeline stages are not a peft model: not saved)
            save_adapters(engine, os.path.join(self.run_dir, "adapter"), self.is_main)

    def _accounting(self, engine) -> dict:
        """What the runner counted during its first two steps (a run that stopped before them: the model states
        and null for the rest)."""
        from bench.accounting import FIELDS, model_states
        unknown = dict.fromkeys(FIELDS)
        counted = getattr(self.trainer.runner, "accounting", None)
        if counted:
            return {**unknown, **counted}  # a run of one step counted no communication
        states = model_states(engine)
        return {**unknown, "params_bytes": states["params_bytes"], "optimizer_bytes": states["optimizer_bytes"]}

    def _resume(self, engine, ckpt_dir: str) -> TrainResult:
        """Continue from the newest complete checkpoint (or from scratch without one). Steps metrics.jsonl holds
        beyond it were done and lost: they are dropped from the file, recomputed, and their time is counted."""
        tag, state = checkpoint.load_newest_readable(engine, ckpt_dir, warn=self._warn)
        result = dict(state["result"]) if tag else {}
        if tag and "measured_work" not in result:  # written before the work was counted: unknown if any was timed
            result.pop("measured_real_tokens", None)
            result["measured_work"] = None if result.get("step_times") else [0, 0, 0, 0]
        res = TrainResult(**result)
        res.preempted, res.stop_status = False, None
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
            log.info(f"resuming after step {len(res.records)} ({tag or 'no checkpoint: from the start'}); "
                     f"{lost[0]} step(s) lost and recomputed")
        return res

    def _record_partial(self):
        """After an error: what this rank measured so far, without collectives (other ranks may be gone)."""
        res = self.trainer.res if self.trainer is not None else None
        if res is not None and res.records:
            self.record.fill_results(res, self.plan)
        if self.peaks is not None:
            self.record.memory(per_rank=[{"rank": self.env.rank, **self.peaks.record()}])


def _param_table(before: dict, after: dict, peft: str) -> str:
    rows = [("trainable params", f"{before['trainable']:,}"), ("non-trainable params", f"{before['non_trainable']:,}"),
            ("total params", f"{before['total']:,}")]
    out = format_table(rows, "parameters" + (" before LoRA" if peft == "lora" else ""))
    if peft == "lora":
        rows = [("trainable params", f"{after['trainable']:,} ({after['trainable'] / after['total']:.3%})"),
                ("non-trainable params", f"{after['non_trainable']:,}"), ("total params", f"{after['total']:,}")]
        out += "\n" + format_table(rows, "parameters after LoRA")
    return out
