"""The training loop: timed optimizer steps, periodic evaluation, per-step records.

Timing rule: the device is synchronized before the clock starts and before it stops, so a step's time is the
device's time, not the launch queue's; the per-step all-gather that follows (outside the timed region) makes
every rank see the slowest rank's time, which is the step's time.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bench import compiling, faults, signals
from bench.accounting import INSTRUMENTED_STEPS
from bench.data import IGNORE
from bench.log import show


@dataclass
class TrainResult:
    records: list = field(default_factory=list)      # one dict per step (what metrics.jsonl gets)
    step_times: list = field(default_factory=list)   # slowest-rank step times, warm-up excluded
    rank_step_times: list = field(default_factory=list)  # per measured step: every rank's own time (stragglers)
    losses: list = field(default_factory=list)       # (step, loss, seconds since training start)
    val_loss: float | None = None
    applied_updates: int = 0
    useful_tokens: int = 0
    # the measured (timed) steps' [real tokens, computed tokens, real pairs, computed pairs] (bench/data.py
    # MicroBatch.work); None: not counted (resumed from a checkpoint written before they were)
    measured_work: list | None = field(default_factory=lambda: [0, 0, 0, 0])
    train_wall_s: float = 0.0
    first_step_end: float | None = None              # time.time() at the end of this process's first step
    busy_s: list = field(default_factory=list)       # per rank: compute seconds over measured steps (pipeline)
    preempted: bool = False                          # a rank was signalled; every rank stopped after the same step
    stop_status: str | None = None                   # then: "preempted" or "interrupted" (bench/signals.py)
    resumed_at: list = field(default_factory=list)   # checkpoint steps this run resumed from
    lost_steps: int = 0                              # steps done after the last checkpoint, then recomputed
    lost_s: float = 0.0                              # the wall time those steps took (part of train_wall_s)
    recompiled_steps: list = field(default_factory=list)  # steps after warm-up the compiler ran in: untimed


class Trainer:
    def __init__(self, engine, runner, batches, val_batches, global_batch: int, device, rates, on_record,
                 peaks=None, watchdog=None, compiled: bool = False):
        self.engine, self.runner, self.batches, self.val = engine, runner, batches, val_batches
        # Model-parallel ranks of one replica see the same tokens; sums over all ranks count each `replicas` times.
        self.replicas = dist.get_world_size() // batches.dp
        self.global_batch, self.device = global_batch, device
        self.rates = rates  # step times -> throughput dict (metrics.throughput with this run's constants)
        self.res = None
        self.faults = faults.StepFaults(dist.get_rank())  # the tests' fault injection (bench/faults.py)
        self.on_record = on_record  # rank 0: writes metrics.jsonl / W&B / console; others: None
        self.peaks = peaks  # bench/device.py MemoryPeaks: the training phase starts with the first timed step
        self.watchdog = watchdog  # bench/watchdog.py: no step completed within its bound -> the run is hung
        self.compiled = compiled  # --compile on: each step records the compile time it held (bench/compiling.py)
        from deepspeed.accelerator import get_accelerator
        self.acc = get_accelerator()
        self.sync = self.acc.synchronize  # a no-op on the CPU, where every op has finished when it returns

    def _gather(self, values: list[float]) -> torch.Tensor:
        """[world, len(values)] of every rank's values. One small collective per step, outside the timer."""
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_world_size() == 1:
            return t.unsqueeze(0)
        t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        return torch.stack(out).cpu()

    def train_step(self, step: int) -> tuple[float, float, int, list[int], bool]:
        """One optimizer step (accum micro-batches). -> (local seconds, mean micro-batch loss (this rank's part
        where several ranks' add up to it: runner.loss_parts), target tokens, this rank's work (bench/data.py
        MicroBatch.work, summed), whether the update was applied).

        Every count comes from the collator's host-side lengths, so the timed window holds the runner's step and
        nothing else: no host read of a device value, no collective of the harness's own."""
        batches = self.batches.step_batches(step - 1)
        work = [sum(w) for w in zip(*(b.work for b in batches))]
        tokens = sum(b.target_tokens for b in batches)
        micro = [b.to(self.device) for b in batches]
        skipped_before = self.engine.skipped_steps
        self.faults.at_step(step)
        self._start_together()
        t0 = time.perf_counter()
        loss = self.runner.train_step(micro)
        self.sync()  # wait for the last kernels (optimizer step) before reading the clock
        dt = time.perf_counter() - t0
        applied = self.engine.skipped_steps == skipped_before
        return dt, float(loss), tokens, work, applied

    def _start_together(self) -> None:
        """Start every rank's clock at the same moment: a barrier after the previous step's bookkeeping (rank 0
        writes metrics.jsonl, W&B and the console while the others would already be timing their next step, and
        wait for rank 0 in its first collective), then the device drained, so the clock starts on an idle device.
        Both are outside the timed window."""
        if dist.get_world_size() > 1:
            dist.barrier()
        self.sync()

    def _not_a_step(self):
        """Evaluation and checkpoint saves: the hang watchdog waits while they run (bench/watchdog.py)."""
        return self.watchdog.suspended() if self.watchdog is not None else contextlib.nullcontext()

    def _memory_now(self) -> dict:
        """Per step: allocated now and the current phase's peak on GPUs, RSS on the CPU."""
        if self.device.type == "cuda":
            return {"memory/allocated_mib": self.acc.memory_allocated() / 2**20,
                    "memory/peak_allocated_mib": self.acc.max_memory_allocated() / 2**20}
        from bench.metrics import current_rss_mib
        return {"memory/rss_mib": current_rss_mib()}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean loss over the validation micro-batches (disjoint across DP ranks). Ranks that
        compute no loss (pipeline stages before the last) contribute nothing."""
        self.engine.eval()
        loss_x_tokens, tokens = 0.0, 0
        for b in self.val:
            loss = self.runner.eval_loss(b.to(self.device))
            if loss is not None:
                n = b.target_tokens
                loss_x_tokens += loss * n
                tokens += n
        self.engine.train()
        totals = self._gather([loss_x_tokens, tokens]).sum(0)  # replicas cancel in the ratio
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    def run(self, max_steps: int, warmup_steps: int, eval_interval: int, res: TrainResult | None = None,
            save_interval: int = 0, save=None) -> TrainResult:
        """Steps len(res.records)+1 .. max_steps; res is a checkpoint's result when resuming. save(step, res)
        writes a checkpoint every save_interval steps and when the ranks stop for a signal."""
        res = res or TrainResult()
        self.res = res  # what the session records if the loop dies
        # from_pretrained returns the model in eval mode: training mode turns on dropout where a model has it, and
        # the activation checkpointing of --activation_checkpointing, which Hugging Face applies only in training.
        self.engine.train()
        signals.training(True)
        if self.watchdog is not None:
            self.watchdog.start(len(res.records) + 1)
        try:
            return self._run(res, max_steps, warmup_steps, eval_interval, save_interval, save)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            # Every rank is past its last step: what follows only records the run (collectives included), so a
            # signal now must not make one rank leave while the others wait for it. A signal noted during the
            # last step is already in the result.
            signals.closing()

    def _run(self, res, max_steps, warmup_steps, eval_interval, save_interval, save) -> TrainResult:
        consumed = len(res.records) * self.global_batch
        t_start = time.perf_counter() - res.train_wall_s  # elapsed time continues across a resume
        first = len(res.records) + 1
        # Not timed: this process's first steps, after a resume too (cold caches, allocator growth), and at least
        # the steps the runner instruments to count what it holds and moves (bench/accounting.py: the comms
        # logger synchronizes the device around every collective there).
        untimed = max(warmup_steps, INSTRUMENTED_STEPS)
        for step in range(first, max_steps + 1):
            timed = step - first >= untimed
            if timed and step - first == untimed and self.peaks is not None:
                self.peaks.close("warmup", then="training")
            compiled_before = compiling.seconds()
            dt, loss, tokens, work, applied = self.train_step(step)
            # Everyone learns the slowest rank's time, the mean loss and the global token counts.
            g = self._gather([dt, loss, tokens, float(applied), self.runner.busy_s,
                              float(signals.STOP_CODES[signals.requested()]), compiling.seconds() - compiled_before,
                              *work])
            step_time, mean_loss = float(g[:, 0].max()), float(g[:, 1].mean()) * self.runner.loss_parts
            step_tokens = int(g[:, 2].sum()) // self.replicas
            step_work = [int(x) // self.replicas for x in g[:, 7:].sum(0).tolist()]
            all_applied = bool(g[:, 3].min() > 0)
            compile_s = float(g[:, 6].max())  # the slowest rank's compile time inside this step
            if timed and compile_s > 0:  # a recompile (a new shape) is not steady state: left out of the timing
                timed = False
                res.recompiled_steps.append(step)
            if step == first:  # this process's first step (after a resume too)
                res.first_step_end = time.time()
            consumed += self.global_batch
            elapsed = time.perf_counter() - t_start
            if timed:
                res.step_times.append(step_time)
                res.rank_step_times.append(g[:, 0].tolist())
                if res.measured_work is not None:
                    res.measured_work = [a + b for a, b in zip(res.measured_work, step_work)]
                res.busy_s = [a + b for a, b in zip(res.busy_s or [0.0] * len(g), g[:, 4].tolist())]
            if all_applied:
                res.applied_updates += 1
                res.useful_tokens += step_tokens
            res.losses.append((step, mean_loss, elapsed))
            record = {"step": step, "loss": mean_loss, "lr": self.engine.lr(),
                      "grad_norm": _maybe_float(self.engine.grad_norm()),
                      "step_time_s": step_time, **self.rates([step_time], step_work), "consumed_samples": consumed,
                      "real_tokens": step_work[0], "computed_tokens": step_work[1], "target_tokens": step_tokens,
                      "applied": all_applied, "warmup": not timed, "elapsed_s": elapsed,
                      **self._memory_now()}
            if self.compiled:
                record["compile_s"] = compile_s  # inside step_time_s
            stop = int(g[:, 5].max())  # any rank signalled: all stop here; Ctrl-C outranks preemption
            res.preempted = stop > 0
            res.stop_status = next((k for k, v in signals.STOP_CODES.items() if v == stop), None)
            if self.watchdog is not None:
                self.watchdog.progress(step, step_time)
            if not res.preempted and ((eval_interval and step % eval_interval == 0) or step == max_steps):
                with self._not_a_step():
                    res.val_loss = record["val_loss"] = self.evaluate()
            res.records.append(record)
            if self.on_record:
                self.on_record(record)
            res.train_wall_s = time.perf_counter() - t_start
            if save and ((save_interval and step % save_interval == 0) or res.preempted):
                with self._not_a_step():
                    save(step, res)
            if res.preempted:
                break
        res.train_wall_s = time.perf_counter() - t_start
        return res


def target_tokens(batch: dict) -> int:
    """Tokens the loss is computed on: labels shifted by one (next-token prediction), minus the ignored ones (an
    independent count of what the collator records as MicroBatch.target_tokens)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _maybe_float(x):
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)




class Console:
    """The familiar NeMo-style line, plus a progress bar when a terminal is attached."""

    def __init__(self, max_steps: int, global_batch: int):
        self.max_steps, self.global_batch = max_steps, global_batch
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, desc="train", unit="step", leave=False)

    def __call__(self, r: dict, visible: bool) -> None:
        if self.bar:
            self.bar.update(1)
        if not visible:
            return
        line = (f"iteration {r['step']}/{self.max_steps} | lr {r['lr']:.3e} | "
                f"global_batch_size {self.global_batch} | "
                f"reduced_train_loss {r['loss']:.4f} | train_step_timing in s {r['step_time_s']:.4f} | "
                f"consumed_samples {r['consumed_samples']}")
        if r.get("val_loss") is not None:
            line += f" | val_loss {r['val_loss']:.4f}"
        if self.bar:
            self.bar.write(line)
        else:
            show(line)

    def close(self):
        if self.bar:
            self.bar.close()
