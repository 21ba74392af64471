"""A packed run computes what the unpacked run of the same samples computes: the same loss (1e-5), gradient norm
(1e-4) and validation loss, step by step, under data, tensor, expert, pipeline and sequence parallelism, on real
processes; so does padding each micro-batch to its longest sample. Both count the same real tokens, and packing
computes fewer."""
import pytest

from support import assert_ok, run_many

pytestmark = pytest.mark.multiproc

ARGS = ("--peft", "none", "--lr", "1e-3", "--max_steps", "3", "--warmup_steps", "1", "--micro_batch_size", "2",
        "--seq_len", "128", "--eval_interval", "0", "--eval_batches", "2")
LAYOUTS = {  # name -> (strategy, ds_config, extra arguments)
    "dp": ("dp", "dp_zero2", ("--global_batch_size", "4")),
    "tp": ("tp", "tp2", ("--global_batch_size", "2")),
    "ep": ("ep", "ep2", ("--global_batch_size", "4", "--model", "tiny-mixtral")),
    "pp": ("pp", "pp2", ("--global_batch_size", "4")),  # two micro-batches through the two stages
    "sp": ("sp", "sp2", ("--global_batch_size", "2")),
}
BATCHING = {"packed": ("--packing", "on"), "padded": ("--packing", "off"),
            "longest": ("--packing", "off", "--padding", "longest")}
RUNS = {f"{layout}-{way}": (layout, way) for layout in LAYOUTS for way in BATCHING
        if way != "longest" or layout in ("dp", "pp")}  # longest: the plain engine and the pipeline's shapes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    launches = {}
    for name, (layout, way) in RUNS.items():
        strategy, config, extra = LAYOUTS[layout]
        args = ("--strategy", strategy, "--ds_config", f"ds_configs/{config}.json", *ARGS, *extra, *BATCHING[way])
        launches[name] = (root / name, args, {"nprocs": 2, "launcher": "srun-env"})
    return run_many(launches)


@pytest.mark.parametrize("name", [n for n, (_, way) in RUNS.items() if way != "padded"])
def test_same_loss_and_gradient_norm_as_the_padded_run(runs, name):
    layout, way = RUNS[name]
    run, padded = runs[name], runs[f"{layout}-padded"]
    assert_ok(run)
    assert_ok(padded)
    a, b = padded.records(), run.records()
    assert len(a) == len(b) == 3
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4)
    assert run.summary()["val_loss"] == pytest.approx(padded.summary()["val_loss"], rel=1e-5)
    assert [r["real_tokens"] for r in b] == [r["real_tokens"] for r in a]
    assert all(x["computed_tokens"] < y["computed_tokens"] for x, y in zip(b, a))  # less padding computed
    assert (run.summary()["batching"], padded.summary()["batching"]) == ({"packed": "packed"}.get(way, way), "max")
