"""bench/summary.py is the one owner of summary.json's keys: the docs list exactly those keys, nothing else is
written, and the flat W&B/CSV form maps back to the nested record."""
import re
from pathlib import Path

import pytest

from bench import summary

pytestmark = pytest.mark.unit
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented_keys() -> set[str]:
    """Top-level keys named in the first column of docs/metrics.md's summary.json table."""
    text = DOCS.read_text().split("## summary.json keys", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            keys |= {re.split(r"[.\[]", k)[0] for k in re.findall(r"`([^`]+)`", first_cell)}
    return keys


def test_docs_table_lists_exactly_the_summary_keys():
    documented = documented_keys()
    assert documented - set(summary.KEYS) == set(), "documented but never written"
    assert set(summary.KEYS) - documented == set(), "written but not documented in docs/metrics.md"


def test_the_contract_of_the_design_is_a_subset_of_the_keys():
    # DESIGN.md's contract: consumers rely on these names
    design = ["status", "error", "strategy", "model", "peft", "world_size", "layout", "zero_stage",
              "global_batch_size", "micro_batch_size", "grad_accum", "seq_len", "steps", "step_time_s",
              "tokens_per_s", "tokens_per_s_per_gpu", "samples_per_s", "tflops_per_gpu", "mfu", "goodput", "loss",
              "val_loss", "target_loss", "time_to_target_s", "steps_to_target", "total_wall_time_s",
              "time_to_first_step_s", "memory", "params", "versions", "host", "slurm_job_id"]
    assert [k for k in design if k not in summary.KEYS] == []


def test_a_key_not_in_the_list_is_refused():
    record = summary.RunRecord.__new__(summary.RunRecord)
    record.data = {}
    record.set(status="running")
    with pytest.raises(KeyError, match="not in bench.summary.KEYS"):
        record.set(statsu="completed")
    assert record.data == {"status": "running"}


def test_flatten_and_unflatten_are_inverse():
    nested = {"a": 1, "step_time_s": {"median": 0.5, "p90": 0.7}, "memory": {"per_rank": [{"rank": 0}], "d": {}},
              "deep": {"x": {"y": 2}}}
    flat = summary.flatten(nested)
    assert flat == {"a": 1, "step_time_s/median": 0.5, "step_time_s/p90": 0.7, "memory/per_rank": [{"rank": 0}],
                    "deep/x/y": 2}
    assert summary.unflatten({**flat, "_runtime": 3}) == {k: v for k, v in nested.items() if k != "memory"} | {
        "memory": {"per_rank": [{"rank": 0}]}}  # an empty dict has no flat key
    assert summary.flatten({"l": [1, 2]}, lists_as_json=True) == {"l": "[1, 2]"}
