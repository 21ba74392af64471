"""The comparison in W&B: a wandb.Table (also as an artifact) in an analysis run, and a W&B Report
(wandb-workspaces Reports API) with a runset grouped by strategy, line plots of throughput and loss, and bar
plots of memory and MFU. Saving a report needs the W&B service; offline the report object is still built (and
so validated by its own schema) and its definition written to report_definition.json for publishing later."""
from __future__ import annotations

import json
import os

PANELS = [  # (kind, title, metrics): what the report shows, in order
    ("line", "Throughput (tokens/s)", ["tokens_per_s"]),
    ("line", "Train loss", ["loss"]),
    ("bar", "Peak memory per rank (MiB)", ["memory/peak_allocated_mib", "memory/rss_mib"]),
    ("bar", "MFU", ["mfu"]),
]


def log_table(rows: list[dict], project: str, entity: str | None, mode: str, out_dir: str) -> str | None:
    """Logs the comparison rows as a wandb.Table and a 'comparison' artifact; returns the run id."""
    import wandb
    keys = list(dict.fromkeys(k for r in rows for k in r))  # models may name a column differently (memory)
    # completed runs only (the report lists the others apart); mixed types stay allowed for n/a cells
    table = wandb.Table(columns=keys, data=[[_cell(r.get(k)) for k in keys] for r in rows], allow_mixed_types=True)
    run = wandb.init(project=project, entity=entity, job_type="analysis", name="strategy-comparison", mode=mode,
                     dir=out_dir, settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
    run.log({"comparison": table})
    art = wandb.Artifact("strategy-comparison", type="comparison")
    art.add(table, "comparison")
    run.log_artifact(art)
    run_id = run.id
    run.finish()
    return run_id


def _cell(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)


def build_report(entity: str, project: str, group: str | None, title: str):
    import wandb_workspaces.reports.v2 as wr
    runset = wr.Runset(entity=entity, project=project, name="benchmark runs", groupby=["config.run.strategy"],
                       filters=f"Config('run.wandb_group') == '{group}'" if group else "")
    panels = []
    for kind, panel_title, keys in PANELS:
        if kind == "line":
            panels.append(wr.LinePlot(title=panel_title, x="step", y=keys))
        else:
            panels.append(wr.BarPlot(title=panel_title, metrics=keys, orientation="v"))
    return wr.Report(project=project, entity=entity, title=title,
                     description="Strategy comparison from the DeepSpeed parallelism benchmark harness.",
                     blocks=[wr.H1(text=title), wr.PanelGrid(runsets=[runset], panels=panels)])


def publish_or_save(report, out_dir: str, online: bool) -> str:
    """online: save to W&B and return its URL; otherwise write the definition and return its path."""
    if online:
        report.save()
        return report.url
    import pydantic
    import wandb_workspaces.reports.v2 as wr
    definition = pydantic.TypeAdapter(wr.Report).dump_python(report, mode="json")
    panel_types = [type(p).__name__ for b in report.blocks if hasattr(b, "panels") for p in b.panels]
    path = os.path.join(out_dir, "report_definition.json")
    with open(path, "w") as fh:
        json.dump({"panel_types": panel_types, "report": definition}, fh, indent=1)
    return path
