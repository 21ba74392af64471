"""PNG plots with labelled axes and units. Runs that did not complete are drawn as empty bars labelled with
their status, so a missing bar never reads as "zero"."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench import metrics  # noqa: E402
from analysis.collect import Run  # noqa: E402
from analysis.tables import family  # noqa: E402


def _bars(ax, labels, values, statuses, ylabel):
    xs = range(len(labels))
    # a run that did not complete gets an empty bar and its status: partial numbers are not results
    ax.bar(xs, [(v or 0) if s == "completed" else 0 for v, s in zip(values, statuses)],
           color=["tab:blue" if s == "completed" else "lightgray" for s in statuses])
    for x, v, s in zip(xs, values, statuses):
        if s != "completed":
            ax.text(x, 0, s.upper(), ha="center", va="bottom", rotation=90, fontsize=8, color="darkred")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
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
    return f"{r.label} @{r.gpus}"


def throughput(runs: list[Run], out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _bars(ax, [_name(r) for r in runs], [r.summary.get("tokens_per_s") for r in runs], [r.status for r in runs],
          "throughput (tokens/s, all GPUs)")
    ax.set_title("Throughput by strategy and GPU count")
    return _save(fig, os.path.join(out_dir, "throughput.png"))


def _per_device(runs: list[Run], key: str, ylabel: str, title: str, path: str) -> str:
    labels, values, statuses = [], [], []
    for r in runs:
        devices = (r.summary.get("memory") or {}).get("device") or [{}]
        for d in devices:
            labels.append(f"{_name(r)} dev{d.get('index', '?')}")
            values.append(d.get(key))
            statuses.append(r.status)
    fig, ax = plt.subplots(figsize=(max(9, 0.35 * len(labels)), 4.5))
    _bars(ax, labels, values, statuses, ylabel)
    ax.set_title(title)
    return _save(fig, path)


def memory(runs: list[Run], out_dir: str) -> str:
    return _per_device(runs, "peak_mib", "peak memory (MiB)", "Peak memory per device",
                       os.path.join(out_dir, "memory.png"))


def utilization(runs: list[Run], out_dir: str) -> str:
    return _per_device(runs, "util_avg_pct", "mean utilization (%)", "Device utilization",
                       os.path.join(out_dir, "utilization.png"))


def loss_curves(runs: list[Run], out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in runs:
        pts = [(h["step"], h["loss"]) for h in r.history if h.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), label=f"{_name(r)}" + ("" if r.ok else f" [{r.status}]"), linewidth=1.2)
    _line_axes(ax, "optimizer step", "train loss (reduced over ranks)", "Loss curves")
    return _save(fig, os.path.join(out_dir, "loss.png"))


def scaling(runs: list[Run], out_dir: str) -> str:
    """Per scaling series: tokens/s against GPUs, with ideal linear scaling from the series' smallest run."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.ok and r.summary.get("tokens_per_s"):
            series.setdefault(family(r), []).append(r)
    for key, members in series.items():
        members.sort(key=lambda r: r.gpus)
        base = members[0]
        gpus = [r.gpus for r in members]
        line, = ax.plot(gpus, [r.summary["tokens_per_s"] for r in members], marker="o", label=members[0].label)
        ideal = [metrics.ideal_throughput(base.summary["tokens_per_s"], base.gpus, g) for g in gpus]
        ax.plot(gpus, ideal, linestyle="--", color=line.get_color(), alpha=0.6)
        for r in members:
            eff = metrics.scaling_efficiency(r.summary["tokens_per_s"], r.gpus, base.summary["tokens_per_s"], base.gpus)
            ax.annotate(f"{eff:.0%}", (r.gpus, r.summary["tokens_per_s"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
    _line_axes(ax, "GPUs (processes)", "throughput (tokens/s)",
               "Scaling: measured (solid, % of ideal) vs ideal linear (dashed)")
    return _save(fig, os.path.join(out_dir, "scaling.png"))


def all_plots(runs: list[Run], out_dir: str) -> list[str]:
    return [f(runs, out_dir) for f in (throughput, memory, utilization, loss_curves, scaling)]
