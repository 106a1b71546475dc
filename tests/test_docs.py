"""The docs state what holds now: every figure they cite is in ``docs/figures.json`` with its
page, exact text, date, machine, command and the code it describes, the page carries it, and
that code has not changed since it was measured (``benchmarks/figures.py``). And README keeps
its two commands at the top: what diffmem does in at most 80 words, then the commands within
its first 40 lines, the test command the one ``.ci/run`` runs."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _figures():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" /
                                                  "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_cited_figure_is_current_and_on_its_page():
    figures = _figures()
    doc = figures.load()
    assert doc["figures"], "no figure registered"
    ids = [f["id"] for f in doc["figures"]]
    assert len(ids) == len(set(ids)), "a figure id given twice"
    wrong = {f["id"]: figures.problems(f) for f in doc["figures"]}
    assert {k: v for k, v in wrong.items() if v} == {}
    dates = {f["measured"] for f in doc["figures"]}
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", d) for d in dates)


def test_the_check_catches_a_stale_or_missing_figure(tmp_path):
    """A figure whose code changed, or whose text left its page, is reported."""
    figures = _figures()
    fig = dict(figures.load()["figures"][0])
    assert figures.problems(fig) == []
    assert any("stale" in p for p in figures.problems({**fig, "digest": "0" * 20}))
    assert any("is not in" in p for p in figures.problems({**fig, "text": "4.99x nowhere"}))
    assert figures.problems({**fig, "machine": ""}) == ["no machine"]


def test_readme_opens_with_what_diffmem_does_then_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("## "))
    intro = " ".join(line for line in lines[1:first] if not line.startswith("#"))
    assert len(intro.split()) <= 80, len(intro.split())
    head = "\n".join(lines[:40])
    assert "diffmem reproduce --quick" in head
    test_command = re.search(r"python -m pytest[^\n`]*", (ROOT / ".ci" / "run").read_text())
    assert test_command and test_command.group(0) in head
