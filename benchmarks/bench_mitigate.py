"""``diffmem mitigate``'s search against one audit and against the exhaustive grid, side by side
in one run (CI does not run this).

    python benchmarks/bench_mitigate.py                         # every model, quick settings
    python benchmarks/bench_mitigate.py --models digits --settings full
    python benchmarks/bench_mitigate.py --skip-exhaustive       # the search and the audit only

Models, trained here once and cached in ``--cache`` as folders the CLI loads:

* ``digits``: ``mitigate-digits``' class-conditional UNet (its data and training, ``--settings``
  quick or full), its distinct training images and labels;
* ``captions``: ``mitigate-captions``' tiny text-to-image pipeline (30 captions, three of them
  one duplicated picture), against the training pictures as its VAE renders them;
* ``example``: ``examples/memorize_captions.py``'s pipeline (24 captions), likewise.

For each model, three commands run as a user types them (CLI defaults but the sampler, its
steps and ``--per-condition``), each into a fresh folder: ``diffmem audit --model`` (one
audit: draw and audit every condition), ``diffmem mitigate`` (the search) and ``diffmem
mitigate --exhaustive`` (every applicable cure over its grid at full size). Prints each
one's wall time, the ratios to the audit (target for the search: <= 5), the full-size runs
and screen points each drew, and each recommendation with its copies and cost; the search's
recommendation should be the grid's or dominate it (copies <= target, cost no higher).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "diffmem"]


def _key(params: dict[str, Any]) -> str:
    """A short digest of an experiment's parameters: a cached model trained with other
    settings is not reused."""
    from diffmem.training import fingerprint

    return fingerprint(dict(params))[:10]


def digits(cache: Path, settings: str) -> list[str]:
    """``mitigate-digits``' model saved as a diffusers folder; the CLI arguments."""
    from diffmem.experiments import get_experiment
    from diffmem.experiments.base import Context, resolve_params
    from diffmem.experiments.detection import MODELS, _conditional_data, _dedupe
    from diffmem.experiments.regularize import train_run

    exp = get_experiment("mitigate-digits")
    p = resolve_params(exp, quick=settings == "quick")
    folder = cache / f"digits_{settings}_{_key(p)}"
    net = folder / "net"
    if not (net / "config.json").is_file():
        ctx = Context(name=exp.name, params=p, out=folder, device=torch.device("cpu"),
                      seed=0, progress=True, resume=True)
        train, labels, _ = _conditional_data(p)
        run = train_run(ctx, p["model"], train, 0.0, labels=labels, p_uncond=p["p_uncond"],
                        scheduler=MODELS[p["model"]], seed=0)
        run["model"].save_pretrained(net)
        run["scheduler"].save_pretrained(net)
        distinct, dlabels = _dedupe(train, labels)
        np.save(folder / "train.npy", distinct.numpy())
        np.save(folder / "labels.npy", dlabels.numpy())
        (folder / "null.txt").write_text(str(run["null"]))
    return ["--model", str(net), "--scheduler", str(net), "--train", str(folder / "train.npy"),
            "--train-cond", str(folder / "labels.npy"), "--null-cond",
            (folder / "null.txt").read_text(), "--sampler", "pipeline", "--scheduler-class",
            "DDIMScheduler", "--steps", str(p["sample_steps"]), "--per-condition",
            str(p["per_condition"])]


def captions(cache: Path, settings: str) -> list[str]:
    """``mitigate-captions``' pipeline, prompts and rendered training pictures; the CLI
    arguments."""
    from diffmem.experiments import get_experiment
    from diffmem.experiments.base import Context, resolve_params
    from diffmem.experiments.captions import _train, caption_data, write_prompts

    exp = get_experiment("mitigate-captions")
    p = resolve_params(exp, quick=settings == "quick")
    folder = cache / f"captions_{settings}_{_key(p)}"
    if not (folder / "train.npy").is_file():
        ctx = Context(name=exp.name, params=p, out=folder, device=torch.device("cpu"),
                      seed=0, progress=True, resume=True)
        data = caption_data(p["copies"], p["variants"], 0, p["colours"])
        folder.mkdir(parents=True, exist_ok=True)
        write_prompts(folder / "prompts.jsonl", data)
        trained = _train(ctx, data)
        np.save(folder / "train.npy", trained["rendered"].numpy())
        np.save(folder / "train_cond.npy", data.row_prompt)
    return ["--model", str(folder / "pipeline"), "--prompts", str(folder / "prompts.jsonl"),
            "--train", str(folder / "train.npy"), "--train-cond",
            str(folder / "train_cond.npy"), "--sampler", "pipeline", "--steps",
            str(p["sample_steps"]), "--per-condition", str(p["per_prompt"])]


def example(cache: Path, settings: str) -> list[str]:
    """``examples/memorize_captions.py``'s pipeline (run once); the CLI arguments."""
    out = cache / "example"
    if not (out / "data" / "train_vae.npy").is_file():
        subprocess.run([sys.executable, str(ROOT / "examples" / "memorize_captions.py"),
                        "--out", str(out)], check=True)
    return ["--model", str(out / "run" / "pipeline"), "--prompts",
            str(out / "data" / "prompts.jsonl"), "--train", str(out / "data" / "train_vae.npy"),
            "--train-cond", str(out / "data" / "train_cond.npy"), "--sampler", "pipeline",
            "--steps", "25", "--per-condition", "8"]


def timed(command: list[str], out: Path) -> float:
    """Seconds ``diffmem COMMAND`` takes into a fresh ``out``."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    res = subprocess.run(CLI + command + ["--out", str(out), "--no-progress"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - start


def _best(doc: dict[str, Any]) -> str:
    best = doc["recommended"]
    return "none" if best is None else (f"{best['cure']}={best['strength']:g} (copies "
                                        f"{best['copy_fraction']:.3f}, cost {best['cost']:.3g})")


def bench(name: str, args: list[str], work: Path, exhaustive: bool) -> None:
    """The three commands on one model, and the comparison."""
    audit_s = timed(["audit", *args], work / name / "audit")
    search_s = timed(["mitigate", *args], work / name / "search")
    found = json.loads((work / name / "search" / "mitigate.json").read_text())
    print(f"\n{name}: audit --model {audit_s:.1f} s; mitigate (search) {search_s:.1f} s = "
          f"{search_s / audit_s:.2f}x the audit (target <= 5): {len(found['runs'])} full-size "
          f"runs, {len(found.get('screen') or [])} screen points; uncured copies "
          f"{found['baseline']['copy_fraction']:.3f}; recommended {_best(found)}")
    for fam, r in (found.get("search") or {}).items():
        print(f"    {fam}: {r['status']}; screened {r['evaluated']} -> copies "
              f"{[round(c, 3) for c in r['copies']]}; non-monotone {r['non_monotone']}")
    if not exhaustive:
        return
    grid_s = timed(["mitigate", *args, "--exhaustive"], work / name / "grid")
    grid = json.loads((work / name / "grid" / "mitigate.json").read_text())
    a, b = found["recommended"], grid["recommended"]
    same = a is not None and b is not None and (a["cure"], a["strength"]) == (b["cure"],
                                                                              b["strength"])
    dominates = (a is not None and a["copy_fraction"] <= found["target"] and (
        b is None or a["cost"] <= b["cost"])) or (
        a is None and found["memorized"] == 0)  # nothing to cure: the uncured model itself
    print(f"  exhaustive {grid_s:.1f} s = {grid_s / audit_s:.2f}x the audit, "
          f"{len(grid['runs'])} full-size runs; recommended {_best(grid)}; the search's is "
          + ("the same run" if same else "the uncured model (nothing to cure)"
             if a is None and dominates else "one that dominates it" if dominates else
             "neither the grid's nor one that dominates it"
             if b is not None else "(the grid recommends none)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,captions,example")
    parser.add_argument("--settings", choices=["quick", "full"], default="quick")
    parser.add_argument("--cache", type=Path, default=Path(".bench_cache") / "mitigate")
    parser.add_argument("--skip-exhaustive", action="store_true")
    args = parser.parse_args()
    makers = {"digits": digits, "captions": captions, "example": example}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; settings "
          f"{args.settings}")
    for name in args.models.split(","):
        model_args = makers[name](args.cache, args.settings)
        bench(name, model_args, args.cache / "runs" / args.settings, not args.skip_exhaustive)


if __name__ == "__main__":
    main()
