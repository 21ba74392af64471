"""Other model and data sources end to end: a random-init architecture (no weights needed), a real preset's
architecture resolved without any download, and packed text data from a JSONL file."""
import json

import pytest

from support import assert_ok, run_bench

pytestmark = pytest.mark.multiproc

ARGS = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--max_steps", "3", "--warmup_steps", "1",
        "--seq_len", "64", "--eval_interval", "0")


def test_random_init_and_jsonl_text(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Document {i}: the river flows past the old mill. " * 5}) + "\n"
                            for i in range(40)))
    res = run_bench(tmp_path / "runs", *ARGS, "--model", "tiny-mixtral", "--init", "random", "--peft", "none",
                    "--data", str(data))
    assert_ok(res)
    s = res.summary()
    assert s["status"] == "completed" and s["model"] == "tiny-mixtral"
    # packed text: every position is a target, so useful tokens per step = global batch x (seq_len - 1)
    assert res.records()[0]["target_tokens"] == s["global_batch_size"] * 63
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["run"]["model"]["init"] == "random" and cfg["model_config"]["num_local_experts"] == 4


def test_real_preset_resolves_without_download(tmp_path):
    # LLaMA-3.1-8B's architecture, no weights, no network: the dry run validates layout, batch and data.
    res = run_bench(tmp_path / "runs", *ARGS, "--model", "llama3.1-8b", "--init", "random", "--dry_run",
                    env={"HF_HUB_OFFLINE": "1", "BENCH_MODELS_DIR": str(tmp_path / "none")})
    assert res.returncode == 0, res.output[-2000:]
    assert "L=32 hidden=4096 heads=32/8 vocab=128256" in res.output
