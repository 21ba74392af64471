"""report.md and a self-contained report.html (plots embedded) from the same tables."""
from __future__ import annotations

import base64
import html
import os


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def _keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_no runs_\n"
    keys = _keys(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>no runs</em></p>"
    keys = _keys(rows)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


NO_SCALING = "None: no strategy of this job was measured at two or more GPU counts."


def write(out_dir: str, title: str, intro: str, sections: list[dict], incomplete: list[dict],
          weak: dict | None = None) -> tuple[str, str]:
    """sections: one per job, {job, baseline, comparison, scaling, plots, notes}; incomplete: the runs that
    did not complete, listed apart from the results; weak: weak-scaling series across jobs (tables.py)."""
    md = [f"# {title}", "", intro, ""]
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for sec in sections:
        job = sec["job"]
        md += [f"## {job}", "", f"### Strategy comparison (baseline: `{sec['baseline']}`)", "",
               _md_table(sec["comparison"]), "### Scaling tables", ""]
        parts += [f"<h2>{html.escape(job)}</h2>",
                  f"<h3>Strategy comparison (baseline: <code>{html.escape(sec['baseline'])}</code>)</h3>",
                  _html_table(sec["comparison"]), "<h3>Scaling tables</h3>"]
        if not sec["scaling"]:
            md += [f"_{NO_SCALING}_", ""]
            parts.append(f"<p><em>{html.escape(NO_SCALING)}</em></p>")
        for name, rows in sec["scaling"].items():
            md += [f"#### {name}", "", _md_table(rows)]
            parts += [f"<h4>{html.escape(name)}</h4>", _html_table(rows)]
        md += ["### Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in sec["plots"]]
        md += [""] + [f"_{n}_" for n in sec["notes"]] + [""]
        parts.append("<h3>Plots</h3>")
        for p in sec["plots"]:
            with open(p, "rb") as fh:
                data = base64.b64encode(fh.read()).decode()
            parts.append(f'<figure><img alt="{html.escape(os.path.basename(p))}" src="data:image/png;base64,'
                         f'{data}"><figcaption>{html.escape(os.path.basename(p))}</figcaption></figure>')
        parts += [f"<p><em>{html.escape(n)}</em></p>" for n in sec["notes"]]
    if not sections:
        md += ["No run completed: nothing to compare.", ""]
        parts.append("<p>No run completed: nothing to compare.</p>")
    if weak:  # series whose every GPU count is a job of its own: the batch per GPU fixed
        md += ["## Weak scaling (the same samples per GPU at growing GPU counts)", ""]
        parts.append("<h2>Weak scaling (the same samples per GPU at growing GPU counts)</h2>")
        for name, rows in weak.items():
            md += [f"### {name}", "", _md_table(rows)]
            parts += [f"<h3>{html.escape(name)}</h3>", _html_table(rows)]
    md += ["## Runs that did not complete", "",
           _md_table(incomplete) if incomplete else "_none_\n",
           "They are listed here, not in the results above: their numbers would be partial.", "",
           "Every number is defined in docs/metrics.md of the harness."]
    parts += ["<h2>Runs that did not complete</h2>", _html_table(incomplete) if incomplete else "<p>none</p>"]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#eee}"
             "img{max-width:100%}")
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w") as fh:
        fh.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                 f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    return md_path, html_path
