"""The analysis step on real tiny runs: exact scaling ratios, failed/OOM runs shown as such, valid PNGs, an HTML
report that renders in headless Chromium, the W&B table and report objects."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from matplotlib import image

from analysis import collect, plots, tables, wandb_export
from bench import metrics
from support import REPO, assert_ok, run_many

ARGS = ("--strategy", "dp", "--ds_config", "ds_configs/dp_zero2.json", "--max_steps", "4", "--warmup_steps", "1",
        "--seq_len", "128", "--micro_batch_size", "2", "--global_batch_size", "4", "--eval_interval", "0")
JOB = "tiny-llama, seq 128, global batch 4, squad-sample, fp32, packed"  # what every tiny-llama run here computes


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    runs = root / "runs"
    specs = {name: (root / name, (*ARGS, *extra, "--run_name", name), {"nprocs": n, "launcher": launcher})
             for name, extra, n, launcher in [("lora-w1", ("--peft", "lora"), 1, "python"),
                                              ("lora-w2", ("--peft", "lora"), 2, "deepspeed"),
                                              ("full-w2", ("--peft", "none"), 2, "deepspeed"),
                                              ("mixtral-w1", ("--peft", "none", "--model", "tiny-mixtral"), 1,
                                               "python"),
                                              # the same model and strategy, another job: a shorter sequence
                                              ("lora-w1-seq64", ("--peft", "lora", "--seq_len", "64"), 1, "python")]}
    for name, res in run_many(specs).items():
        assert_ok(res)
        shutil.move(str(res.run_dir), str(runs / name))
    # Two runs that did not finish, as the harness records them: an OOM and a failure (status + error line).
    for name, status in (("lora-w4-oom", "oom"), ("lora-w3-failed", "failed")):
        shutil.copytree(runs / "lora-w2", runs / name)
        s = json.loads((runs / name / "summary.json").read_text())
        s.update(status=status, error="OutOfMemoryError: CUDA out of memory" if status == "oom" else "RuntimeError: x",
                 world_size=int(name.split("-w")[1][0]))
        (runs / name / "summary.json").write_text(json.dumps(s))
    return runs


@pytest.fixture(scope="module")
def report(runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    res = subprocess.run([sys.executable, "-m", "analysis", "report", str(runs_dir), "--out", str(out),
                          "--wandb-table", "--project", "bench-test"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.multiproc
def test_scaling_ratios_are_exact(runs_dir):
    runs = collect.from_dirs([str(runs_dir)])
    # the one series measured at two GPU counts (the others ran at one: nothing to scale against)
    (title, rows), = tables.scaling_tables(runs).items()
    assert title == "dp zero2 lora (baseline 1 GPU)"
    by_name = {r["run"]: r for r in rows}
    s1 = json.loads((runs_dir / "lora-w1" / "summary.json").read_text())
    s2 = json.loads((runs_dir / "lora-w2" / "summary.json").read_text())
    row = by_name["lora-w2"]
    assert row["time scaling (t_base/t_N)"] == s1["total_wall_time_s"] / s2["total_wall_time_s"]
    assert row["memory scaling (peak_base/peak_N)"] == (s1["memory"]["device"][0]["peak_mib"]
                                                        / s2["memory"]["device"][0]["peak_mib"])
    # CPU runs: the monitor measures process RSS, and the column says so
    assert row["rank 0 RSS mode (MiB)"] == s2["memory"]["device"][0]["mode_mib"]
    assert by_name["lora-w1"]["time scaling (t_base/t_N)"] == 1.0
    assert [r["GPUs"] for r in rows] == [1, 2], "runs that did not complete, or of another job, are not results"
    assert {r["run"]: r["status"] for r in tables.incomplete(runs)} == {"lora-w4-oom": "oom",
                                                                       "lora-w3-failed": "failed"}


@pytest.mark.multiproc
def test_comparison_against_baseline(runs_dir):
    runs = collect.from_dirs([str(runs_dir)])
    done = tables.by_job(runs)[JOB]
    base = tables.pick_baseline(done, "lora-w1")
    rows = {r["run"]: r for r in tables.comparison(done, base)}
    s1 = json.loads((runs_dir / "lora-w1" / "summary.json").read_text())
    sf = json.loads((runs_dir / "full-w2" / "summary.json").read_text())
    full = rows["full-w2"]
    assert full["throughput increase (x)"] == sf["tokens_per_s"] / s1["tokens_per_s"]
    assert full["time reduction (x)"] == s1["total_wall_time_s"] / sf["total_wall_time_s"]
    peak = lambda s: max(d["peak_mib"] for d in s["memory"]["device"])  # noqa: E731
    assert full["memory reduction (x)"] == peak(s1) / peak(sf)
    held = lambda s: max(r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]  # noqa: E731
                         for r in s["accounting"]["per_rank"]) / 2**20
    assert full["model states / rank (MiB)"] == pytest.approx(held(sf))
    assert full["model-state reduction (x)"] == pytest.approx(held(s1) / held(sf))
    # a LoRA run holds gradients and Adam states for its adapters only: far less than the full fine-tune
    assert full["model-state reduction (x)"] < 0.5
    assert full["activations / rank (MiB)"] == pytest.approx(
        max(r["activation_bytes"] for r in sf["accounting"]["per_rank"]) / 2**20)
    comm = [sum(r["comm_bytes_per_step"].values()) for r in sf["accounting"]["per_rank"]]
    assert full["communication / rank / step (MiB)"] == pytest.approx(max(comm) / 2**20) and min(comm) > 0
    assert "lora-w4-oom" not in rows
    with pytest.raises(ValueError, match="not one of the runs"):
        tables.check_baseline(runs, "nope")
    with pytest.raises(ValueError, match="did not complete"):
        tables.check_baseline(runs, "lora-w4-oom")


@pytest.mark.multiproc
def test_report_files(report, runs_dir):
    md = (report / "report.md").read_text()
    for name in ("lora-w1", "lora-w2", "full-w2", "lora-w4-oom", "lora-w3-failed"):
        assert name in md, name  # nothing silently dropped
    results, apart = md.split("## Runs that did not complete")
    assert "lora-w4-oom" not in results and "| oom |" in apart and "| failed |" in apart
    jobs = {j: JOB.replace("tiny-llama", j.split()[0]).replace("seq 128", f"seq {j.split()[1]}")
            for j in ("tiny-llama 128", "tiny-mixtral 128", "tiny-llama 64")}
    sections = {j: results.split(f"\n## {title}\n")[1].split("\n## ")[0] for j, title in jobs.items()}
    mixtral, short = sections["tiny-mixtral 128"], sections["tiny-llama 64"]
    assert "baseline: `mixtral-w1`" in mixtral and "lora-w1" not in mixtral, "never compared across models"
    assert "baseline: `lora-w1-seq64`" in short and "lora-w2" not in short, "nor across sequence lengths"
    assert "lora-w1-seq64" not in sections["tiny-llama 128"]
    assert "No scaling plot: no strategy of this job was measured at two or more GPU counts." in mixtral
    assert "### Scaling tables\n\n_None: no strategy of this job was measured at two or more GPU counts._" in mixtral
    # the job is named once, in its section's title: no row repeats it
    assert JOB not in sections["tiny-llama 128"].split("### Strategy comparison")[1]
    pngs = sorted(p.name for p in report.glob("*.png"))
    prefix = {j: plots.slug(title) for j, title in jobs.items()}
    assert prefix["tiny-llama 128"] == "tiny-llama-seq-128-global-batch-4-squad-sample-fp32-packed"
    assert pngs == sorted([f"{prefix['tiny-llama 128']}-scaling.png"] + [
        f"{p}-{k}.png" for p in prefix.values() for k in ("loss", "memory", "throughput", "utilization")])
    pngs = sorted(report.glob("*.png"))
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = image.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01, p  # a real, non-blank picture
    csv_lines = (report / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 8 and "step_time_s/median" in csv_lines[0]


@pytest.mark.browser
def test_html_renders_in_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.fail("chromium is not installed (bash scripts/install.sh --with-test-deps installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'u'}"]
    url = (report / "report.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table>") >= 2 and "lora-w4-oom" in dom and dom.count("data:image/png;base64,") == 13
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1400,900", url],
                   capture_output=True, timeout=120)
    img = image.imread(shot)
    # the top of the page holds the heading and the comparison table: dark text and grey header cells on white
    top = img[:450, :, :3]
    assert (top < 0.5).mean() > 0.005 and ((top > 0.85) & (top < 0.97)).mean() > 0.005, "no table visible"


@pytest.mark.multiproc
def test_wandb_table_has_every_row(report):
    tables_json = list((report / "wandb").glob("offline-run-*/files/media/table/comparison_*.table.json"))
    assert len(tables_json) == 1
    t = json.loads(tables_json[0].read_text())
    assert len(t["data"]) == 5 and "throughput increase (x)" in t["columns"]
    names = {row[t["columns"].index("run")] for row in t["data"]}
    assert names == {"lora-w1", "lora-w2", "full-w2", "mixtral-w1", "lora-w1-seq64"}, "completed runs, every job"


@pytest.mark.multiproc
def test_bars_are_labelled_uniquely_ordered_and_coloured_by_strategy(runs_dir):
    """Two bars never share a label (the run's name is in it), bars go by strategy then GPU count, one colour per
    strategy, and the throughput whisker spans the p90 to the p10 step time."""
    runs = [r for r in collect.from_dirs([str(runs_dir)]) if r.ok]
    names = [plots._name(r) for r in runs]
    assert len(set(names)) == len(names)
    order = plots.ordered(runs)
    assert [(r.strategy, r.gpus) for r in order] == sorted((r.strategy, r.gpus) for r in runs)
    assert [r.name for r in order if r.strategy == "dp zero2 lora"] == ["lora-w1", "lora-w1-seq64", "lora-w2"]
    colours = plots._colours(runs)
    assert len(set(colours.values())) == len(colours) == len({r.strategy for r in runs}) == 2
    s = next(r for r in runs if r.name == "lora-w2").summary
    low, high = metrics.throughput_spread(s["tokens_per_s"], s["step_time_s"])
    work = s["tokens_per_s"] * s["step_time_s"]["mean"]  # real tokens per step, on average
    assert low == pytest.approx(min(work / s["step_time_s"]["p90"], s["tokens_per_s"]))
    assert high == pytest.approx(max(work / s["step_time_s"]["p10"], s["tokens_per_s"]))
    # one slow step among steady ones lifts the mean above p90: the whisker still brackets the bar
    steady = metrics.step_time_stats([1.0] * 44 + [1.5])
    assert steady["mean"] > steady["p90"]
    low, high = metrics.throughput_spread(1000.0, steady)
    assert low == 1000.0 < high


@pytest.mark.multiproc
def test_wandb_report_object(report):
    rep = wandb_export.build_report("my-team", "bench-test", "tiny-llama", "t")
    grid = rep.blocks[1]
    assert [type(p).__name__ for p in grid.panels] == ["LinePlot", "LinePlot", "BarPlot", "BarPlot"]
    assert grid.panels[0].y == ["tokens_per_s"] and grid.panels[1].y == ["loss"]
    assert grid.panels[3].metrics == ["mfu"]
    assert grid.runsets[0].groupby == ["config.run.strategy"]
    written = json.loads((report / "report_definition.json").read_text())
    assert written["panel_types"] == ["LinePlot", "LinePlot", "BarPlot", "BarPlot"]
    assert written["report"]["project"] == "bench-test"


@pytest.mark.multiproc
def test_bench_plan_calibrates_from_real_runs_and_recommends_with_the_fit(runs_dir, tmp_path):
    """bench-plan --calibrate on this module's completed runs (their memory plans carry the cost features): a
    calibration file naming its runs and each constant fitted or default; --recommend --calibration orders by it
    and says so; an unfinished run is refused in one line."""
    done = [str(runs_dir / n) for n in ("lora-w1", "lora-w2", "full-w2", "mixtral-w1", "lora-w1-seq64")]
    cal = tmp_path / "cal.json"
    plan = [sys.executable, "-m", "bench.plan_cli"]
    res = subprocess.run([*plan, "--calibrate", *done, "--gpu", "H100-80GB", "--out", str(cal)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    written = json.loads(cal.read_text())
    assert written["runs"] == [os.path.basename(d) for d in done] and written["world_sizes"] == [1, 2]
    c = written["constants"]
    assert c["all_to_all"]["source"].startswith("default")  # no run here exchanges tokens
    # which terms the non-negative fit keeps depends on the timings; every term these runs vary is fitted (kept,
    # with its error, or set to zero), and one at least is kept
    for term in ("flops", "micro_batches", "step"):
        assert c[term]["source"].startswith("fitted"), (term, c[term])
    assert any(v["stderr"] is not None and v["coefficient"] > 0 for v in c.values()) and "flops" in res.stdout
    from bench import calibrate
    for d in done:  # each residual is the run's measured step less what the written constants predict for it
        s = json.loads((runs_dir / os.path.basename(d) / "summary.json").read_text())
        predicted = calibrate.predict(written, s["memory_plan"]["cost_features"])
        assert written["residual_s"][os.path.basename(d)] == pytest.approx(s["step_time_s"]["median"] - predicted,
                                                                           abs=1e-9)
    res = subprocess.run([*plan, "--recommend", "--model", "tiny-llama", "--world_size", "2", "--gpu", "H100-80GB",
                          "--seq_len", "128", "--packing", "off", "--calibration", str(cal)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "calibrated from 5 runs" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    res = subprocess.run([*plan, "--calibrate", str(runs_dir / "lora-w4-oom"), *done], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "only completed runs" in res.stderr, res.stderr[-2000:]
    out = tmp_path / "report"  # the report puts each run's calibrated step beside its measured one
    res = subprocess.run([sys.executable, "-m", "analysis", "report", *done, "--out", str(out), "--calibration",
                          str(cal)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (out / "report.md").read_text()
    assert "| measured / predicted |" in md and "| model explains it |" in md
