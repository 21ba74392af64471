"""Fault soak: external faults injected at random into real 2-rank runs, each then resumed, and what became of them.

    python measurements/fault_soak.py --trials 30 --seed 1 --out docs/results/fault_soak_cpu.md

Every trial starts the default job's shape (tiny LLaMA, ZeRO-2, 2 ranks under the deepspeed launcher, a checkpoint
every 3 steps, --resume auto) and, after a random step and a random fraction of a step, does one of:
SIGKILL / SIGTERM / SIGINT to a random rank or to the launcher (the `deepspeed` command, or its per-node
`deepspeed.launcher.launch`), a second launch on the same port or on the same run directory, a truncated or a
deleted newest checkpoint (after a preemption), a full disk (the run directory on a tmpfs too small for the
checkpoints; root only), the same command again on a run that completed (nothing may change), the heartbeat files'
mtimes kept 90 s in the past (a skewed clock or NFS attribute caching: the run must not stop), or a hang with every
rank alive (one rank never enters step N's collectives; --hang_timeout_s 5). The faults are drawn in a shuffled
round, so every one is drawn as often as the trials allow. Then it waits for every process of the launch (bounded: a process alive past the bound
is a hang, and is killed), reads the status it left, and resumes with the same command until the run completes.
The table: hangs, runs left `running`, the final losses against an uninterrupted run's (exact: fp32 on the CPU),
and the steps lost against the checkpoint interval. Exit 1 when a trial hung, left `running`, or ended with
other losses.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import common  # measurements/common.py, next to this script

sys.path.insert(0, common.REPO)
from bench.launch_guard import parent_of  # noqa: E402

SAVE_EVERY, STEPS = 3, 12
JOB = ["bench/run.py", "--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "none", "--lr",
       "1e-3", "--max_steps", str(STEPS), "--warmup_steps", "1", "--seq_len", "128", "--micro_batch_size", "2",
       "--global_batch_size", "4", "--eval_interval", "0", "--wandb_mode", "disabled", "--dist_timeout_s", "60"]
RESUMABLE = ["--run_name", "job", "--resume", "auto", "--save_interval", str(SAVE_EVERY)]
BOUND_S = 120  # every process of a launch has exited this long after the fault, or it hung
FAULTS = ("sigkill_rank", "sigterm_rank", "sigint_rank", "sigkill_launch", "sigterm_deepspeed", "sigint_deepspeed",
          "sigkill_deepspeed", "second_port", "second_dir", "truncate_checkpoint", "delete_checkpoint", "full_disk",
          "resume_completed", "skewed_heartbeat", "hang")


def start(out: str, port: int, extra=(), env=None) -> subprocess.Popen:
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           *JOB, "--output_dir", out, *RESUMABLE, *extra]
    log = open(os.path.join(os.path.dirname(out), f"launch-{time.time_ns()}.log"), "w")
    # own session: a fault to "the launcher" hits the command; the process group is what a hang check covers
    return subprocess.Popen(cmd, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def negative_durations(s: dict) -> int:
    """Durations (keys ending in _s, at any depth) below zero in a summary."""
    if isinstance(s, dict):
        return sum((1 if k.endswith("_s") and isinstance(v, (int, float)) and v < 0 else 0) + negative_durations(v)
                   for k, v in s.items())
    return sum(negative_durations(v) for v in s) if isinstance(s, list) else 0


def record_bytes(out: str) -> dict:
    """The completed run's record, byte for byte: summary.json, metrics.jsonl, config.json."""
    d = os.path.join(out, "job")
    kept = {}
    for name in ("summary.json", "metrics.jsonl", "config.json"):
        with open(os.path.join(d, name), "rb") as fh:
            kept[name] = fh.read()
    return kept


class SkewedHeartbeats:
    """Keeps every heartbeat file's mtime 90 s in the past while a run goes on (another host's clock behind this
    one's, or NFS attribute caching): a healthy run must not call a peer lost for it."""

    def __init__(self, out: str):
        import threading
        self.dir, self.stop = os.path.join(out, "job", ".ranks"), threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop.wait(0.3):
            for name in os.listdir(self.dir) if os.path.isdir(self.dir) else ():
                try:
                    os.utime(os.path.join(self.dir, name), (time.time() - 90,) * 2)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join()


def records(out: str) -> list[dict]:
    from bench.loggers import read_records
    path = os.path.join(out, "job", "metrics.jsonl")
    return read_records(path) if os.path.isfile(path) else []


def summary(out: str) -> dict:
    try:
        with open(os.path.join(out, "job", "summary.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def rank_pids(out: str) -> list[int]:
    ranks = os.path.join(out, "job", ".ranks")
    pids = []
    for name in sorted(os.listdir(ranks)) if os.path.isdir(ranks) else ():
        try:
            with open(os.path.join(ranks, name)) as fh:
                pids.append(json.load(fh)["pid"])
        except (OSError, ValueError, KeyError):
            pass
    return pids


def alive(pids) -> list[int]:
    from bench.liveness import process_gone
    return [p for p in pids if p and not process_gone(p)]


def wait_steps(out: str, n: int, proc, limit: float = 120) -> bool:
    t0 = time.time()
    while len(records(out)) < n:
        if proc.poll() is not None or time.time() - t0 > limit:
            return False
        time.sleep(0.05)
    return True


def settle(procs: list, pids: list[int]) -> bool:
    """Wait for the launches and the ranks they started. -> whether something hung past BOUND_S (then killed)."""
    t0, hung = time.time(), False
    while time.time() - t0 < BOUND_S and (any(p.poll() is None for p in procs) or alive(pids)):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            hung = True
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    for pid in alive(pids):
        hung = signal_if_alive(pid, signal.SIGKILL) or hung
    return hung


def newest_checkpoint(out: str) -> str | None:
    d = os.path.join(out, "job", "checkpoints")
    steps = sorted(n for n in os.listdir(d) if n.startswith("step")) if os.path.isdir(d) else []
    return os.path.join(d, steps[-1]) if steps else None


class Tmpfs:
    """A small tmpfs for the full-disk trial (root only): too small for the run's checkpoints, then grown."""

    def __init__(self, path: str, size: str):
        self.path = path
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)

    def grow(self, size: str):
        subprocess.run(["mount", "-o", f"remount,size={size}", self.path], check=True)

    def close(self):
        subprocess.run(["umount", "-l", self.path], check=False)


ENDED = "the run ended before the fault"  # a trial whose run outran it: recorded, not a crash of the soak


def signal_if_alive(pid: int, sig: int) -> bool:
    """Signal pid; False where it had already exited (its run finished before the fault could land)."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def schedule(trials: int, rng: random.Random) -> list[str]:
    """The faults of the trials: shuffled rounds of every fault, so each is drawn as often as the trials allow."""
    kinds = [f for f in FAULTS if f != "full_disk" or os.geteuid() == 0]
    out = []
    while len(out) < trials:
        round_ = list(kinds)
        rng.shuffle(round_)
        out += round_
    return out[:trials]


def trial(i: int, fault: str, rng: random.Random, root: str, reference: list[float]) -> dict:
    from bench.distributed import free_port
    # a damaged newest checkpoint needs an earlier complete one to fall back to (the first is written at step
    # SAVE_EVERY); with none readable the resume is refused by design (docs/reliability.md), not a soak finding
    first = SAVE_EVERY + 1 if fault in ("truncate_checkpoint", "delete_checkpoint") else 1
    at_step, delay = rng.randint(first, STEPS - 2), rng.uniform(0, 0.15)
    base = os.path.join(root, f"t{i}")
    out = os.path.join(base, "runs")
    os.makedirs(base)
    disk = Tmpfs(out, "2M") if fault == "full_disk" else None
    port = free_port()
    target = rng.randrange(2)
    skew, rewritten, negative = None, False, 0
    try:
        env = {"BENCH_FAULT_HANG_STEP": str(at_step + 1), "BENCH_FAULT_RANK": str(target)} if fault == "hang" else {}
        if fault == "sigkill_deepspeed":  # the ranks notice within a heartbeat (2 s): steps long enough to see it
            env = {"BENCH_FAULT_SLOW_STEP_S": "1.0"}
        first = start(out, port, ("--hang_timeout_s", "5") if fault == "hang" else (), env=env)
        procs, note = [first], ""
        reached = wait_steps(out, at_step, first)
        time.sleep(delay)
        pids = rank_pids(out)
        if fault == "skewed_heartbeat":
            skew = SkewedHeartbeats(out)
        if fault.endswith("_rank") and reached and pids:
            sig = {"sigkill_rank": signal.SIGKILL, "sigterm_rank": signal.SIGTERM, "sigint_rank": signal.SIGINT}[fault]
            note = f"rank {target}" if signal_if_alive(pids[min(target, len(pids) - 1)], sig) else ENDED
        elif fault == "sigkill_launch" and pids and parent_of(pids[0]):
            note = "" if signal_if_alive(parent_of(pids[0]), signal.SIGKILL) else ENDED
        elif fault in ("sigterm_deepspeed", "sigint_deepspeed", "sigkill_deepspeed"):
            first.send_signal({"sigterm_deepspeed": signal.SIGTERM, "sigint_deepspeed": signal.SIGINT,
                               "sigkill_deepspeed": signal.SIGKILL}[fault])
        elif fault == "hang":
            note = f"rank {target}, step {at_step + 1}"
        elif fault in ("second_port", "second_dir"):
            procs.append(start(out, port if fault == "second_port" else free_port()))
        elif fault in ("truncate_checkpoint", "delete_checkpoint"):
            # preempted: it saves, then the newest is damaged
            note = "" if pids and signal_if_alive(pids[0], signal.SIGTERM) else ENDED
        hung = settle(procs, pids)
        if skew:
            skew.close()
        after = summary(out)
        status, negative = after.get("status"), negative_durations(after)
        left_running = status == "running"
        if fault == "resume_completed" and status == "completed":
            kept = record_bytes(out)  # the sweep submitted again: the finished run must stay as it is
            again = start(out, free_port())
            hung = settle([again], []) or hung
            rewritten = again.returncode != 0 or record_bytes(out) != kept
            note = "nothing changed" if not rewritten else "REWRITTEN"
        ckpt = newest_checkpoint(out)
        if fault == "truncate_checkpoint" and ckpt:
            for name in os.listdir(ckpt):
                if name.endswith("model_states.pt"):
                    with open(os.path.join(ckpt, name), "r+b") as fh:
                        fh.truncate(64)
        elif fault == "delete_checkpoint" and ckpt:
            shutil.rmtree(ckpt)
        if disk:
            disk.grow("256M")
        attempts, final = 0, summary(out)
        while final.get("status") != "completed" and attempts < 4:
            attempts += 1
            resume = start(out, free_port())
            rp = []
            t0 = time.time()
            while resume.poll() is None and time.time() - t0 < BOUND_S:
                rp = rank_pids(out) or rp
                time.sleep(0.2)
            hung = settle([resume], rp) or hung
            final = summary(out)
            negative += negative_durations(final)
        losses = [r["loss"] for r in records(out)]
        exact = len(losses) == len(reference) and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(losses, reference))
        return {"trial": i, "fault": fault, "at_step": at_step, "target": note, "status_after_fault": status,
                "hung": hung, "left_running": left_running, "resumes": attempts, "final": final.get("status"),
                "exact": exact, "lost_steps": final.get("lost_steps"), "resumed_at": final.get("resumed_at"),
                "negative": negative, "rewritten": rewritten, "error": (after.get("error") or "")[:90]}
    finally:
        if skew:
            skew.close()
        if disk:
            disk.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    rng = random.Random(opts.seed)
    from bench.distributed import free_port
    with tempfile.TemporaryDirectory() as root:
        ref_out = os.path.join(root, "reference", "runs")
        os.makedirs(os.path.dirname(ref_out))
        ref = start(ref_out, free_port())
        ref.wait(timeout=300)
        reference = [r["loss"] for r in records(ref_out)]
        if summary(ref_out).get("status") != "completed":
            sys.exit("the uninterrupted reference run did not complete")
        rows = []
        for i, fault in enumerate(schedule(opts.trials, rng), start=1):
            rows.append(trial(i, fault, rng, root, reference))
            r = rows[-1]
            print(f"trial {i}: {r['fault']} at step {r['at_step']} {r['target']} -> {r['status_after_fault']}; "
                  f"resumed {r['resumes']}x -> {r['final']}, exact {r['exact']}, hung {r['hung']}", flush=True)
    bad = [r for r in rows if r["hung"] or r["left_running"] or r["final"] != "completed" or not r["exact"]
           or r["negative"] or r["rewritten"]]
    lost_ok = all((r["lost_steps"] or 0) < 2 * SAVE_EVERY for r in rows)
    lines = [f"# Fault soak: {opts.trials} trials, seed {opts.seed}", "",
             f"- {common.host_line()}",
             f"- rerun: `python measurements/fault_soak.py --trials {opts.trials} --seed {opts.seed}`",
             f"- job: tiny LLaMA, ZeRO-2, 2 ranks under the deepspeed launcher, {STEPS} steps, a checkpoint every "
             f"{SAVE_EVERY}, `--resume auto`; a fault after a random step (1-{STEPS - 2}), then the same command "
             f"until the run completes; a process alive {BOUND_S} s after the fault is a hang", "",
             f"**hangs: {sum(r['hung'] for r in rows)}; runs left `running`: {sum(r['left_running'] for r in rows)}; "
             f"final losses equal to the uninterrupted run: {sum(r['exact'] for r in rows)}/{len(rows)}; steps lost "
             f"below two checkpoint intervals: {'all' if lost_ok else 'not all'}; negative durations: "
             f"{sum(r['negative'] for r in rows)}; completed records rewritten: "
             f"{sum(r['rewritten'] for r in rows)}**", "",
             "| trial | fault | after step | status the fault left | its error | resumes | final | losses exact | "
             "lost steps | resumed at |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['fault']} {r['target']} | {r['at_step']} | {r['status_after_fault']} | "
              f"{r['error'].replace('|', '/')} | {r['resumes']} | {r['final']} | {'yes' if r['exact'] else 'NO'} | "
              f"{r['lost_steps']} | {r['resumed_at']} |" for r in rows]
    by = {f: sum(r["fault"] == f for r in rows) for f in FAULTS}
    lines += ["", "Trials per fault: " + ", ".join(f"{f} {n}" for f, n in by.items()) + "."]
    common.write_page(lines, opts.out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
