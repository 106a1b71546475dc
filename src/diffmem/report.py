"""The self-contained HTML report and ``summary.json`` written by ``diffmem reproduce``."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffmem.experiments.base import Experiment, Record, versions
from diffmem.io import atomic_write_bytes, atomic_write_json, jsonable

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.ok{background:#e3f5e1;border-left:5px solid #2e7d32;padding:.5em .8em}
.no{background:#fdecea;border-left:5px solid #c62828;padding:.5em .8em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
details{margin:.5em 0} code{font-size:.85em}
"""


def _scalars(value: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """Flatten metrics into ``(key, text)`` rows, abbreviating long lists."""
    rows: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k in {"verdict", "claim_holds"}:
                continue
            rows += _scalars(v, f"{prefix}{k}." if depth < 3 else prefix, depth + 1)
        return rows
    key = prefix.rstrip(".")
    if isinstance(value, list):
        text = json.dumps(value)
        if len(text) > 160:
            text = text[:157] + "..."
        return [(key, text)]
    if isinstance(value, float):
        return [(key, f"{value:.6g}")]
    return [(key, str(value))]


def _table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(v)}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


def write_report(out_dir: Path, records: Sequence[Record], experiments: dict[str, Experiment],
                 quick: bool, seed: int, total_s: float) -> None:
    """Write ``out_dir/index.html`` (figures embedded, viewable offline) and
    ``out_dir/summary.json``."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>diffmem report</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<h1>diffmem: memorization and regularization in diffusion models</h1>",
             f"<p>Reproduction of Baptista, Dasgupta, Kovachki, Oberai &amp; Stuart, "
             f"<i>Memorization and Regularization in Generative Diffusion Models</i> "
             f"(arXiv:2501.15785). Mode: <b>{'quick' if quick else 'paper settings'}</b>, "
             f"seed {seed}, total {total_s:.1f} s. Versions: "
             f"{html.escape(json.dumps(versions()))}.</p>"]
    held = sum(r.outcome.claim_holds for r in records)
    parts.append(f"<p><b>{held} of {len(records)}</b> claims confirmed.</p><ul>")
    for r in records:
        mark = "&#10004;" if r.outcome.claim_holds else "&#10008;"
        parts.append(f"<li>{mark} <a href='#{r.name}'>{r.name}</a>: "
                     f"{html.escape(r.outcome.verdict)}</li>")
    parts.append("</ul>")
    for r in records:
        exp = experiments[r.name]
        cls = "ok" if r.outcome.claim_holds else "no"
        parts.append(f"<h2 id='{r.name}'>{html.escape(r.name)}</h2>"
                     f"<p>{html.escape(exp.summary)}</p>"
                     f"<p><b>Paper's claim.</b> {html.escape(exp.claim)}</p>"
                     f"<div class='{cls}'><b>Verdict.</b> {html.escape(r.outcome.verdict)}</div>")
        for fig in r.figures:
            data = base64.b64encode((r.folder / fig).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(fig)}' src='data:image/png;base64,{data}'>")
        parts.append("<details open><summary>Metrics</summary>"
                     + _table(_scalars(jsonable(r.outcome.metrics))) + "</details>")
        parts.append("<details><summary>Parameters</summary>"
                     + _table(_scalars(jsonable(r.params))) + "</details>")
        parts.append(f"<p>Run time {r.elapsed_s:.1f} s. Files: <code>{r.name}/metrics.json"
                     f"</code>, <code>{r.name}/config.json</code>.</p>")
    parts.append("</body></html>")
    atomic_write_bytes(Path(out_dir) / "index.html", "\n".join(parts).encode())
    atomic_write_json(Path(out_dir) / "summary.json", {
        "quick": quick, "seed": seed, "total_elapsed_s": round(total_s, 3),
        "versions": versions(),
        "claims_confirmed": held, "experiments": {
            r.name: {"claim_holds": r.outcome.claim_holds, "verdict": r.outcome.verdict,
                     "elapsed_s": round(r.elapsed_s, 3), "metrics": f"{r.name}/metrics.json",
                     "config": f"{r.name}/config.json", "figures": r.figures}
            for r in records},
    })
