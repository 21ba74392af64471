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


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_no runs_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>no runs</em></p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write(out_dir: str, title: str, intro: str, scaling: dict, comparison: list[dict], baseline: str | None,
          plots: list[str]) -> tuple[str, str]:
    md = [f"# {title}", "", intro, "", "## Strategy comparison", "",
          f"Baseline: `{baseline}`" if baseline else "No completed run to compare against.", "",
          _md_table(comparison), "## Scaling tables", ""]
    for name, rows in scaling.items():
        md += [f"### {name}", "", _md_table(rows)]
    md += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    md += ["", "Every number is defined in docs/metrics.md of the harness."]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md) + "\n")

    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>", "<h2>Strategy comparison</h2>",
             f"<p>Baseline: <code>{html.escape(baseline)}</code></p>" if baseline else "", _html_table(comparison),
             "<h2>Scaling tables</h2>"]
    for name, rows in scaling.items():
        parts += [f"<h3>{html.escape(name)}</h3>", _html_table(rows)]
    parts.append("<h2>Plots</h2>")
    for p in plots:
        with open(p, "rb") as fh:
            data = base64.b64encode(fh.read()).decode()
        parts.append(f'<figure><img alt="{html.escape(os.path.basename(p))}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(os.path.basename(p))}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#eee}"
             "img{max-width:100%}")
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w") as fh:
        fh.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                 f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    return md_path, html_path
