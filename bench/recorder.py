"""What a run leaves behind, and how every ending is told: the run directory, config.json, summary.json,
metrics.jsonl, W&B and the device monitor.

Rank 0 owns the run directory's files (the lowest surviving rank writes summary.json when rank 0 is lost).
Whatever happens after the directory exists, summary.json says how the run ended (completed | failed | oom |
preempted | interrupted), and everything recorded before an error stays on disk: `ending()` classifies each way
out (bad input, a signal, a full disk, an out-of-memory error, a lost peer, a hang, a bug) and gives its exit code.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback

from bench import checkpoint, compiling, distributed, liveness, metrics, signals
from bench.config import BenchError, format_table
from bench.log import log, note, show
from bench.loggers import JsonlLogger, WandbLogger, release_reserve, reserve_space, write_json_atomic
from bench.strategies.common import param_counts
from bench.summary import RunRecord, result_table
from bench.train import TrainResult
from bench.watchdog import dump_stacks

PEER_GRACE_S = 5.0  # how long the heartbeat's watch lets the main thread record a lost peer itself


class RunRecorder:
    def __init__(self, cfg, env, plan, process_start: float):
        self.cfg, self.env, self.plan, self.t0 = cfg, env, plan, process_start
        self.is_main = env.rank == 0
        self.record = RunRecord(plan, env.world_size)
        # Start-up phases are consecutive, so they add up to time_to_first_step_s (docs/metrics.md).
        self._phase_start = time.time()
        self.record.startup(imports_s=self._phase_start - process_start - sum(plan.phases.values()), **plan.phases)
        self.run_dir = self.launch_id = None
        self.jsonl = self.wandb = self.monitor = self.heartbeat = self.console = None
        self.trainer = self.peaks = None  # set by the session as they come to exist: an ending records from them
        # rank 0, resuming (_open_records): the earlier launches' wall time, and whether the run's start (its first
        # launch's time to first step and start-up phases) is kept from them
        self._prior_wall, self._kept_start = 0.0, False
        self._end_lock, self._ending = threading.Lock(), False
        self.code = 0

    def phase(self, name: str) -> None:
        """Closes the start-up phase `name` (seconds since the previous one ended)."""
        now = time.time()
        if not self._kept_start:  # a resume keeps the run's start: the first launch's phases
            self.record.startup(**{name: now - self._phase_start})
        self._phase_start = now

    # -----------------------------------------------------------------------------------------------------
    # How the run ended

    @staticmethod
    def refused(e: BaseException) -> int:
        """Before the run directory exists (the process group's start): refused like bad input -> exit code."""
        signals.closing()
        stopped = isinstance(e, signals.Stopped)
        if stopped:  # not an error line: a launcher stops the other ranks this way when one failed to start
            note(f"{e} during start-up, before the run directory existed")
        else:
            log.error(str(e))
        distributed.shutdown(clean=False)
        return signals.EXIT_CODE[e.status] if stopped else 2

    @contextlib.contextmanager
    def ending(self):
        """Around everything from the run directory on: whatever ends it is recorded, the records are closed and
        the process group torn down; self.code is the exit code."""
        together = False
        try:
            yield
            together = True  # every rank left the loop after the same step, so they can meet once more
            self._own_the_ending()  # ranks finish at different moments: no verdict on a peer from here on
            if self.record["status"] in signals.EXIT_CODE:
                self.code = signals.EXIT_CODE[self.record["status"]]
            else:
                self.record.end("completed")
        except distributed.AlreadyCompleted as e:  # a sweep submitted again: its finished runs stay as they are
            signals.closing()
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
            self.code = code
        except BenchError as e:
            self._fail("failed", str(e), 2)
        except OSError as e:  # a full disk, a lost mount: the path and the reason, not a traceback
            self._fail("failed", f"I/O error: {e.filename or ''}: {e.strerror or e}", 1)
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
            self.code = code
        finally:
            self._close_records(self.code)
            distributed.shutdown(clean=together)

    def _fail(self, status: str, error: str, code: int) -> None:
        signals.closing()  # leaving: a launcher's SIGTERM to the ranks must not cut the recording short
        self._own_the_ending()
        self.record.end(status, error)
        self._record_partial()
        log.error(self.record["error"])
        self.code = code

    def stopped(self, res) -> None:
        """Training stopped for a signal after a step every rank finished."""
        by = signals.requested_signal() or "a signal to another rank"
        self.record.end(res.stop_status, f"stopped by {by} after step {len(res.records)}")

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
            _leave(code)

    def hung(self, step: int, silent: float, limit: float, frame: str) -> None:
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
            _leave(code)

    # -----------------------------------------------------------------------------------------------------
    # Records: rank 0 owns the run directory's files

    def open(self) -> None:
        """The run directory (refused if that run completed already), the heartbeat, and rank 0's records."""
        out = self.cfg.logging
        self.run_dir, self.launch_id = distributed.make_run_dir(
            out.output_dir, out.run_name or self._default_name(), reuse=self.cfg.checkpoint.resume == "auto",
            max_steps=self.cfg.training.max_steps)
        self.record.set(run_dir=self.run_dir)
        self.heartbeat = liveness.Heartbeat(self.run_dir, self.env.rank, self.env.world_size, self.launch_id,
                                            liveness.peer_timeout(self.cfg.training.dist_timeout_s), self._peer_lost)
        self.heartbeat.start()
        if self.is_main:
            self._open_records()
        self.phase("run_records_s")

    def _default_name(self) -> str:
        model = os.path.basename(self.cfg.model.name.rstrip("/"))
        return (f"{model}-{self.cfg.parallelism.strategy}-{self.plan.peft}-w{self.env.world_size}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}")

    def _open_records(self):
        d, p = self.run_dir, self.plan
        config = p.config_record(self.env.world_size)
        earlier = {}  # the summary of the launch this one resumes
        if self.cfg.checkpoint.resume == "auto" and os.path.isfile(os.path.join(d, "summary.json")):
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
        tags = [self.cfg.parallelism.strategy, os.path.basename(self.cfg.model.name), f"world{self.env.world_size}",
                f"peft-{p.peft}", f"engine-{p.strategy.engine}"]
        if p.zero_stage is not None:
            tags.append(f"zero{p.zero_stage}")
        self.wandb = WandbLogger(self.cfg, d, os.path.basename(d), config, tags, resume_id)
        self.record.set(wandb_run_id=self.wandb.run_id)
        self.record.write(os.path.join(d, "summary.json"))  # with the W&B id: a survivor keeps it if rank 0 dies

    def start_monitor(self) -> None:
        """The device monitor, one per node (before the model: the load's peak is one it must see too)."""
        pids = distributed.node_pids()  # collective: every rank calls it
        if self.env.local_rank == 0:
            name = "device_monitor.csv" if self.is_main else f"device_monitor.{os.uname().nodename}.csv"
            from bench.monitor import DeviceMonitor
            self.monitor = DeviceMonitor(os.path.join(self.run_dir, name), self.cfg.logging.monitor_interval_s,
                                         self.plan.device_type, pids).start()

    def step(self, record: dict):
        """Rank 0, every step: metrics.jsonl gets it; W&B and the console every --log_interval-th step, the steps
        that evaluated, and the last one (like torchtitan's log_freq: W&B costs ~1 ms of CPU per record)."""
        line = self.jsonl.log(record)
        step = record["step"]
        visible = (step % self.cfg.logging.log_interval == 0 or step == self.cfg.training.max_steps
                   or "val_loss" in record)
        if visible:
            self.wandb.log(line)
        self.console(record, visible)

    def _close_records(self, code: int):
        """Whatever ended the run, and however far start-up got: the summary says how it ended."""
        signals.closing()
        if self.console:
            self.console.close()
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

    # -----------------------------------------------------------------------------------------------------
    # Results

    def resume(self, engine, ckpt_dir: str) -> TrainResult:
        """Continue from the newest complete checkpoint (or from scratch without one). Steps metrics.jsonl holds
        beyond it were done and lost: they are dropped from the file, recomputed, and their time is counted."""
        tag, state = checkpoint.load_newest_readable(engine, ckpt_dir, warn=log.warning)
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
        log.info(f"resuming after step {len(res.records)} ({tag or 'no checkpoint: from the start'}); "
                 f"{lost[0]} step(s) lost and recomputed")
        return res

    def results(self, res, built) -> None:
        """The finished loop's results, every rank's memory, holdings and parameters (collectives: every rank)."""
        p, env = self.plan, self.env
        self.record.fill_results(res, p)
        if not self._kept_start and res.first_step_end is not None and res.first_step_end >= self.t0:
            # this process ran the run's first step (a resume keeps the first launch's, _open_records)
            self.record.startup(first_step_s=res.first_step_end - self._phase_start)
            self.record.set(time_to_first_step_s=res.first_step_end - self.t0)
        self.peaks.close("training", then=None)
        mem = distributed.gather({"rank": env.rank, **self.peaks.record()})
        held = param_counts(built.engine.module)  # after the engine's creation: TP shards, EP experts, ZeRO-3 parts
        local = distributed.gather({"rank": env.rank, "total": held["local"], "trainable": held["local_trainable"]})
        self.record.memory(per_rank=mem)
        if p.memory_plan:
            self.record.memory(plan_check=metrics.plan_check([r["total_bytes"] for r in p.memory_plan["per_rank"]],
                                                             [m["peak_allocated_mib"] for m in mem]))
        self.record.set(accounting={"per_rank": distributed.gather({"rank": env.rank,
                                                                    **self._accounting(built.engine)})})
        compiled = p.cfg.compile.enable == "on"
        counts = distributed.gather({"rank": env.rank, **compiling.counted()} if compiled else {})
        self.record.set(compile=compiling.summary(compiled, p.cfg.compile.backend, p.ds, counts, res))
        after = built.params_after
        self.record.set(params={"total": after["total"], "trainable": after["trainable"],
                                "before_peft": built.params_before["total"], "per_rank": local})
        self.record.set(**p.strategy.after_training(p, res, local))

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

    def _record_partial(self):
        """After an error: what this rank measured so far, without collectives (other ranks may be gone)."""
        res = self.trainer.res if self.trainer is not None else None
        if res is not None and res.records:
            self.record.fill_results(res, self.plan)
        if self.peaks is not None:
            self.record.memory(per_rank=[{"rank": self.env.rank, **self.peaks.record()}])


def _leave(code: int) -> None:
    """End the process from a watch thread: the main thread may never return from the collective it waits in."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
