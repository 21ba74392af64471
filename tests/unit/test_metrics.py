"""Every formula in bench/metrics.py against an independent computation."""
import numpy as np
import pytest

from bench import gpus, metrics

pytestmark = pytest.mark.unit


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 17):
        xs = list(rng.random(n))
        for q in (0, 50, 90, 100):
            assert metrics.percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_step_time_stats():
    st = metrics.step_time_stats([0.3, 0.1, 0.2, 0.4])
    assert st == pytest.approx({"median": 0.25, "mean": 0.25, "p10": np.percentile([0.1, 0.2, 0.3, 0.4], 10),
                                "p90": np.percentile([0.1, 0.2, 0.3, 0.4], 90)})
    assert metrics.step_time_stats([]) == {"median": None, "mean": None, "p10": None, "p90": None}


def test_throughput_mfu_and_hfu():
    # 8 GPUs, two steps of 2 s and 4 s (mean 3 s) of a global batch of 64 samples: 2 x 40,000 real tokens in
    # 2 x 64 rows of 2048 positions (the rest padding); each sample 625 tokens, so 128 x 625^2 real (query, key)
    # pairs against 128 x 2048^2 computed; 1e9 model FLOPs per token and 1e5 per pair, 1.3e9 and 1.3e5 with the
    # recomputed forward; peak 989
    work = [80_000, 2 * 64 * 2048, 128 * 625 ** 2, 128 * 2048 ** 2]
    t = metrics.throughput([2.0, 4.0], work, 64, 8, (1e9, 1e5), (1.3e9, 1.3e5), 989.0)
    computed, real = 2 * 64 * 2048 / 6.0, 80_000 / 6.0  # total tokens over total time
    assert t["tokens_per_s"] == pytest.approx(real) and t["tokens_per_s_per_gpu"] == pytest.approx(real / 8)
    assert t["computed_tokens_per_s"] == pytest.approx(computed)
    assert t["computed_tokens_per_s_per_gpu"] == pytest.approx(computed / 8)
    assert t["samples_per_s"] == pytest.approx(2 * 64 / 6.0)
    model_tflops = (80_000 * 1e9 + 128 * 625 ** 2 * 1e5) / 6.0 / 8 / 1e12
    hardware_tflops = (2 * 64 * 2048 * 1.3e9 + 128 * 2048 ** 2 * 1.3e5) / 6.0 / 8 / 1e12
    assert t["tflops_per_gpu"] == pytest.approx(model_tflops)
    assert t["mfu"] == pytest.approx(model_tflops / 989.0)
    assert t["hfu"] == pytest.approx(hardware_tflops / 989.0) and t["hfu"] > t["mfu"]
    unknown = metrics.throughput([2.0], [1, 1, 1, 1], 64, 8, (1e9, 0), (1e9, 0), None)
    assert unknown["mfu"] is None and unknown["hfu"] is None
    # full rows and no recomputation: MFU = HFU
    whole = metrics.throughput([2.0, 4.0], [work[1], work[1], work[3], work[3]], 64, 8, (1e9, 1e5), (1e9, 1e5), 989.0)
    assert whole["tokens_per_s"] == pytest.approx(computed) and whole["mfu"] == pytest.approx(whole["hfu"])


def test_flop_coefficients_give_the_per_token_formula_on_full_rows():
    """F_token + F_pair x T is flops_per_token at T, and the recompute terms are one forward without the head."""
    from transformers import AutoConfig
    from bench import models
    c = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    per_token, per_pair = models.flop_coefficients(c)
    assert per_token + per_pair * 2048 == pytest.approx(models.flops_per_token(c, 2048))
    assert per_pair == 12 * 32 * 32 * 128
    with_recompute = models.flop_coefficients(c, recompute=True)
    assert with_recompute[0] - per_token + (with_recompute[1] - per_pair) * 2048 == pytest.approx(
        models.forward_flops_per_token(c, 2048) - 2 * 128256 * 4096)


def test_goodput():
    g = metrics.goodput(applied_updates=9, useful_tokens=900, train_wall_s=3.0)
    assert g == {"updates_per_s": 3.0, "tokens_per_s": 300.0}
    assert metrics.goodput(1, 1, 0.0)["updates_per_s"] is None


def test_time_to_target_first_crossing():
    losses = [(1, 3.0, 1.0), (2, 2.4, 2.0), (3, 2.6, 3.0), (4, 1.9, 4.0)]
    assert metrics.time_to_target(losses, 2.5) == (2.0, 2)
    assert metrics.time_to_target(losses, 1.0) == (None, None)
    assert metrics.time_to_target(losses, None) == (None, None)


def test_device_stats_peak_avg_mode():
    mem = [100.2, 500.4, 500.3, 499.9, 300.0]
    s = metrics.device_stats(mem, [10, 20, 30, 40, 50])
    assert s["peak_mib"] == 500.4 and s["avg_mib"] == pytest.approx(np.mean(mem))
    assert s["mode_mib"] == 500.0  # three samples round to 500 MiB
    assert s["util_avg_pct"] == 30
    assert metrics.device_stats([], [])["peak_mib"] is None


@pytest.mark.parametrize("name,override,expected", [
    ("NVIDIA H100 80GB HBM3", None, 989.0), ("NVIDIA H200", None, 989.0), ("NVIDIA A100-SXM4-80GB", None, 312.0),
    ("NVIDIA H100 PCIe", None, 756.0), ("NVIDIA H100 NVL", None, 835.0), ("NVIDIA B200", None, 2250.0),
    ("NVIDIA GH200 480GB", None, 989.0),
    # exact products: the NVL cards are not the SXM parts, GB200 is not B200, H20 is not H200
    ("NVIDIA H200 NVL", None, 835.0), ("NVIDIA GB200", None, 2500.0), ("NVIDIA H20", None, None),
    ("NVIDIA A100-PCIE-40GB", None, 312.0),
    ("NVIDIA L4", None, None), (None, None, None), (None, 123.0, 123.0), ("NVIDIA H100", 500.0, 500.0)])
def test_device_peak(name, override, expected):
    peak, source = gpus.peak_tflops(name, override)
    assert peak == expected
    assert source == "--peak_tflops" if override else (("bench/gpus.py" in source) == (expected is not None))


@pytest.mark.parametrize("name,key", [("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100 80GB PCIe", "A100-80GB"),
                                      ("NVIDIA H200 NVL", "H200-NVL-141GB"), ("NVIDIA H200", "H200-141GB")])
def test_catalog_memory_follows_the_product(name, key):
    assert gpus.match(name).key == key and gpus.capacity_bytes(key) > 30 * gpus.GIB


def test_current_rss_matches_psutil():
    import psutil
    keep = bytearray(64 * 2**20)  # noqa: F841 - 64 MiB touched, so a wrong unit or field shows
    for i in range(0, len(keep), 4096):
        keep[i] = 1
    assert metrics.current_rss_mib() == pytest.approx(psutil.Process().memory_info().rss / 2**20, abs=1.0)
