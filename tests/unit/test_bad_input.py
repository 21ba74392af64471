"""Bad input: one clear line, non-zero exit, no run directory left behind. Every case runs in-process through
bench/run.py's main() (refusals happen before a process group exists, on every rank alike); a handful also run
as real multi-rank launches (tests/integration/test_bad_input_launched.py) to prove every rank says it and exits."""
import pytest

from support.bad_input import CASES, ZERO2, args_of


@pytest.mark.unit
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line(refuse, bad_files, case):
    _, _, ranks, expected = case
    code, errors = refuse(*args_of(case, bad_files), ranks=ranks)
    assert code == 2
    assert len(errors) == 1 and expected in errors[0], errors


def _mixtral_per_rank(tp: int, ep: int) -> int:
    """Mixtral 8x7B's parameters on one rank, from its published shape: TP halves attention (the MoE preset
    shards attention only), EP keeps E/ep of the experts."""
    L, h, heads, kv, hd, inter, E, vocab = 32, 4096, 32, 8, 128, 14336, 8, 32000
    attn = 2 * h * heads * hd + 2 * h * kv * hd
    expert = 3 * h * inter
    layer = attn // tp + (E // ep) * expert + h * E + 2 * h
    return 2 * vocab * h + L * layer + h


@pytest.mark.unit
@pytest.mark.parametrize("ds_config,strategy,world,tp,ep", [("ds_configs/tp2_ep2.json", "tp_ep", 4, 2, 2),
                                                           ("ds_configs/ep8.json", "ep", 8, 1, 8)])
def test_dry_run_plans_any_layout_from_one_process_offline(launch_env, tmp_path, capfd, monkeypatch, ds_config,
                                                          strategy, world, tp, ep):
    from bench.run import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: the bundled architecture and tokenizer are enough
    monkeypatch.setenv("BENCH_MODELS_DIR", str(tmp_path / "no-local-copies"))
    code = main(["--dry_run", "--world_size", str(world), "--model", "mixtral-8x7b", "--strategy", strategy,
                 "--ds_config", ds_config, "--output_dir", str(tmp_path / "runs")])
    printed = capfd.readouterr().out
    assert code == 0, printed
    assert f"dp(1)*tp({tp})*ep({ep})*pp(1)*sp(1) = {world}" in printed
    assert f"held per rank: {_mixtral_per_rank(tp, ep):,} (ranks 0-{world - 1})" in printed
    assert "total 46,702,792,704" in printed and "FLOPs per token" in printed and "MFU peak" in printed


@pytest.mark.unit
def test_dry_run_validates_and_exits_without_training(launch_env, tmp_path, capfd):
    from bench.run import main
    out = tmp_path / "runs"
    code = main(["--output_dir", str(out), "--dry_run", "--strategy", "dp", *ZERO2, "--global_batch_size", "8"])
    printed = capfd.readouterr().out
    assert code == 0, printed
    assert "resolved configuration" in printed
    assert "global 8 = micro 2 x grad_accum 4 x data-parallel 1" in printed
    assert "iteration" not in printed
    assert not out.exists()
