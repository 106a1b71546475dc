"""The self-contained HTML report and ``summary.json`` written by ``diffmem reproduce``."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffmem.experiments.base import (
    CONFIRMED,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    STATUSES,
    Experiment,
    Record,
    versions,
)
from diffmem.io import atomic_write_bytes, atomic_write_json, jsonable

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.confirmed{background:#e3f5e1;border-left:5px solid #2e7d32;padding:.5em .8em;margin:.3em 0}
.not_reproduced{background:#fdecea;border-left:5px solid #c62828;padding:.5em .8em;margin:.3em 0}
.inconclusive{background:#fff6dc;border-left:5px solid #b8860b;padding:.5em .8em;margin:.3em 0}
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
            if k in {"verdict", "status", "claims"}:
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


#: How each status is shown: a mark and a label.
MARKS = {CONFIRMED: ("&#10004;", "confirmed"), NOT_REPRODUCED: ("&#10008;", "not reproduced"),
         INCONCLUSIVE: ("?", "inconclusive")}


def claim_counts(records: Sequence[Record]) -> dict[str, int]:
    """How many judged claims are in each status, over all runs."""
    counts = dict.fromkeys(STATUSES, 0)
    for r in records:
        for c in r.verdict.claims:
            counts[c.status] += 1
    return counts


def counts_text(counts: dict[str, int]) -> str:
    """``"11 confirmed, 1 not reproduced, 0 inconclusive"``."""
    return ", ".join(f"{counts[s]} {MARKS[s][1]}" for s in STATUSES)


def write_report(out_dir: Path, records: Sequence[Record], experiments: dict[str, Experiment],
                 quick: bool, seed: int, total_s: float) -> None:
    """Write ``out_dir/index.html`` (figures embedded, viewable offline) and
    ``out_dir/summary.json``."""
    counts = claim_counts(records)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>diffmem report</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<h1>diffmem: memorization and regularization in diffusion models</h1>",
             f"<p>Reproduction of Baptista, Dasgupta, Kovachki, Oberai &amp; Stuart, "
             f"<i>Memorization and Regularization in Generative Diffusion Models</i> "
             f"(arXiv:2501.15785). Mode: <b>{'quick' if quick else 'paper settings'}</b>, "
             f"seed {seed}, total {total_s:.1f} s. Versions: "
             f"{html.escape(json.dumps(versions()))}.</p>",
             f"<p>Claims: <b>{counts_text(counts)}</b> (confirmed: the paper's claim holds; "
             "not reproduced: a finding that differs from the paper, with its numbers; "
             "inconclusive: settings too small to judge).</p><ul>"]
    for r in records:
        for c in r.verdict.claims:
            mark = MARKS[c.status][0]
            parts.append(f"<li>{mark} <a href='#{r.name}'>{r.name}</a>: "
                         f"{html.escape(c.text)}</li>")
    parts.append("</ul>")
    for r in records:
        exp = experiments[r.name]
        parts.append(f"<h2 id='{r.name}'>{html.escape(r.name)}</h2>"
                     f"<p>{html.escape(exp.summary)}</p>")
        for c in r.verdict.claims:
            parts.append(f"<p><b>Paper's claim.</b> {html.escape(c.claim)}</p>"
                         f"<div class='{c.status}'><b>Verdict.</b> {html.escape(c.text)}</div>")
        for fig in r.figures:
            data = base64.b64encode((r.folder / fig).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(fig)}' src='data:image/png;base64,{data}'>")
        parts.append("<details open><summary>Metrics</summary>"
                     + _table(_scalars(jsonable(r.metrics))) + "</details>")
        parts.append("<details><summary>Parameters</summary>"
                     + _table(_scalars(jsonable(r.params))) + "</details>")
        parts.append(f"<p>Run time {r.elapsed_s:.1f} s. Files: <code>{r.name}/metrics.json"
                     f"</code>, <code>{r.name}/config.json</code>, "
                     f"<code>{r.name}/arrays.npz</code>.</p>")
    parts.append("</body></html>")
    atomic_write_bytes(Path(out_dir) / "index.html", "\n".join(parts).encode())
    atomic_write_json(Path(out_dir) / "summary.json", {
        "quick": quick, "seed": seed, "total_elapsed_s": round(total_s, 3),
        "versions": versions(), "claims": counts, "experiments": {
            r.name: {**r.verdict.as_json(), "elapsed_s": round(r.elapsed_s, 3),
                     "metrics": f"{r.name}/metrics.json", "config": f"{r.name}/config.json",
                     "figures": r.figures}
            for r in records},
    })
