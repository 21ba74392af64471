"""What the tests share: starting the harness as real processes under the launchers users use (run_bench,
start_bench, run_many, run_suite), reading what a run wrote (Result), and comparing a run with its plan
(assert_plan_matches). Fixtures live in tests/conftest.py; everything else a test imports comes from here."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


class LaunchGuard:
    """Set by conftest.py around every test: a test marked unit must not launch a run."""
    in_unit_test = False


class Result:
    def __init__(self, returncode: int, output: str, out_dir: Path):
        self.returncode, self.output, self.out_dir = returncode, output, out_dir
        dirs = sorted(p for p in out_dir.iterdir() if p.is_dir()) if out_dir.exists() else []
        self.run_dirs = dirs
        self.run_dir = dirs[0] if len(dirs) == 1 else None

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records()]

    def wandb_records(self) -> list[dict]:
        """The run's one offline W&B run, read back with wandb's own transaction-log reader."""
        files = list((self.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, "rank 0 alone writes one W&B run"
        out = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json",
                              str(files[0])], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def wandb_summary(self) -> dict:
        summary = {}
        for r in self.wandb_records():
            if r["type"] == "summary":
                summary.update(r["summary"].get("update", {}))
        return summary


def run_bench(out_dir: Path, *args: str, nprocs: int = 1, launcher: str = "python", timeout: int = 300,
              env: dict | None = None) -> Result:
    """launcher: python (world 1), deepspeed, torchrun, accelerate (accelerate launch), or srun-env (N plain
    processes given only the SLURM_* variables srun sets, as under `srun python bench/run.py`)."""
    return finish(start_bench(out_dir, *args, nprocs=nprocs, launcher=launcher, env=env), out_dir, timeout)


def start_bench(out_dir: Path, *args: str, nprocs: int = 1, launcher: str = "python",
                env: dict | None = None, port: int | None = None, only_ranks: list | None = None,
                own_session: bool = False) -> list:
    """The processes of one run, started and not waited for (the srun-env launcher gives one per rank;
    only_ranks starts some of them, as if the others never came). port: the rendezvous port (default: a free
    one). own_session: the launch gets its own process group, which a test can signal as a terminal's Ctrl-C
    signals the foreground job."""
    assert not LaunchGuard.in_unit_test, "a test marked unit must not launch runs; mark it multiproc"
    argv = ["bench/run.py", "--output_dir", str(out_dir), "--wandb_mode", "disabled", *args]
    # A test run inside a SLURM job or a launcher must not leak its own rank variables into the runs.
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                               "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    port = str(port or free_port())
    if launcher == "python":
        cmds = [[sys.executable, *argv]]
    elif launcher == "deepspeed":
        cmds = [[sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
                 "--master_port", port, *argv]]
    elif launcher == "torchrun":
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
                 "--master_port", port, *argv]]
    elif launcher == "accelerate":  # accelerate launch drives torchrun: the same agent-hosted store
        cmds = [[str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
                 str(nprocs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", port, *argv]]
    elif launcher == "srun-env":
        cmds = [[sys.executable, *argv] for _ in range(nprocs)]
    else:
        raise ValueError(launcher)
    procs = []
    for i, cmd in enumerate(cmds):
        if only_ranks is not None and i not in only_ranks:
            continue
        e = dict(full_env)
        if launcher == "srun-env":
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                e.pop(k, None)
            e.update(SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NTASKS=str(nprocs),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a long run cannot block on a full pipe
        # SIGINT back to its default: a test run in the background starts with it ignored, and so would the run.
        proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=own_session,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        proc.log = log
        procs.append(proc)
    return procs


def finish(procs: list, out_dir: Path, timeout: int = 300) -> Result:
    outputs, code = [], 0
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(hung(procs, timeout), pytrace=False)
        p.log.seek(0)
        outputs.append(p.log.read())
        p.log.close()
        code = code or p.returncode
    return Result(code, "\n".join(outputs), out_dir)


def hung(procs: list, timeout: int) -> str:
    """End a launch that outlived its timeout and say where each rank was: SIGABRT makes faulthandler (enabled in
    bench/run.py) print every thread's Python stack before the process dies (a launcher's ranks are its children,
    and are signalled too); then the tail of each process's output."""
    launched = _process_tree(procs)
    for q in launched:
        script = next((a for a in _cmdline(q)[1:] if not a.startswith("-")), "")  # after python's own flags
        if script.endswith("bench/run.py"):  # a rank, not a launcher (python -m ..., torchrun, accelerate)
            _signal(q, signal.SIGABRT)
    time.sleep(3)
    for q in launched:
        _signal(q, signal.SIGKILL)
    tails = []
    for i, p in enumerate(procs):
        p.wait()
        if not p.log.closed:
            p.log.seek(0)
            tails.append(f"--- process {i}, the last 80 lines of its output:\n"
                         + "\n".join(p.log.read().splitlines()[-80:]))
    return f"a launch ran past {timeout} s: {' '.join(map(str, procs[0].args))}\n" + "\n".join(tails)


def _process_tree(procs: list) -> list:
    """The launch's processes and all their descendants (a launcher's ranks), as psutil processes."""
    import psutil
    out = []
    for p in procs:
        try:
            out += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def _cmdline(q) -> list:
    import psutil
    try:
        return q.cmdline()
    except psutil.NoSuchProcess:
        return []


def _signal(q, sig) -> None:
    import psutil
    try:
        q.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def wait_for_steps(out_dir: Path, procs: list, n: int, timeout: float = 120) -> None:
    """Until the run under out_dir has recorded n steps (while its processes are still alive)."""
    t0 = time.time()
    while True:
        files = list(out_dir.glob("*/metrics.jsonl"))
        if files and len(files[0].read_text().splitlines()) >= n:
            return
        assert all(p.poll() is None for p in procs), "the run ended before reaching that step"
        assert time.time() - t0 < timeout, f"no step {n} in {out_dir} after {timeout} s"
        time.sleep(0.1)


_SHARED: dict = {}  # run_many(share=True): a launch's canonical command -> its Result, for the whole session


def launch_key(args: tuple, opts: dict) -> tuple:
    """What makes two launches the same: their flags as bench/run.py reads them (a later flag wins; order apart)
    and how they are started. A flag followed by another flag, or by nothing, is a switch."""
    flags, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[args[i]], i = args[i + 1], i + 2
        else:
            flags[args[i]], i = True, i + 1
    return tuple(sorted(flags.items(), key=str)), tuple(sorted((k, repr(v)) for k, v in (opts or {}).items()))


def run_many(runs: dict, parallel: int = 2, timeout: int = 400, share: bool = False) -> dict:
    """{name: (out_dir, args, options for start_bench)} -> {name: Result}, at most `parallel` launches at a time.
    Most of a tiny run is single-threaded start-up (imports), which leaves a core idle; two launches overlap.
    Runs whose results are compared never depend on each other's timing, only on their numbers.
    The next launch starts as soon as any running one ends (not the oldest: a long compile would hold a slot idle).
    share: a launch the same as one an earlier share=True call made this session (launch_key) is not made again:
    both read the one Result (a seeded fp32 run on the CPU computes the same records each time). Only for
    fixtures whose tests read their runs and change nothing in them."""
    results, pending, active = {}, [], []
    keys = {}
    for name, (out_dir, args, opts) in runs.items():
        key = launch_key(args, opts) if share else name
        if share and key in _SHARED:
            results[name] = _SHARED[key]
        elif key in keys.values():  # the same launch twice in one call: made once
            pass
        else:
            pending.append((name, out_dir, args, opts))
        keys[name] = key
    try:
        while pending or active:
            while pending and len(active) < parallel:
                name, out_dir, args, opts = pending.pop(0)
                active.append((name, out_dir, start_bench(out_dir, *args, **opts), time.monotonic()))
            ended = [a for a in active if all(p.poll() is not None for p in a[2])]
            late = [a for a in active if time.monotonic() - a[3] > timeout]
            if not ended and not late:
                time.sleep(0.2)
                continue
            launch = (ended or late)[0]
            name, out_dir, procs, _ = launch
            if not ended:
                pytest.fail(hung(procs, timeout), pytrace=False)  # hung() ends it
            active.remove(launch)
            results[name] = finish(procs, out_dir, timeout)
            if share:
                _SHARED[keys[name]] = results[name]
    except BaseException:  # a hung launch (or Ctrl-C) fails the suite: leave none of the others running
        for _, _, others, _ in active:
            for q in _process_tree(others):
                _signal(q, signal.SIGKILL)
        raise
    by_key = {keys[n]: r for n, r in results.items()}
    return {name: results.get(name, by_key.get(keys[name])) for name in runs}  # in the order asked


def layout_args(strategy: str, config: str) -> tuple[str, ...]:
    """--strategy and its shipped ds_config."""
    return "--strategy", strategy, "--ds_config", f"ds_configs/{config}.json"


def run_suite(root: Path, runs: dict) -> dict:
    """{name: (arguments, processes, reference)} -> their results: one process plainly, several srun-style."""
    return run_many({name: (root / name, args, {"nprocs": n, "launcher": "srun-env" if n > 1 else "python"})
                     for name, (args, n, _) in runs.items()})


def assert_ok(res: Result) -> None:
    assert res.returncode == 0, res.output[-4000:]
    assert res.run_dir is not None, f"expected one run directory in {res.out_dir}"


def assert_resumes_exactly(out_dir: Path, args: tuple, nprocs: int, reference: Result, stop: str = "kill") -> None:
    """The run stopped, then the same command again resumes it and ends where the uninterrupted reference run
    did, in loss (1e-6) and gradient norm (1e-5). stop="kill": rank 1 (srun-style ranks) killed as step 4 starts,
    resumed from step 2's checkpoint; "sigterm": SIGTERM to rank 1 once step 2 is recorded (steps slowed to 0.5 s
    so it lands mid-run): the run records "preempted", saves at the step it stopped after, exits 75 (requeue)
    and resumes from there."""
    args = (*args, "--run_name", "job", "--resume", "auto", "--save_interval", "2", "--dist_timeout_s", "60")
    if stop == "kill":
        crashed = run_bench(out_dir, *args, nprocs=nprocs, launcher="srun-env",
                            env={"BENCH_FAULT_KILL_STEP": "4", "BENCH_FAULT_RANK": "1"}, timeout=120)
        assert crashed.returncode != 0 and crashed.summary()["status"] == "failed"
        resumed_at = 2
    else:
        procs = start_bench(out_dir, *args, nprocs=nprocs, launcher="srun-env",
                            env={"BENCH_FAULT_SLOW_STEP_S": "0.5"})
        wait_for_steps(out_dir, procs, 2)
        procs[1].send_signal(signal.SIGTERM)
        stopped = finish(procs, out_dir)
        s = stopped.summary()
        assert stopped.returncode == 75 and s["status"] == "preempted", stopped.output[-3000:]
        resumed_at = s["steps"]
        assert 2 <= resumed_at < len(reference.records()) and s["lost_steps"] == 0
    resumed = run_bench(out_dir, *args, nprocs=nprocs, launcher="srun-env")
    assert_ok(resumed)
    assert resumed.summary()["resumed_at"] == [resumed_at]
    a, b = reference.records(), resumed.records()
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-5)


def assert_no_negative_durations(summary: dict) -> None:
    """Every duration a summary records (a key ending in _s, at any depth) is null or >= 0."""
    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k.endswith("_s") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert v >= 0, f"{path}{k} = {v}"
                walk(v, f"{path}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}{i}.")
    walk(summary, "")


def planned_params_per_rank(*args: str, world: int) -> list[int]:
    """What a dry run of these arguments predicts each rank will hold (resolved in this process)."""
    from bench.plan import plan_layout
    plan = plan_layout(list(args), world)
    return plan.strategy.params_per_rank(plan)


PARITY_ARGS = ("--strategy", "dp", "--peft", "none", "--lr", "1e-3", "--max_steps", "5", "--warmup_steps", "1",
               "--global_batch_size", "4", "--micro_batch_size", "2", "--seq_len", "128", "--eval_interval", "0")


def assert_plan_matches(summary: dict, comm_rel: float = 0.05) -> None:
    """The planner's prediction recorded before launch (summary.memory_plan) against what the run counted
    (summary.accounting), rank by rank: model states within 2 %, activations within 15 % and communication per
    step within comm_rel (both as the mean over ranks: expert routing differs between ranks); the calls of the
    collectives a layer waits on among those counted."""
    plan, measured = summary["memory_plan"]["per_rank"], summary["accounting"]["per_rank"]
    assert len(plan) == len(measured) == summary["world_size"]
    for p, m in zip(plan, measured):
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes"):
            if m[key] is not None:  # pipeline stages count model states only
                assert p[key] == pytest.approx(m[key], rel=0.02, abs=64), (key, p["rank"], p[key], m[key])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    if measured[0]["activation_bytes"] is not None:  # one micro-batch's (a pipeline stage holds several)
        # the forward's saved tensors: less the layer checkpointing recomputes in backward (in the plan's peak)
        assert mean([(p["activation_bytes"] - p.get("recompute_bytes", 0)) / p["micro_batches_in_flight"]
                     for p in plan]) == pytest.approx(
            mean([m["activation_bytes"] for m in measured]), rel=0.15)
    if measured[0]["logits_bytes"] is not None:
        assert [p["logits_bytes"] for p in plan] == [m["logits_bytes"] for m in measured]
    if measured[0]["comm_bytes_per_step"] is not None:
        predicted = summary["memory_plan"]["comm_bytes_per_step_per_rank"]
        counted = [m["comm_bytes_per_step"] for m in measured]
        total = mean([sum(c.values()) for c in counted])
        assert mean([sum(c.values()) for c in predicted]) == pytest.approx(total, rel=comm_rel), (predicted, counted)
        for kind in {k for c in counted for k in c}:
            got = mean([c.get(kind, 0) for c in counted])
            if got > 0.05 * total:  # every kind that matters
                assert mean([c.get(kind, 0) for c in predicted]) == pytest.approx(got, rel=comm_rel), (kind, predicted)
    if measured[0].get("comm_calls_per_step") is not None:  # the layers' calls (the cost model's latency term)
        planned = summary["memory_plan"]["critical_calls_per_step_per_rank"]
        for p, m in zip(planned, measured):
            counted = m["comm_calls_per_step"]
            for kind, n in p.items():  # among every call of its kind: ZeRO's and the engines' come on top
                assert kind == "all_to_all" or n <= counted.get(kind, 0), (kind, p, counted)
            # nothing else exchanges all-to-all: every one of them is a layer's (EP's, SP's); under LoRA autograd may
            # skip a first-layer backward exchange whose gradient nothing needs (measured: 31 of 32 under SP 2,
            # ZeRO-1, tiled): up to its q, k and v per micro-batch
            slack = 3 * summary["grad_accum"] if summary["peft"] == "lora" else 0
            assert 0 <= p.get("all_to_all", 0) - counted.get("all_to_all", 0) <= slack, (p, counted)
