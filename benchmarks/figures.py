"""The figures the docs cite, kept in ``docs/figures.json`` (CI does not run this script; its
test, ``tests/test_docs.py``, does the checks).

    python benchmarks/figures.py                     # every figure, its page, date and state
    python benchmarks/figures.py --stale             # only those whose code changed since
    python benchmarks/figures.py --record ID --text "4.46x" --date 2026-12-07 \\
        --machine "2-core AMD EPYC, AVX2"            # after re-measuring ID with its command

Each figure names the page that cites it, its exact text there, when and on which machine
it was measured, the command that measures it and the source files it describes. The test
fails when a figure's text is missing from its page (the page was edited, or the figure
re-measured and the page not updated) and when a file it describes changed after it was
measured (its digest, recorded here): re-measure it with its command, update the page and
``--record`` it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "docs" / "figures.json"


def digest(paths: list[str]) -> str:
    """A digest of the files ``paths`` (relative to the project root, in order)."""
    h = hashlib.blake2b(digest_size=10)
    for rel in paths:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()


def load() -> dict[str, Any]:
    return json.loads(REGISTRY.read_text())


def problems(figure: dict[str, Any]) -> list[str]:
    """What is wrong with one figure (nothing: an empty list)."""
    out = []
    for key in ("id", "page", "text", "measured", "machine", "command", "code", "digest"):
        if not figure.get(key):
            out.append(f"no {key}")
    if out:
        return out
    page = ROOT / figure["page"]
    if not page.is_file():
        return [f"its page {figure['page']} is missing"]
    if figure["text"] not in page.read_text():
        out.append(f"its text {figure['text']!r} is not in {figure['page']}")
    missing = [p for p in figure["code"] if not (ROOT / p).is_file()]
    if missing:
        out.append(f"the code it describes is missing: {', '.join(missing)}")
    elif digest(figure["code"]) != figure["digest"]:
        out.append(f"stale: {', '.join(figure['code'])} changed after it was measured on "
                   f"{figure['measured']}; re-measure with `{figure['command']}`, update "
                   f"{figure['page']} and record it (benchmarks/figures.py --record)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stale", action="store_true")
    parser.add_argument("--record")
    parser.add_argument("--text")
    parser.add_argument("--date")
    parser.add_argument("--machine")
    args = parser.parse_args()
    doc = load()
    if args.record:
        found = [f for f in doc["figures"] if f["id"] == args.record]
        if not found:
            raise SystemExit(f"--record: expected a figure id of {REGISTRY}, received "
                             f"{args.record!r}")
        fig = found[0]
        for key in ("text", "date", "machine"):
            if getattr(args, key):
                fig["measured" if key == "date" else key] = getattr(args, key)
        fig["digest"] = digest(fig["code"])
        REGISTRY.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"recorded {args.record}: {fig['text']!r}, {fig['measured']}")
        return
    for fig in doc["figures"]:
        wrong = problems(fig)
        if args.stale and not wrong:
            continue
        state = "; ".join(wrong) if wrong else "current"
        print(f"{fig['id']:<40} {fig['measured']}  {fig['page']:<22} {fig['text']!r}: {state}")


if __name__ == "__main__":
    main()
