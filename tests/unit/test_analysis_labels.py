"""The report's names for what it compares (analysis/collect.py, tables.py): every strategy carries its ZeRO stage,
so two series that differ only in it never share a label or a table title (one title would overwrite the other)."""
import pytest

from analysis.collect import Run
from analysis.tables import scaling_tables

pytestmark = pytest.mark.unit


def run(name: str, strategy: str, zero: int, gpus: int) -> Run:
    summary = {"status": "completed", "strategy": strategy, "zero_stage": zero, "peft": "lora", "world_size": gpus,
               "model": "tiny-llama", "seq_len": 128, "global_batch_size": 8, "layout": {"dp": gpus // 2, "tp": 2},
               "total_wall_time_s": 10.0 * gpus}
    return Run(name, summary, {"run": {"data": "squad-sample"}}, [], None)


def test_every_strategy_is_named_with_its_zero_stage():
    runs = [run(f"tp-z{z}-w{g}", "tp", z, g) for z in (1, 2) for g in (2, 4)]
    assert {r.strategy for r in runs} == {"tp zero1 lora", "tp zero2 lora"}
    assert len({r.label for r in runs}) == 4
    tables = scaling_tables(runs)
    assert len(tables) == 2 and sorted(len(rows) for rows in tables.values()) == [2, 2]
    assert sum(t.startswith("tp zero1 lora") for t in tables) == sum(t.startswith("tp zero2 lora") for t in tables) == 1


def test_what_an_engine_keeps_elsewhere_tells_two_runs_of_one_layout_apart():
    """ZeRO-3 with and without offload, FSDP2 with and without resharding: four labels, not two."""
    def with_ds(strategy, zero, ds):
        r = run(strategy, strategy, zero, 2)
        return Run(r.name, r.summary, {**r.config, "ds_config": ds}, [], None)
    runs = [with_ds("dp", 3, {"zero_optimization": {"stage": 3}}),
            with_ds("dp", 3, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}),
            with_ds("fsdp2", None, {"fsdp2": {"reshard_after_forward": True}}),
            with_ds("fsdp2", None, {"fsdp2": {"reshard_after_forward": False, "cpu_offload": True}})]
    assert [r.strategy for r in runs] == ["dp zero3 lora", "dp zero3 offload lora", "fsdp2 lora",
                                          "fsdp2 no-reshard offload lora"]


def test_a_job_is_named_by_its_data_files_name_and_two_files_of_one_name_stay_apart():
    """The section title names the data by its file name; two different files of one name are two jobs, their
    titles told apart by the whole path. A strategy measured at one GPU count gets no scaling table."""
    from analysis.tables import by_job

    def at(path, name):
        r = run(name, "dp", 2, 2)
        return Run(name, r.summary, {"run": {"data": path}}, [], None)
    one = by_job([at("/data/a/train.json", "a")])
    assert list(one) == ["tiny-llama, seq 128, global batch 8, train.json, fp32"]
    two = by_job([at("/data/a/train.json", "a"), at("/data/b/train.json", "b")])
    assert sorted(two) == ["tiny-llama, seq 128, global batch 8, train.json, fp32 (/data/a/train.json)",
                           "tiny-llama, seq 128, global batch 8, train.json, fp32 (/data/b/train.json)"]
    assert scaling_tables([at("/data/a/train.json", "a")]) == {}
