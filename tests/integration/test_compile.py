"""--compile on under every strategy that compiles on the CPU (ZeRO 0, 2 and 3, SP, PP, EP): the same loss and
gradient norm, step for step, as one eager process on the same job, and a record of what compiling cost
(bench/compiling.py). Not compiled here, each being what a compiled run here already covers: ZeRO-1 (with this
ds_config's overlap_comm and contiguous_gradients DeepSpeed runs ZeRO-1 and ZeRO-2 through one optimizer class,
stage_1_and_2.py DeepSpeedZeroOptimizer, with the same gradient hooks around the compiled model, which keep the whole
gradient or a partition of it; ZeRO-1's eager parity: test_zero.py), and PP x DP (each stage compiles as under PP 2,
the data-parallel all-reduce runs after the stages' backward; its eager parity: test_pipeline.py).

Inductor (generated C++ kernels, the default backend) compiles ZeRO-2; the other strategies compile with
aot_eager, which captures the same dynamo and AOTAutograd graphs (where DeepSpeed's hooks, AutoEP's layers,
Ulysses' attention and the pipeline's stages meet the compiler) and runs them with eager kernels, so the suite
does not pay inductor's cold compile (a minute per strategy on 2 cores) for each. measurements/compile_vs_eager.py
runs every strategy under inductor. Tensor parallelism refuses on the CPU (tests/support/bad_input.py)."""
import pytest

from support import assert_ok, run_many

pytestmark = pytest.mark.multiproc

LOSS_RTOL, GRAD_NORM_RTOL = 1e-5, 1e-4  # fp32: the model-parallel suites' tolerances (docs/parity.md)
ARGS = ("--peft", "none", "--lr", "1e-3", "--max_steps", "4", "--micro_batch_size", "2", "--seq_len", "128",
        "--eval_interval", "0", "--eval_batches", "2", "--packing", "off")  # padded rows: one shape, one compile
ONE = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero1.json")
MIXTRAL = ("--model", "tiny-mixtral")
AOT = ("--compile", "on", "--compile_backend", "aot_eager")

# name -> (arguments, processes, the eager one-process run it must match)
RUNS = {
    "llama-g2": ((*ONE, *ARGS, "--global_batch_size", "2"), 1, None),
    "llama-g4": ((*ONE, *ARGS, "--global_batch_size", "4"), 1, None),
    "mixtral-g4": ((*ONE, *ARGS, *MIXTRAL, "--global_batch_size", "4"), 1, None),
    "zero2-eager": (("--ds_config", "ds_configs/dp_zero2.json", *ARGS, "--global_batch_size", "4"), 2, None),
    "zero2-inductor": (("--ds_config", "ds_configs/dp_zero2.json", *ARGS, "--global_batch_size", "4", "--compile",
                        "on"), 2, "llama-g4"),
    "zero0": (("--ds_config", "ds_configs/dp_zero0.json", *ARGS, "--global_batch_size", "4", *AOT), 2, "llama-g4"),
    "zero3": (("--ds_config", "ds_configs/dp_zero3.json", *ARGS, "--global_batch_size", "4", *AOT), 2, "llama-g4"),
    "sp2": (("--ds_config", "ds_configs/sp2.json", *ARGS, "--global_batch_size", "2", *AOT), 2, "llama-g2"),
    "pp2": (("--ds_config", "ds_configs/pp2.json", *ARGS, "--global_batch_size", "2", *AOT), 2, "llama-g2"),
    "ep2": (("--ds_config", "ds_configs/ep2.json", *ARGS, *MIXTRAL, "--global_batch_size", "4", *AOT), 2,
            "mixtral-g4"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    # the compiling launches first, the short eager ones after them: they fill the other slot at the end
    order = sorted(RUNS.items(), key=lambda item: item[1][2] is None)
    return run_many({name: (root / name, args, {"nprocs": n, "launcher": "srun-env" if n > 1 else "python"})
                     for name, (args, n, _) in order}, timeout=600)


@pytest.mark.parametrize("name", [n for n, (_, _, ref) in RUNS.items() if ref])
def test_compiled_runs_match_one_eager_process(runs, name):
    ref = runs[RUNS[name][2]]
    assert_ok(ref)
    assert_ok(runs[name])
    a, b = ref.records(), runs[name].records()
    assert len(a) == len(b) == 4 and a[-1]["loss"] < a[0]["loss"]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=LOSS_RTOL)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=GRAD_NORM_RTOL)
    assert runs[name].summary()["val_loss"] == pytest.approx(ref.summary()["val_loss"], rel=LOSS_RTOL)


@pytest.mark.parametrize("name", [n for n, (_, _, ref) in RUNS.items() if ref])
def test_the_record_says_what_compiling_cost(runs, name):
    """summary.json `compile`: the backend that ran, compile time on every rank, graphs; metrics.jsonl's per-step
    compile time, which falls in the untimed first steps (one shape: no recompile later)."""
    s, records = runs[name].summary(), runs[name].records()
    c = s["compile"]
    backend = "inductor" if name == "zero2-inductor" else "aot_eager"
    assert c["enabled"] and c["backend"] == backend and c["deepcompile"] is False
    assert len(c["per_rank"]) == s["world_size"] and all(r["compile_s"] > 0 for r in c["per_rank"])
    assert c["compile_s"] == max(r["compile_s"] for r in c["per_rank"]) and c["graphs"] >= 1
    assert records[0]["compile_s"] > 0 and c["recompiled_steps"] == []
    assert [r["warmup"] for r in records] == [True, True, False, False]  # the instrumented first two steps
    assert c["steps_compile_s"] == pytest.approx(sum(r["compile_s"] for r in records))
    assert s["measured_steps"] == 2 and all(r["compile_s"] == 0 for r in records[2:])
    if backend == "inductor":
        assert c["cache"]["hits"] + c["cache"]["misses"] > 0 and c["cache"]["dir"]
    if name == "ep2":  # DeepSpeed compiles around the experts: routing, exchange and expert GEMMs stay eager
        import json
        ds = json.loads((runs[name].run_dir / "config.json").read_text())["ds_config"]
        assert ds["compile"]["autoep_non_moe"] is True


def test_the_report_puts_eager_and_compiled_runs_of_one_job_side_by_side(runs):
    """The analysis step groups runs by job (compiling changes how, not what): ZeRO-2 eager and compiled land in
    one comparison table, told apart by their label, with the compiled run's throughput against the eager's."""
    from analysis import collect, tables
    pair = [collect.load_dir(str(runs[n].run_dir)) for n in ("zero2-eager", "zero2-inductor")]
    (job, members), = tables.by_job(pair).items()
    rows = {r["strategy"]: r for r in tables.comparison(members, pair[0])}
    assert set(rows) == {"dp zero2 none (dp2)", "dp zero2 none compiled (dp2)"}, rows
    assert "padded" in job and rows["dp zero2 none compiled (dp2)"]["throughput increase (x)"] > 0


def test_an_eager_run_records_no_compile(runs):
    s, records = runs["llama-g4"].summary(), runs["llama-g4"].records()
    assert s["compile"] == {"enabled": False} and "compile_s" not in records[0]
