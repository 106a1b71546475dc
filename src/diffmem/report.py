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
)
from diffmem.io import atomic_write_bytes, atomic_write_json, figure_png, jsonable, versions

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
.running{background:#eef3fb;border-left:5px solid #1565c0;padding:.5em .8em}
progress{width:14em;vertical-align:middle}
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


def _times_table(records: Sequence[Record]) -> str:
    """A row per finished experiment: its verdict marks and its run time in seconds, the
    slowest first (where the run's time went)."""
    rows = "".join(
        f"<tr><td><a href='#{r.name}'>{html.escape(r.name)}</a></td>"
        f"<td>{' '.join(MARKS[c.status][0] for c in r.verdict.claims)}</td>"
        f"<td style='text-align:right'>{r.elapsed_s:.1f}</td></tr>"
        for r in sorted(records, key=lambda r: -r.elapsed_s))
    return ("<details open><summary>Time per experiment (seconds, slowest first)</summary>"
            f"<table><tr><th>experiment</th><th>claims</th><th>s</th></tr>{rows}</table>"
            "</details>")


def write_report(out_dir: Path, records: Sequence[Record], experiments: dict[str, Experiment],
                 quick: bool, seed: int, total_s: float, pending: Sequence[str] = ()) -> None:
    """Write ``out_dir/index.html`` (figures embedded, viewable offline) and
    ``out_dir/summary.json``. While experiments are ``pending`` (still running) the page
    says so with a progress bar and reloads itself every 15 s."""
    counts = claim_counts(records)
    reload = "<meta http-equiv='refresh' content='15'>" if pending else ""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'>{reload}"
             f"<title>diffmem report</title><style>{_STYLE}</style></head><body>",
             "<h1>diffmem: memorization and regularization in diffusion models</h1>",
             f"<p>Reproduction of Baptista, Dasgupta, Kovachki, Oberai &amp; Stuart, "
             f"<i>Memorization and Regularization in Generative Diffusion Models</i> "
             f"(arXiv:2501.15785). Mode: <b>{'quick' if quick else 'paper settings'}</b>, "
             f"seed {seed}, total {total_s:.1f} s. Versions: "
             f"{html.escape(json.dumps(versions()))}.</p>",
             f"<p>Claims: <b>{counts_text(counts)}</b> (confirmed: the paper's claim holds; "
             "not reproduced: a finding that differs from the paper, with its numbers; "
             "inconclusive: settings too small to judge).</p>"]
    if pending:
        done, total = len(records), len(records) + len(pending)
        parts.append(f"<p class='running'><progress value='{done}' max='{total}'></progress> "
                     f"{done} of {total} experiments done ({total_s:.0f} s so far); still "
                     f"running or waiting: {html.escape(', '.join(pending))}. This page "
                     "reloads itself.</p>")
    parts.append("<ul>")
    for r in records:
        for c in r.verdict.claims:
            mark = MARKS[c.status][0]
            parts.append(f"<li>{mark} <a href='#{r.name}'>{r.name}</a>: "
                         f"{html.escape(c.text)}</li>")
    parts.append("</ul>")
    parts.append(_times_table(records))
    for r in records:
        exp = experiments[r.name]
        parts.append(f"<h2 id='{r.name}'>{html.escape(r.name)}</h2>"
                     f"<p>{html.escape(exp.summary)}</p>")
        for c in r.verdict.claims:
            parts.append(f"<p><b>Paper's claim.</b> {html.escape(c.claim)}</p>"
                         f"<div class='{c.status}'><b>Verdict.</b> {html.escape(c.text)}</div>")
        for fig in r.figures:
            png = (r.folder / fig).read_bytes()
            parts.append(f"<img alt='{html.escape(fig)}' src='{_uri(png)}'>")
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
        "pending": list(pending),
        "versions": versions(), "claims": counts, "experiments": {
            r.name: {**r.verdict.as_json(), "elapsed_s": round(r.elapsed_s, 3),
                     "metrics": f"{r.name}/metrics.json", "config": f"{r.name}/config.json",
                     "figures": r.figures}
            for r in records},
    })


# --- the audit's page ----------------------------------------------------------------------
#: Sample/nearest pairs shown in the audit gallery.
GALLERY = 24


def _image_png(img: Any, size: int = 72) -> bytes:
    """An image ``(H, W)`` or ``(C, H, W)`` with values in [0, 1] as PNG bytes, enlarged
    (nearest neighbour) to about ``size`` pixels."""
    import io

    import numpy as np
    from PIL import Image

    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
    a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(a)
    scale = max(1, size // max(a.shape[0], a.shape[1]))
    im = im.resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _figure_uri(fig: Any) -> str:
    """A matplotlib figure as a ``data:`` URI of its PNG (the figure is closed)."""
    return _uri(figure_png(fig, dpi=100, tight=False))


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _histograms(result: Any) -> str:
    """d1, d1/d2 and the calibrated distance, with the thresholds drawn."""
    import numpy as np
    from matplotlib.ticker import NullFormatter

    from diffmem import plots

    fig, ax = plots.figure(1, 3, size=3.6)
    d1 = result.d1.numpy()
    positive = d1[d1 > 0]
    if positive.size:
        bins = np.logspace(np.log10(positive.min()), np.log10(max(positive.max(),
                                                                  positive.min() * 1.01)), 40)
        ax[0, 0].hist(positive, bins=bins, color="C0")
        ax[0, 0].set_xscale("log")
        ax[0, 0].xaxis.set_minor_formatter(NullFormatter())  # labels on decades only
    ax[0, 0].set_title(f"d1 ({int((d1 == 0).sum())} exactly 0)", fontsize=9)
    ax[0, 0].set_xlabel("distance to the nearest training item")
    for key, thr_key, a, label in (("ratio", "nn_ratio", ax[0, 1], "d1 / d2"),
                                   ("calibrated", "calibrated_l2", ax[0, 2],
                                    "calibrated distance")):
        values = getattr(result, key).numpy()
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        # 40 bins need a range well above the values' round-off (float32: 1.2e-7 relative)
        spread = hi - lo > 1e-5 * max(1.0, abs(hi))
        a.hist(values, bins=40 if spread else 1,
               range=None if spread else (lo - 0.5 * max(1.0, abs(lo)) * 1e-3,
                                          hi + 0.5 * max(1.0, abs(hi)) * 1e-3), color="C1")
        thr = getattr(result, thr_key)["threshold"]
        a.axvline(thr, color="C3", lw=1.5, label=f"threshold {thr:.3g}")
        a.set_xlabel(label)
        a.legend(fontsize=8)
    return _figure_uri(fig)


def _scatter(result: Any, samples: Any, train: Any) -> str:
    """Vectors: a 2-D PCA of the training set with the samples over it (copies by the
    nn-ratio test in red)."""
    import torch

    from diffmem import plots

    n_train = min(train.n, 5000)
    pick = torch.linspace(0, train.n - 1, n_train).round().long().tolist()
    t = train.take(pick).reshape(n_train, -1).double()
    s = samples.take(list(range(min(samples.n, 5000)))).reshape(-1, t.shape[1]).double()
    centre = t.mean(0)
    _, _, v = torch.pca_lowrank(t - centre, q=min(2, t.shape[1]), center=False)
    pt, ps = (t - centre) @ v, (s - centre) @ v
    if pt.shape[1] == 1:
        pt, ps = torch.cat([pt, 0 * pt], 1), torch.cat([ps, 0 * ps], 1)
    copies = result.copies["nn_ratio"][: ps.shape[0]].numpy()
    fig, ax = plots.figure(1, 1, size=5.0)
    a = ax[0, 0]
    a.scatter(ps[~copies, 0].numpy(), ps[~copies, 1].numpy(), s=8, color="C0",
              label="samples", zorder=1)
    a.scatter(ps[copies, 0].numpy(), ps[copies, 1].numpy(), s=30, color="C3",
              label="copies (nn ratio)", zorder=2)
    a.scatter(pt[:, 0].numpy(), pt[:, 1].numpy(), s=18, color="k", marker="x",
              linewidths=0.8, label="training", zorder=3)
    a.set_title("samples over the training set (first two principal components)", fontsize=9)
    a.legend(fontsize=8)
    return _figure_uri(fig)


def _count(n: int, one: str, many: str) -> str:
    """``n`` with its noun in the right number: ``1 copy``, ``3 copies``."""
    return f"{n} {one if n == 1 else many}"


def write_audit_report(out_dir: Path, result: Any, samples: Any, train: Any,
                       inputs: dict[str, Any], gap: dict[str, Any] | None = None,
                       extra: dict[str, Any] | None = None) -> None:
    """``out_dir/audit.json``, ``per_sample.csv`` and ``index.html`` (one offline page: the
    numbers, histograms with thresholds, and the most copy-like samples beside their nearest
    training items, or a 2-D PCA scatter for vectors). ``samples`` and ``train`` are
    :class:`diffmem.audit.Rows` of the data (not the features); ``extra`` joins audit.json
    (e.g. ``draws_per_process``)."""
    import csv
    import io

    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "audit.json", {**result.to_json(), "inputs": inputs,
                                               **(extra or {})})
    rows = list(result.per_sample())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "per_sample.csv", buf.getvalue().encode())
    summary = _audit_summary(result)
    given = inputs.get("train")
    train_names = ", ".join(map(str, given)) if isinstance(given, list | tuple) else str(given)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>diffmem audit</title>"
             f"<style>{_STYLE}.pair{{display:inline-block;margin:6px;text-align:center;"
             "font-size:.75em;border:1px solid #ddd;padding:4px}.pair img{border:0;margin:0 2px}"
             "</style></head><body><h1>diffmem audit: do these samples copy the training "
             "data?</h1>",
             f"<p>Samples: <code>{html.escape(str(inputs.get('samples')))}</code>"
             + (f" (drawn from <code>{html.escape(str(inputs['model']))}</code> with the "
                f"{html.escape(str(inputs.get('sampler')))} sampler)"
                if inputs.get("model") else "") + "; training "
             f"set: <code>{html.escape(train_names)}</code>. Distances are "
             "Euclidean (data or feature units); ratios are dimensionless.</p>",
             "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary)
             + "</table>",
             f"<h2>Distributions</h2><img alt='histograms' src='{_histograms(result)}'>"]
    if result.conditions is not None:
        parts += _conditions_section(result, samples, train)
    parts += _audit_gallery(result, samples, train)
    if gap is not None:
        atomic_write_json(out_dir / "denoiser_gap.json", gap)
        parts.append(_gap_section(gap))
    parts.append("<p>Files: <code>audit.json</code> (every figure above with its units), "
                 "<code>per_sample.csv</code> (one row per sample)"
                 + (", <code>samples.npy</code>, <code>denoiser_gap.json</code>"
                    if gap is not None else "") + ".</p></body></html>")
    atomic_write_bytes(out_dir / "index.html", "\n".join(parts).encode())


def _audit_summary(result: Any) -> list[tuple[str, str]]:
    """The audit page's table of figures (label, value)."""
    summary = [
        ("samples / training items / dimension",
         f"{result.n_samples} / {result.n_train} / {result.dim}"),
        ("distances in", "feature space " + html.escape(str(result.features))
         if result.features else "data space"),
        ("neighbour search", html.escape(result.index)),
        ("nn-ratio copies (d1/d2 < "
         f"{result.nn_ratio['threshold']:.3g})",
         f"{result.nn_ratio['fraction']:.3f} [{result.nn_ratio['ci_low']:.3f}, "
         f"{result.nn_ratio['ci_high']:.3f}] ({result.nn_ratio['level']:.0%} interval)"),
        (f"calibrated-l2 copies (< {result.calibrated_l2['threshold']:.3g}, alpha "
         f"{result.calibrated_l2['alpha']:g}, n {result.calibrated_l2['n']})",
         f"{result.calibrated_l2['fraction']:.3f}"),
        *([("reproductions of a condition's item", f"{result.reproduction['fraction']:.3f} "
            f"[{result.reproduction['ci_low']:.3f}, {result.reproduction['ci_high']:.3f}]")]
          if result.reproduction is not None else []),
        ("fraction within delta", ", ".join(f"{k}: {v:.3f}"
                                            for k, v in result.fraction_within.items())),
        ("distinct training items copied (coverage)",
         f"{result.duplicates['distinct_train_items']} "
         f"({result.duplicates['coverage']:.3%} of the training set)"),
    ]
    if result.rms_per_coordinate:
        summary.append(("delta as per-pixel RMS", ", ".join(
            f"{k}: {v:.4g}" for k, v in result.rms_per_coordinate.items())))
    if result.exact_match is not None:
        summary.append(("exact matches (pixels at 0.5)", f"{result.exact_match:.3f}"))
    if result.cosine_summary:
        summary.append(("mean cosine similarity to the nearest item",
                        f"{result.cosine_summary['nearest_mean']:.4f}"))
    if result.recall:
        summary.append(("IVF recall against exact search", html.escape(json.dumps(
            result.recall))))
    return summary


def _pair(result: Any, i: int, sample: Any, near: Any) -> str:
    """Sample ``i`` beside its nearest training item, framed red when an nn-ratio copy."""
    frame = "#c62828" if bool(result.copies["nn_ratio"][i]) else "#ddd"
    return (f"<div class='pair' style='border-color:{frame}'>"
            f"<img alt='sample {i}' src='{_uri(_image_png(sample))}'>"
            f"<img alt='training item {int(result.nearest[i])}' "
            f"src='{_uri(_image_png(near))}'><br>sample {i} | train "
            f"{int(result.nearest[i])}<br>d1 {float(result.d1[i]):.3g}, d1/d2 "
            f"{float(result.ratio[i]):.3f}, cal. {float(result.calibrated[i]):.3f}</div>")


#: Conditions whose samples the page shows, and samples shown for each.
SHOWN_CONDITIONS, PER_SHOWN_CONDITION = 4, 6


def _conditions_section(result: Any, samples: Any, train: Any) -> list[str]:
    """Per condition: a table sorted by nn-ratio copy fraction, and (images) the samples of
    the most-copied conditions beside their nearest training items."""
    entries = result.conditions
    parts = ["<h2>Per condition</h2><p>Sorted by the larger of the nn-ratio and reproduction "
             "fractions. 'Reproduction': the fraction of the condition's samples whose nearest "
             "training item is the condition's most frequent one and that lie closer to it "
             "than its own nearest other training item (all the samples of a memorized "
             "condition landing on one image, however typical the image). 'Same condition': "
             "the fraction of the condition's samples whose nearest training item carries "
             "that condition.</p><table><tr><th>condition</th><th>samples</th><th>nn-ratio "
             "copies</th><th>reproduction (item)</th><th>calibrated-l2 copies</th>"
             "<th>same condition</th></tr>"]
    for e in entries:
        nn, same, rep = e["nn_ratio"], e["same_condition"], e["reproduction"]
        parts.append(f"<tr><td>{html.escape(json.dumps(e['condition']))}</td>"
                     f"<td>{e['n_samples']}</td><td>{nn['fraction']:.3f} [{nn['ci_low']:.3f}, "
                     f"{nn['ci_high']:.3f}]</td><td>{rep['fraction']:.3f} "
                     f"[{rep['ci_low']:.3f}, {rep['ci_high']:.3f}] ({rep['train_index']})</td>"
                     f"<td>{e['calibrated_l2']['fraction']:.3f}</td>"
                     f"<td>{'n/a' if same is None else f'{same:.3f}'}</td></tr>")
    parts.append("</table>")
    if len(result.data_shape) >= 2:
        for e in entries[:SHOWN_CONDITIONS]:
            order = e["samples"][:PER_SHOWN_CONDITION]
            near = train.take([int(result.nearest[i]) for i in order])
            shown = samples.take(order)
            parts.append(f"<h3>Condition {html.escape(json.dumps(e['condition']))}: "
                         f"{e['nn_ratio']['fraction']:.0%} nn-ratio copies, "
                         f"{e['reproduction']['fraction']:.0%} reproductions of training "
                         f"item {e['reproduction']['train_index']}</h3><div>")
            parts += [_pair(result, i, shown[j], near[j]) for j, i in enumerate(order)]
            parts.append("</div>")
    return parts


def _audit_gallery(result: Any, samples: Any, train: Any) -> list[str]:
    """The most copy-like samples beside their nearest training items and the most-copied
    items (images), or the samples over a PCA of the training set and a table (vectors)."""
    parts: list[str] = []
    images = len(result.data_shape) >= 2
    order = result.ratio.argsort()[:GALLERY].tolist()
    if images:
        parts.append(f"<h2>The {len(order)} most copy-like samples beside their nearest "
                     "training items</h2><p>Sorted by d1/d2; red frame: a copy by the "
                     "nn-ratio test.</p><div>")
        near = train.take([int(result.nearest[i]) for i in order])
        shown = samples.take(order)
        parts += [_pair(result, i, shown[j], near[j]) for j, i in enumerate(order)]
        parts.append("</div>")
        most = result.duplicates["most_copied"]
        if most:
            items = train.take([m["train_index"] for m in most])
            parts.append("<h2>Most-copied training items</h2><div>")
            for m, img in zip(most, items, strict=True):
                parts.append(f"<div class='pair'><img alt='training item {m['train_index']}'"
                             f" src='{_uri(_image_png(img))}'><br>item {m['train_index']}: "
                             f"{_count(m['copies'], 'copy', 'copies')}</div>")
            parts.append("</div>")
    else:
        parts.append("<h2>Samples over the training set</h2><img alt='PCA scatter' "
                     f"src='{_scatter(result, samples, train)}'>")
        parts.append("<h2>The most copy-like samples</h2>" + _table([
            (f"sample {i}", f"nearest training item {int(result.nearest[i])}, d1 "
             f"{float(result.d1[i]):.4g}, d1/d2 {float(result.ratio[i]):.4f}, calibrated "
             f"{float(result.calibrated[i]):.4f}") for i in order]))
    return parts


def _gap_section(gap: dict[str, Any]) -> str:
    """The audit page's section on the model's denoiser against the empirical one."""
    from diffmem import plots
    from diffmem.audit import follows_down_to

    level = follows_down_to(gap)
    fig = plots.denoiser_gap_figure({"model": gap}, "the model's denoiser against the "
                                                    "empirical (memorizing) one")
    held = " and noisy held-out points" if "held" in gap else ""
    reach = (f"It stays within 0.1 of it from the top of the grid down to sigma = {level:.3g}."
             if level is not None else
             "It is not within 0.1 of it even at the largest level of the grid.")
    return ("<h2>How far is the model from the memorizing score?</h2><p>E|D_model - D_e|^2 / "
            f"E|D_e - x|^2 at each noise level, for noisy training points{held}: near 0 the "
            "model denoises like the empirical score, i.e. returns training points. At large "
            "noise every good denoiser agrees with it; what tells is how far down the model "
            f"follows it. {reach}</p><img alt='denoiser gap' "
            f"src='{_figure_uri(fig)}'>" + _gap_conditions(gap))


def _gap_conditions(gap: dict[str, Any]) -> str:
    """For a conditional model: per condition, how far down the model follows the
    conditional empirical denoiser."""
    if "conditions" not in gap:
        return ""
    rows = [(html.escape(json.dumps(e["condition"])),
             "not at the largest level" if e["follows_down_to"] is None
             else f"down to sigma = {e['follows_down_to']:.3g}") for e in gap["conditions"]]
    return ("<p>Against the conditional empirical denoiser D_e(x, t | y) "
            f"({html.escape(gap['conditional']['mode'])}), per condition (the curve above "
            "pools them):</p>" + _table(rows))


def _cell(v: Any) -> str:
    """A table cell: yes/no for a verdict, a word as it is, else :func:`_sig`."""
    if isinstance(v, str):
        return html.escape(v)
    return ("yes" if v else "no") if isinstance(v, bool) else _sig(v)


def _sig(v: Any, digits: int = 3) -> str:
    """A number to ``digits`` significant digits (``-`` when missing)."""
    if v is None:
        return "-"
    if isinstance(v, int | bool):
        return str(int(v))
    return f"{v:.{digits}g}"


def write_detect_report(folder: Path, result: Any, inputs: dict[str, Any],
                        reference: Any = None) -> None:
    """``detect.json``, ``detect.csv`` and ``index.html`` (the verdicts and their rule,
    ranking with every measure to three significant digits, the copy fraction or label
    where known, histograms per label with the verdict's threshold, ROC) in ``folder``, for
    conditions or samples alike; ``reference`` is the result on ``--reference``."""
    from diffmem.detect import UNITS

    folder = Path(folder)
    doc = {**result.to_json(), "inputs": inputs}
    if reference is not None:
        doc["reference"] = reference.entries
    atomic_write_json(folder / "detect.json", doc)
    names = result.measures
    key = "condition" if result.kind == "conditions" else "index"
    extra = [k for k in ("memorized", "consistency_ratio", "generations", "stopped", "copied",
                         "label") if any(k in e for e in result.entries)]
    _detect_csv(folder, result, names, extra, key)
    uri = _detect_figure(result, names, reference)
    head = "".join(f"<th>{html.escape(n)}{' (primary)' if n == result.primary else ''}</th>"
                   for n in names) + "".join(f"<th>{k}</th>" for k in extra)
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(json.dumps(e[key]))}</td>"
        + "".join(f"<td>{_sig(e.get(n))}</td>" for n in names)
        + "".join(f"<td>{_cell(e.get(k))}</td>" for k in extra) + "</tr>"
        for i, e in enumerate(result.ranking()))
    auc = "".join(f"<li>{n}: AUC {r['auc']:.3f}, TPR at 1% FPR {r['tpr_at_1pct_fpr']:.3f} "
                  f"({r['n_positive']} memorized, {r['n_negative']} not)</li>"
                  for n, r in result.roc.items())
    units = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(UNITS[n])}</li>"
                    for n in names)
    st = result.settings
    what = (f"{len(result.entries)} conditions, {st['n_noise']} noise draws, levels sigma/m "
            f"{', '.join(_sig(v) for v in st['levels'])}, {st['steps']} DDIM steps"
            if result.kind == "conditions" else
            f"{len(result.entries)} samples, {st['n_noise']} noise draws, level sigma/m "
            f"{_sig(st['level'])}")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>diffmem detect</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>diffmem detect: which {result.kind} does the model memorize?</h1>"
        f"<p>Model <code>{html.escape(str(inputs.get('model')))}</code>, {what}; "
        f"{_sig(st['seconds'])} s in all. Every measure: larger means more likely "
        f"memorized; ranked by the primary measure, <b>{result.primary}</b>.</p>"
        f"<ul>{units}</ul><h2>Verdicts</h2>{_verdict_html(result)}"
        + (f"<h2>Against the labels</h2><ul>{auc}</ul>" if auc else "")
        + f"<img alt='histograms and ROC' src='{uri}'>"
        f"<h2>Ranking</h2><table><tr><th>rank</th><th>{key}</th>{head}</tr>"
        + rows + "</table><p>Files: <code>detect.json</code>, <code>detect.csv</code>.</p>"
        "</body></html>")
    atomic_write_bytes(folder / "index.html", page.encode())


def _detect_csv(folder: Path, result: Any, names: list[str], extra: list[str],
                key: str) -> None:
    """``detect.csv``: the ranking with every measure and the verdict's fields."""
    import csv
    import io

    buf = io.StringIO()
    fields = ["rank", "index"] + (["condition"] if key == "condition" else []) + names + \
        extra + ["seconds"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**e, "rank": i + 1, **({"condition": json.dumps(e["condition"])}
                                             if key == "condition" else {})}
                     for i, e in enumerate(result.ranking()))
    atomic_write_bytes(folder / "detect.csv", buf.getvalue().encode())


def _detect_figure(result: Any, names: list[str], reference: Any) -> str:
    """Each measure's histogram (per label where known; the reference's values and the
    verdict's threshold on the verdict's measure) and the ROC, as a ``data:`` URI."""
    import numpy as np

    from diffmem import plots

    verdict = result.verdict or {}
    shown = [n for n in names if any(e.get(n) is not None for e in result.entries)]
    if verdict.get("measure") == "consistency_ratio":
        shown.append("consistency_ratio")
    spectra = any(e.get("spectrum") for e in result.entries)
    fig, ax = plots.figure(1, len(shown) + (1 if result.roc else 0) + spectra, size=3.0)
    if spectra:
        _spectra_panel(ax[0, len(shown) + (1 if result.roc else 0)], result)
    for k, name in enumerate(shown):
        pairs = [(e[name], e.get("label")) for e in result.entries if e.get(name) is not None]
        values = np.array([v for v, _ in pairs])
        held = np.array([] if reference is None or verdict.get("measure") != name else [
            e[name] for e in reference.entries if e.get(name) is not None])
        bins = np.histogram_bin_edges(np.concatenate([values, held]), bins=15)
        if result.roc:
            lab = np.array([-1 if m is None else m for _, m in pairs])
            ax[0, k].hist(values[lab == 0], bins=bins, alpha=0.6, label="not memorized")
            ax[0, k].hist(values[lab == 1], bins=bins, alpha=0.6, color="C3",
                          label="memorized")
        else:
            ax[0, k].hist(values, bins=bins, label=result.kind)
        if held.size:
            ax[0, k].hist(held, bins=bins, alpha=0.5, color="0.5",
                          label=f"reference ({held.size})")
        if verdict.get("measure") == name:
            ax[0, k].axvline(verdict["threshold"], color="C3", lw=1.5, ls="--",
                             label=f"verdict threshold {verdict['threshold']:.3g}")
        if result.roc or verdict.get("measure") == name:
            ax[0, k].legend(fontsize=6)
        ax[0, k].set(xlabel=name + (" (primary)" if name == result.primary else ""),
                     ylabel=result.kind)
    if result.roc:
        a = ax[0, len(shown)]
        for name, r in result.roc.items():
            a.plot(r["fpr"], r["tpr"], label=f"{name}: AUC {r['auc']:.3f}")
        a.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
        a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        a.legend(fontsize=6)
    fig.tight_layout()
    return _figure_uri(fig)


def _spectra_panel(a: Any, result: Any) -> None:
    """The spectra of the score's Jacobian at the samples (times ``sigma^2``), the median of
    the samples called copies (by the verdict, else the label) against the others'."""
    import numpy as np

    for flag, colour, label in ((True, "C3", "called copies"), (False, "C0", "the others")):
        rows = [e["spectrum"] for e in result.entries if e.get("spectrum") and
                bool(e.get("memorized", e.get("label") == 1)) == flag]
        if rows:
            mid = np.median(np.array(rows), axis=0)
            a.plot(np.arange(1, mid.size + 1), mid, color=colour,
                   label=f"{label} ({len(rows)})")
    a.axhline(-0.5, color="0.6", ls=":", lw=0.8)
    a.set(xlabel="direction (descending eigenvalue)", ylabel="sigma^2 x eigenvalue of dS/dx",
          title="score Jacobian spectra")
    a.legend(fontsize=6)


def _verdict_html(result: Any) -> str:
    """The verdicts' paragraph: how many memorized, the rule, the rates against labels,
    the reference's bound."""
    from diffmem.verdicts import bound_note

    verdict = result.verdict or {}
    if not verdict.get("rule"):
        return f"<p>No verdicts: {html.escape(str(verdict.get('why')))}.</p>"
    lab = verdict.get("against_labels") or {}
    judged = (f"<p><b>{verdict['n_memorized']} of {len(result.entries)} {result.kind} "
              f"memorized</b>. Rule: {html.escape(verdict['rule'])}.")
    if lab.get("tpr") is not None and lab.get("fpr") is not None:
        judged += (f" Against the labels: TPR {lab['tpr']:.3f} ({lab['n_positive']} "
                   f"memorized), FPR {lab['fpr']:.3f} ({lab['n_negative']} not).")
    if verdict.get("in_doubt"):
        judged += (f" {verdict['in_doubt']} in doubt at the cap (interval across the line): "
                   "not memorized.")
    note = bound_note(verdict)
    judged += "" if note is None else f" Note: {html.escape(note)}."
    return judged + "</p>"


def write_compare_report(folder: Path, result: Any, samples_a: Any, samples_b: Any,
                         inputs: dict[str, Any]) -> None:
    """``compare.json``, ``per_pair.csv`` and ``index.html`` (the figures, then pairs side by
    side for images, or both sample clouds over a PCA for vectors) in ``folder``."""
    import csv
    import io

    import numpy as np

    from diffmem import plots

    folder = Path(folder)
    summary = result.to_json()
    atomic_write_json(folder / "compare.json", {**summary, "inputs": inputs})
    rows = result.per_pair()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(folder / "per_pair.csv", buf.getvalue().encode())
    lo, hi = summary["agreement_ci"]
    table = _table([
        ("pairs", str(summary["n_pairs"])),
        ("agreement (d_ab < min(d_a, d_b))", f"{summary['agreement']:.3f} [{lo:.3f}, {hi:.3f}]"),
        ("median d_ab / d_a / d_b", f"{summary['median_d_ab']:.4g} / {summary['median_d_a']:.4g}"
                                    f" / {summary['median_d_b']:.4g}"),
        ("copies of A's samples in A / of B's in B (nn-ratio)",
         f"{summary['copied_a']:.3f} / {summary['copied_b']:.3f}")])
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>diffmem compare</title>"
             f"<style>{_STYLE}.pair{{display:inline-block;margin:6px;text-align:center;"
             "font-size:.75em;border:1px solid #ddd;padding:4px}</style></head><body>"
             "<h1>diffmem compare: do two models trained on disjoint halves agree?</h1>"
             f"<p>Model A <code>{html.escape(str(inputs.get('model_a')))}</code> on "
             f"<code>{html.escape(str(inputs.get('train_a')))}</code>, model B "
             f"<code>{html.escape(str(inputs.get('model_b')))}</code> on "
             f"<code>{html.escape(str(inputs.get('train_b')))}</code>, sampled from the same "
             "noise. When they generalize the two samples of a pair nearly coincide; when "
             "they memorize each is a copy from its own half.</p>", table]
    fig, ax = plots.figure(1, 1, size=4.2)
    ax[0, 0].hist([result.d_ab.numpy(), np.minimum(result.d_a.numpy(), result.d_b.numpy())],
                  bins=30,
                  label=["d_ab (between the models)", "min(d_a, d_b) (to own training set)"])
    ax[0, 0].set(xlabel="distance (data units)", ylabel="pairs")
    ax[0, 0].legend(fontsize=7)
    parts.append(f"<img alt='distances' src='{_figure_uri(fig)}'>")
    a, b = np.asarray(samples_a), np.asarray(samples_b)
    if a.ndim >= 3:
        parts.append("<h2>Pairs side by side (A | B)</h2><div>")
        for i in range(min(GALLERY, a.shape[0])):
            frame = "#2e7d32" if bool(result.agree[i]) else "#ddd"
            parts.append(f"<div class='pair' style='border-color:{frame}'><img alt='A {i}' "
                         f"src='{_uri(_image_png(a[i]))}'><img alt='B {i}' "
                         f"src='{_uri(_image_png(b[i]))}'><br>pair {i}: d_ab "
                         f"{float(result.d_ab[i]):.3g}</div>")
        parts.append("</div><p>Green frame: the pair agrees.</p>")
    else:
        flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        both = np.concatenate([flat_a, flat_b])
        centre = both.mean(0)
        basis = np.linalg.svd(both - centre, full_matrices=False)[2][:2].T
        pa, pb = (flat_a - centre) @ basis, (flat_b - centre) @ basis
        fig, ax = plots.figure(1, 1, size=4.5)
        for i in range(pa.shape[0]):
            ax[0, 0].plot([pa[i, 0], pb[i, 0]], [pa[i, 1], pb[i, 1]], color="0.8", lw=0.5)
        ax[0, 0].scatter(pa[:, 0], pa[:, 1], s=8, label="model A")
        ax[0, 0].scatter(pb[:, 0], pb[:, 1], s=8, label="model B")
        ax[0, 0].legend(fontsize=7)
        ax[0, 0].set_title("both sample clouds (PCA), pairs joined", fontsize=9)
        parts.append(f"<h2>Both sample clouds</h2><img alt='clouds' src='{_figure_uri(fig)}'>")
    parts.append("<p>Files: <code>compare.json</code>, <code>per_pair.csv</code>, "
                 "<code>initial_noise.npy</code>, <code>a/samples.npy</code>, "
                 "<code>b/samples.npy</code>.</p></body></html>")
    atomic_write_bytes(folder / "index.html", "\n".join(parts).encode())



# --- the mitigation page -------------------------------------------------------------------
#: Samples shown in the mitigation gallery (memorized first, then clean).
MITIGATE_SHOWN = 8


def _plane(summary: dict[str, Any]) -> str:
    """The plane of copies against cost (:func:`diffmem.plots.mitigation_plane`) as a
    ``data:`` URI."""
    from diffmem import plots

    fig, ax = plots.figure(1, 1, size=7.5)
    plots.mitigation_plane(ax[0, 0], summary)
    fig.tight_layout()
    return _figure_uri(fig)


def write_mitigate_report(folder: Path, summary: dict[str, Any], inputs: dict[str, Any],
                          train: Any = None) -> None:
    """``mitigate.json`` and ``index.html`` (the plane of copies against cost, the runs, the
    recommended cure with the rule that chose it, and cured samples beside uncured ones and
    their nearest training item) in ``folder``; ``train`` (:class:`diffmem.audit.Rows`)
    gives the nearest items' images."""
    import numpy as np

    folder = Path(folder)
    atomic_write_json(folder / "mitigate.json", {**summary, "inputs": inputs})
    base, best = summary["baseline"], summary["recommended"]
    rows = [("uncured copies", f"{base['copy_fraction']:.3f} (all samples "
                               f"{base['copy_fraction_all']:.3f})"),
            ("memorized / clean samples (by the uncured run)",
             f"{summary['memorized']} / {summary['clean']}"),
            ("copies measured by", html.escape(summary["copy_measure"])),
            ("recommended", "none" if best is None else
             f"{best['cure']}={best['strength']:g}: copies {best['copy_fraction']:.3f}, cost "
             f"{_sig(best['cost'])}, distance ratio {_sig(best['distance_ratio'])}, "
             f"condition kept {_sig(best['condition_kept'])}, noise ratio "
             f"{_sig(best.get('noise_ratio'))}"
             + ("" if best.get("clip_score") is None else
                f", CLIP score {_sig(best['clip_score'])}")),
            ("rule", html.escape(summary["rule"])),
            ("distances measured in", html.escape(summary["units"]["distance"])),
            ("frontier", html.escape(", ".join(summary["frontier"]))),
            ("seconds (uncured run / all)",
             f"{_sig(summary['seconds']['baseline'])} / {_sig(summary['seconds']['all'])}")]
    for name, why in (summary.get("not_applicable") or {}).items():
        rows.append((f"{html.escape(name)}: not applicable", html.escape(why)))
    table = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + \
        "</table>"
    clip = base.get("clip_score") is not None
    head = ("<tr><th>cure</th><th>strength</th><th>copies</th><th>cost</th><th>distance "
            "ratio</th><th>condition kept</th>" + ("<th>CLIP score</th>" if clip else "")
            + "<th>noise ratio (cured copies)</th><th>keeps samples</th><th>seconds</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(str(r['cure']))}</td><td>{_sig(r['strength'])}</td>"
        f"<td>{r['copy_fraction']:.3f}</td><td>{_sig(r['cost'])}</td>"
        f"<td>{_sig(r['distance_ratio'])}</td><td>{_sig(r['condition_kept'])}</td>"
        + (f"<td>{_sig(r.get('clip_score'))}</td>" if clip else "")
        + f"<td>{_sig(r.get('noise_ratio'))}</td>"
        f"<td>{_cell(r.get('keeps_samples'))}</td><td>{_sig(r['seconds'])}</td></tr>"
        for r in [base, *summary["runs"]])
    search = _search_table(summary)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>diffmem mitigate"
             f"</title><style>{_STYLE}.pair{{display:inline-block;margin:4px;text-align:"
             "center;font-size:.72em;border:1px solid #ddd;padding:3px}.pair img{border:0;"
             "margin:0 1px}</style></head><body><h1>diffmem mitigate: which cure stops the "
             "model copying, and at what cost?</h1>",
             f"<p>Model <code>{html.escape(str(inputs.get('model')))}</code>, "
             f"{inputs.get('n_samples')} samples a run, every run from the same seeded noise "
             f"(seed {inputs.get('seed')}, {html.escape(str(inputs.get('sampler')))} sampler). "
             "A cure that trades copies for noise is not a cure: the cost of each run is "
             "measured beside its copies, on the samples of the conditions the uncured model "
             "does not copy.</p>", table,
             f"<h2>The plane</h2><img alt='copies against cost' src='{_plane(summary)}'>",
             f"<h2>Every run at full size</h2><table>{head}{body}</table>", search]
    samples = np.load(folder / "baseline" / "samples.npy", mmap_mode="r")
    if samples.ndim >= 3:
        parts += _mitigate_gallery(folder, summary, samples, train)
    parts.append("<p>Files: <code>mitigate.json</code> (every figure with its units); each "
                 "run's <code>samples.npy</code>, <code>initial_noise.npy</code>, "
                 "<code>sample_conditions.npy</code> in <code>baseline/</code> and "
                 "<code>runs/NAME=STRENGTH/</code>.</p></body></html>")
    atomic_write_bytes(folder / "index.html", "\n".join(parts).encode())


def _search_table(summary: dict[str, Any]) -> str:
    """The search's story per cure (strengths screened, their copies, the weakest meeting
    the target, copies that grow with the strength) and its screen estimates; empty for an
    exhaustive sweep."""
    found = summary.get("search")
    if not found:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(f['status'])}</td><td>"
        + ", ".join(f"{_sig(s)}: {c:.2f}" for s, c in zip(f["evaluated"], f["copies"],
                                                          strict=True))
        + f"</td><td>{_sig(f['weakest'])}</td><td>"
        + (html.escape(", ".join(f"{a:g} &lt; {b:g}" for a, b in f["non_monotone"]))
           or "none") + "</td></tr>"
        for name, f in found.items())
    secs = summary["seconds"]
    return ("<h2>The search</h2><p>Each cure screened on the memorized conditions with few "
            "samples (and a few clean conditions for the cost) at its strongest strength, "
            "then refined by bisection to its weakest strength meeting the target; the best "
            "candidates drawn at full size above. Screen figures are estimates from few "
            f"samples (grey crosses on the plane). Seconds: uncured run {_sig(secs['baseline'])}"
            f", screen {_sig(secs.get('screen'))}, full-size cures {_sig(secs.get('confirm'))}"
            f", all {_sig(secs['all'])}.</p><table><tr><th>cure</th><th>search</th><th>"
            "screened: strength: copies</th><th>weakest meeting the target</th><th>copies "
            f"growing with the strength</th></tr>{rows}</table>")


def _mitigate_gallery(folder: Path, summary: dict[str, Any], samples: Any,
                      train: Any) -> list[str]:
    """Samples of memorized (then clean) conditions: uncured, each cure at the strength with
    its fewest copies (the recommended run for its cure), and the uncured sample's nearest
    training item."""
    import numpy as np

    with np.load(folder / "baseline" / "measure.npz") as m:
        copy, nearest = m["copy"], m["nearest"]
    shown: dict[str, dict[str, Any]] = {}
    for r in summary["runs"]:
        cur = shown.get(r["cure"])
        if cur is None or (r["copy_fraction"], r["cost"] or 0.0) < (cur["copy_fraction"],
                                                                   cur["cost"] or 0.0):
            shown[r["cure"]] = r
    best = summary["recommended"]
    if best is not None:
        shown[best["cure"]] = best
    order = [int(i) for i in np.nonzero(copy)[0][:: max(1, int(copy.sum()) // 6 or 1)][:6]]
    order += [int(i) for i in np.nonzero(~copy.astype(bool))[0][:MITIGATE_SHOWN - len(order)]]
    cols = [("uncured", samples)] + [
        (f"{r['cure']}={r['strength']:g}", np.load(folder / r["samples"], mmap_mode="r"))
        for r in shown.values()]
    parts = ["<h2>Cured samples beside uncured ones</h2><p>Each row: one sample (same noise) "
             "uncured, with each cure at the strength that left the fewest copies, and the "
             "uncured sample's nearest training item. Rows framed red: the uncured sample is "
             "a copy.</p>"]
    for i in order:
        imgs = "".join(f"<img alt='{html.escape(name)}' title='{html.escape(name)}' "
                       f"src='{_uri(_image_png(np.asarray(arr[i])))}'>" for name, arr in cols)
        if train is not None and nearest.size:
            near = _uri(_image_png(train.take([int(nearest[i])])[0]))
            imgs += (f"<img alt='nearest training item' title='nearest training item "
                     f"{int(nearest[i])}' src='{near}'>")
        frame = "#c62828" if bool(copy[i]) else "#ddd"
        parts.append(f"<div class='pair' style='border-color:{frame}'>{imgs}<br>sample {i}: "
                     + " | ".join(html.escape(n) for n, _ in cols)
                     + (" | nearest" if train is not None and nearest.size else "")
                     + "</div>")
    return parts
