"""PNG plots of one job's completed runs (analysis.collect.Run.job), with labelled axes and units and the job in
every title; bars ordered by strategy and GPU count, coloured by strategy, each labelled with its run; a plot is
drawn only where it carries information (scaling needs two or more GPU counts in a series)."""
from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench import metrics  # noqa: E402
from analysis.collect import Run  # noqa: E402
from analysis.tables import memory_kind, series  # noqa: E402


def ordered(runs: list[Run]) -> list[Run]:
    """Bars by strategy, then GPU count, then run name."""
    return sorted(runs, key=lambda r: (r.strategy, r.gpus, r.name))


def _colours(runs: list[Run]) -> dict[str, str]:
    """One colour per strategy (Run.strategy: the layout aside), in bar order."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(r.strategy for r in ordered(runs)))
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


def _bars(ax, labels, values, ylabel, colours=None, spread=None):
    """spread: per bar (low, high) or None, drawn as a whisker."""
    xs = list(range(len(labels)))
    ax.bar(xs, [v or 0 for v in values], color=colours or "tab:blue")
    for x, v, s in zip(xs, values, spread or [None] * len(xs)):
        if v and s:
            ax.errorbar(x, v, yerr=[[v - s[0]], [s[1] - v]], color="black", capsize=3, linewidth=1)
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _line_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def _name(r: Run) -> str:
    """Unique within a report: the strategy and GPU count, and the run directory's name."""
    return f"{r.label} @{r.gpus} [{r.name}]"


def slug(title: str) -> str:
    """A file-name prefix from a job's title (unique in a report: tables.by_job)."""
    return re.sub(r"-+", "-", "".join(c if c.isalnum() or c in ".-" else "-" for c in title.strip("/"))).strip("-")


def throughput(runs: list[Run], path: str) -> str:
    runs, colours = ordered(runs), _colours(runs)
    fig, ax = plt.subplots(figsize=(max(9, 0.6 * len(runs)), 4.5))
    _bars(ax, [_name(r) for r in runs], [r.summary.get("tokens_per_s") for r in runs],
          "throughput (tokens/s, all GPUs)", [colours[r.strategy] for r in runs],
          [metrics.throughput_spread(r.summary.get("tokens_per_s"), r.summary.get("step_time_s")) for r in runs])
    ax.set_title(f"{runs[0].job_title}\nthroughput by strategy and GPU count (whiskers: p90-p10 step time)",
                 fontsize=9)
    return _save(fig, path)


def _per_device(runs: list[Run], key: str, ylabel: str, title: str, path: str) -> str:
    labels, values, colour, colours = [], [], [], _colours(runs)
    for r in ordered(runs):
        devices = (r.summary.get("memory") or {}).get("device") or [{}]
        for d in devices:
            labels.append(f"{_name(r)} dev{d.get('index', '?')}")
            values.append(d.get(key))
            colour.append(colours[r.strategy])
    fig, ax = plt.subplots(figsize=(max(9, 0.35 * len(labels)), 4.5))
    _bars(ax, labels, values, ylabel, colour)
    ax.set_title(f"{runs[0].job_title}\n{title}", fontsize=9)
    return _save(fig, path)


def memory(runs: list[Run], path: str) -> str:
    kind = memory_kind(runs)
    return _per_device(runs, "peak_mib", f"peak {kind} (MiB)", f"peak {kind} per device", path)


def utilization(runs: list[Run], path: str) -> str:
    """What a device's utilization counts (bench/monitor.py): on a GPU NVML's busy share (the time a kernel
    ran), on the CPU a rank's CPU time over the cores it may use; 100 % = always busy, either way."""
    if memory_kind(runs) == "GPU memory":
        label, what = "mean GPU busy (%)", "NVML: share of time a kernel ran, 100 % = always"
    else:
        label, what = "mean CPU use (%)", "CPU time over the cores the rank may use, 100 % = all busy"
    return _per_device(runs, "util_avg_pct", label, f"utilization per device ({what})", path)


def loss_curves(runs: list[Run], path: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in runs:
        pts = [(h["step"], h["loss"]) for h in r.history if h.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), label=_name(r), linewidth=1.2)
    _line_axes(ax, "optimizer step", "train loss (reduced over ranks)", f"{runs[0].job_title}: loss curves")
    return _save(fig, path)


def scaling(runs: list[Run], path: str) -> str | None:
    """Per scaling series: tokens/s against GPUs, with ideal linear scaling from the series' smallest run; None
    when no series has two GPU counts (a one-point "scaling" plot carries no information)."""
    drawn = [m for m in series(runs).values() if len({r.gpus for r in m}) >= 2 and m[0].summary.get("tokens_per_s")]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for members in drawn:
        base = members[0]
        gpus = [r.gpus for r in members]
        line, = ax.plot(gpus, [r.summary["tokens_per_s"] for r in members], marker="o",
                        label=base.strategy)
        ideal = [metrics.ideal_throughput(base.summary["tokens_per_s"], base.gpus, g) for g in gpus]
        ax.plot(gpus, ideal, linestyle="--", color=line.get_color(), alpha=0.6)
        for r in members:
            eff = metrics.scaling_efficiency(r.summary["tokens_per_s"], r.gpus, base.summary["tokens_per_s"], base.gpus)
            ax.annotate(f"{eff:.0%}", (r.gpus, r.summary["tokens_per_s"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
    _line_axes(ax, "GPUs (processes)", "throughput (tokens/s)",
               f"{runs[0].job_title}\nmeasured (solid, % of ideal) vs ideal linear scaling (dashed)")
    ax.set_xticks(sorted({r.gpus for m in drawn for r in m}))
    return _save(fig, path)


def job_plots(runs: list[Run], out_dir: str) -> tuple[list[str], list[str]]:
    """One job's completed runs -> (plot paths, notes on plots left out and why)."""
    prefix = os.path.join(out_dir, slug(runs[0].job_title))
    paths = [throughput(runs, f"{prefix}-throughput.png"), memory(runs, f"{prefix}-memory.png"),
             utilization(runs, f"{prefix}-utilization.png"), loss_curves(runs, f"{prefix}-loss.png")]
    notes = []
    scaled = scaling(runs, f"{prefix}-scaling.png")
    if scaled:
        paths.append(scaled)
    else:
        notes.append("No scaling plot: no strategy of this job was measured at two or more GPU counts.")
    return paths, notes
