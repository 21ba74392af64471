"""LoRA under ZeRO: only the adapters train, their count is exactly r * (in + out) per wrapped projection,
and the loss falls."""
import json

import pytest

from bench import models
from support import assert_ok, run_bench

pytestmark = pytest.mark.multiproc


def expected_lora_params(config, r: int) -> int:
    h = config.hidden_size
    hd = h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = r * (h + q) + 2 * r * (h + kv) + r * (q + h)  # q, k, v, o: A is r x in, B is out x r
    return config.num_hidden_layers * per_layer


def test_lora_trains_only_adapters_and_loss_falls(tmp_path):
    res = run_bench(tmp_path, "--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--peft", "lora",
                    "--lora_r", "8", "--lr", "1e-2", "--max_steps", "16", "--global_batch_size", "4",
                    "--seq_len", "128", "--eval_interval", "0", nprocs=2, launcher="deepspeed")
    assert_ok(res)
    s = res.summary()
    config = models.make_config(models.PRESETS["tiny-llama"])
    base = models.count_params_from_config(config)["total"]
    lora = expected_lora_params(config, 8)
    assert s["peft"] == "lora"
    assert s["params"]["trainable"] == lora
    assert s["params"]["before_peft"] == base
    assert s["params"]["total"] == base + lora
    assert [r["trainable"] for r in s["params"]["per_rank"]] == [lora, lora]
    losses = res.losses()
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    # the NeMo-style parameter summary is printed before and after wrapping
    assert "parameters before LoRA" in res.output and "parameters after LoRA" in res.output
    assert f"trainable params      {lora:,}" in res.output
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["run"]["model"]["peft"] == "lora" and cfg["run"]["model"]["lora_r"] == 8
