"""Prompt files as the field publishes them, read with their memorization labels.

``--prompts`` takes:

* plain lists: one prompt a line (``.txt`` or any other suffix; blank lines skipped), as
  Ren et al. and Jeon et al. publish theirs (``sd1_mem.txt``, ``sd1_nmem.txt``);
* JSON lines (``.jsonl``, or every non-blank line starting with ``{``): Wen et al.'s
  ``sdv1_500_memorized.jsonl`` (``caption``, ``index``, ``url``) and diffmem's own
  (``prompt``, ``label``);
* CSV (``.csv``, ``.tsv``): MemBench's tables (the ``prompt`` column, or ``Prompt``,
  ``caption``, ``text``);
* Parquet (``.parquet``, with ``pyarrow``: ``pip install 'diffmem[prompts]'``): Webster et
  al.'s ground-truth files (``caption``, ``overfit_type``);
* a JSON array (``.json``) of prompts or of records like the JSON lines'.

The prompt column is the first of :data:`PROMPT_COLUMNS` present (any letter case). The
label column, when there is one, is the first of :data:`LABEL_COLUMNS`: each value must be
one that :data:`MEMORIZED` or :data:`NOT_MEMORIZED` names (Webster's ``overfit_type``
``MV``, ``RV``, ``TV`` (matching, retrieval or template verbatim) memorized and ``N`` not;
``1``/``0``, ``true``/``false``, ``memorized``/``not memorized``), so that the labels become
``detect``'s ``--labels`` (1 memorized, 0 not) without a separate file. A row without a label
is unlabelled. Wen's and MemBench's files hold memorized prompts only and carry no label
column: give the prompts known not to be memorized as ``detect --reference``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem._checks import fail

#: Columns a prompt is read from, in order of preference (letter case ignored).
PROMPT_COLUMNS = ("prompt", "caption", "text", "prompts", "captions")
#: Columns a memorization label is read from, in order of preference.
LABEL_COLUMNS = ("label", "memorized", "overfit_type", "is_memorized", "mem")
#: Label values meaning memorized, and not memorized (letter case and spaces ignored).
MEMORIZED = ("1", "true", "yes", "memorized", "mem", "mv", "rv", "tv")
NOT_MEMORIZED = ("0", "false", "no", "not memorized", "not_memorized", "nonmem", "nmem", "n",
                 "none")


@dataclass
class Prompts:
    """Prompts read from a file: their ``texts``, each one's label as written (``labels``,
    ``None`` where unlabelled) and, where labelled, whether it is memorized (``memorized``:
    1, 0 or ``None``)."""

    texts: list[str]
    labels: list[str | None] = field(default_factory=list)
    memorized: list[int | None] = field(default_factory=list)

    def marks(self) -> list[int] | None:
        """``detect``'s labels: 1 memorized, 0 not, -1 unlabelled (``None`` when no prompt
        is labelled)."""
        if not any(m is not None for m in self.memorized):
            return None
        return [-1 if m is None else m for m in self.memorized]


def _column(found: list[str], wanted: tuple[str, ...]) -> str | None:
    """The first of ``wanted`` among the columns ``found`` (letter case ignored)."""
    lower = {c.lower(): c for c in found}
    return next((lower[w] for w in wanted if w in lower), None)


def memorized_value(value: Any) -> int | None:
    """A label as 1 (memorized), 0 (not) or ``None`` (missing); ``ValueError`` for a value
    neither list names."""
    if value is None or (isinstance(value, float) and value != value):  # missing, or NaN
        return None
    text = str(value).strip().lower()
    if text == "":
        return None
    if text in MEMORIZED:
        return 1
    if text in NOT_MEMORIZED:
        return 0
    raise ValueError(text)


def _from_records(records: list[dict[str, Any]], where: str, option: str) -> Prompts:
    """Prompts from table rows (dicts), the prompt and label columns found by name."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    prompt = _column(columns, PROMPT_COLUMNS)
    if prompt is None:
        raise fail(option, f"a column of prompts named one of {PROMPT_COLUMNS}",
                   f"{where}: columns {columns}")
    label = _column(columns, LABEL_COLUMNS)
    texts: list[str] = []
    labels: list[str | None] = []
    memorized: list[int | None] = []
    unknown: list[str] = []
    for number, row in enumerate(records, 1):
        text = row.get(prompt)
        if not isinstance(text, str) or not text.strip():
            raise fail(option, f"a prompt in column {prompt!r} of every row",
                       f"{where}, row {number}: {str(row)[:80]}")
        value = None if label is None else row.get(label)
        try:
            memorized.append(memorized_value(value))
        except ValueError:
            unknown.append(str(value))
            memorized.append(None)
        texts.append(text)
        labels.append(None if memorized[-1] is None else str(value))
    if unknown:
        shown = sorted(set(unknown))
        raise fail(option, f"labels in column {label!r} meaning memorized "
                   f"{MEMORIZED} or not {NOT_MEMORIZED}",
                   f"{where}: unknown values {shown[:10]}")
    return Prompts(texts, labels, memorized)


def _json_lines(lines: list[tuple[int, str]], where: str,
                option: str) -> list[dict[str, Any]]:
    records = []
    first: str | None = None
    for number, line in lines:
        try:
            item = json.loads(line)
        except ValueError as err:
            raise fail(option, "JSON lines with a prompt", f"{where}, line {number}: "
                       f"{err}") from err
        if not isinstance(item, dict):
            raise fail(option, "JSON lines of objects", f"{where}, line {number}: "
                       f"{line[:80]}")
        first = first or _column(list(item), PROMPT_COLUMNS)
        if first is None or not isinstance(item.get(first), str):
            raise fail(option, f"JSON lines with a prompt string (one of "
                       f"{PROMPT_COLUMNS})", f"{where}, line {number}: {line[:80]}")
        records.append(item)
    return records


def _parquet(p: Path, option: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise fail(option, "pyarrow installed to read Parquet (pip install "
                   "'diffmem[prompts]')", str(p)) from err
    try:
        return pq.read_table(p).to_pylist()
    except Exception as err:  # pyarrow's own errors: a damaged or foreign file
        raise fail(option, "a readable Parquet file", f"{p} ({type(err).__name__}: "
                   f"{str(err).splitlines()[0][:200] if str(err) else ''})") from err


def read_prompts(path: str | Path, option: str = "--prompts") -> Prompts:
    """``--prompts`` in any of the module's formats, with labels where the file has them.
    Raises ``ValueError`` naming ``option`` (the command's option that gave the file) and
    the line or the columns found, on an empty file, a table without a prompt column, a row
    without a prompt or a label value that is not known."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        if not p.is_file():
            raise fail(option, "an existing Parquet file", str(p))
        records = _parquet(p, option)
        if not records:
            raise fail(option, "at least one prompt", f"{p}: an empty table")
        return _from_records(records, str(p), option)
    try:
        raw = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise fail(option, "a readable UTF-8 text file of prompts", f"{p} ({err})") from err
    lines = [(i + 1, line.strip()) for i, line in enumerate(raw.splitlines()) if line.strip()]
    if not lines:
        raise fail(option, "at least one prompt (one a line, JSON lines, CSV or Parquet)",
                   f"{p}: an empty file")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        return _from_records([dict(r) for r in reader], str(p), option)
    if suffix == ".json":
        try:
            items = json.loads(raw)
        except ValueError as err:
            raise fail(option, "a JSON array of prompts", f"{p} ({err})") from err
        if not isinstance(items, list) or not items:
            raise fail(option, "a non-empty JSON array of prompts", f"{p}")
        return _from_records([{"prompt": i} if isinstance(i, str) else i for i in items
                              if isinstance(i, str | dict)] or [{}], str(p), option)
    if suffix == ".jsonl" or all(line.startswith("{") for _, line in lines):
        return _from_records(_json_lines(lines, str(p), option), str(p), option)
    texts = [line for _, line in lines]
    return Prompts(texts, [None] * len(texts), [None] * len(texts))
