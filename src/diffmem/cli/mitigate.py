"""``diffmem mitigate``: which cure stops a model copying, and at what cost?"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer

from diffmem._checks import fail
from diffmem.cli.app import app, refuse, team_of
from diffmem.cli.inputs import parse_shape, prompt_resolution
from diffmem.cli.options import (
    DATA_SHAPE,
    FEATURES,
    MODEL,
    OUT_REQUIRED,
    Conditioning,
    Loading,
    Run,
    Sampling,
    Text,
    with_groups,
)


@app.command("mitigate")
@with_groups
def mitigate_command(
    model: str = MODEL,
    out: Path = OUT_REQUIRED,
    train: Path | None = typer.Option(  # noqa: B008
        None, "--train", help="The training set (.npy, .npz or an image folder): copies "
        "by the audit; without it, by detect's verdicts."),
    cures: str | None = typer.Option(None, "--cures", help="Comma-separated cures to try "
                                     "(default: every one that applies to the model)."),
    strengths: list[str] = typer.Option(  # noqa: B008
        [], "--strengths", help="NAME=a,b,c: the strengths tried for a cure (repeatable; "
        "default: each cure's own grid)."),
    combine: list[str] = typer.Option(  # noqa: B008
        [], "--combine", help="A=a+B: cures applied together, the last tried over its grid "
        "(repeatable), e.g. guidance-schedule=0.6+nn-guidance."),
    target: float = typer.Option(0.1, "--target", help="Copies a recommended cure must not "
                                 "exceed (fraction of the memorized conditions' samples)."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Draw every cure at every "
                                    "strength of its grid at full size, instead of searching "
                                    "(screen, refine, confirm) for the cheapest that meets "
                                    "--target."),
    n_samples: int = typer.Option(256, "--n-samples", help="Samples per run."),
    features: Path | None = FEATURES,
    sampling: Sampling = None,  # type: ignore[assignment]
    conditions: Path | None = typer.Option(  # noqa: B008
        None, "--conditions", help="Conditions to sample a conditional --model at (.npy; "
        "default: each distinct --train-cond)."),
    conditioning: Conditioning = None,  # type: ignore[assignment]
    data_shape: str | None = DATA_SHAPE,
    loading: Loading = None,  # type: ignore[assignment]
    text: Text = None,  # type: ignore[assignment]
    how: Run = None,  # type: ignore[assignment]
) -> None:
    """Which cure stops the model copying, and at what cost? Sample the model uncured; screen
    every applicable cure on its memorized conditions with few samples, refine each cure
    that can win to its weakest strength under --target, and draw the best candidates at
    full size from the same seeded noise as the uncured run (--exhaustive: every strength of
    every grid at full size); measure each run's copies and its cost (how far the samples of
    the conditions that did not copy move); recommend the cheapest full-size run under
    --target. Writes OUT/mitigate.json and OUT/index.html (the plane of copies against
    cost); resumable."""
    from diffmem.audit import Rows
    from diffmem.centres import Centres
    from diffmem.experiments.base import FolderLock, prepare_out
    from diffmem.mitigate.search import search
    from diffmem.mitigate.sweep import measure_space, sweep
    from diffmem.report import write_mitigate_report

    try:
        team, device = team_of(how.device, locals())
        plan, data, tcond, ctx, runs, skipped = _plan(
            model, train, target, n_samples, sampling, conditions, conditioning, data_shape,
            loading, text, how.seed, device, cures, strengths, combine)
        space = measure_space(features, plan.prompts, device)
        folder = prepare_out(out)
        with FolderLock(folder) if team.leader else contextlib.nullcontext():
            summary = (sweep if exhaustive else search)(
                plan, runs, folder, train=data, train_cond=tcond, ctx=ctx, target=target,
                device=device, progress=how.progress, team=team, space=space)
            summary["not_applicable"] = skipped
            if not team.leader:
                return
            write_mitigate_report(folder, summary, {
                "model": model, "train": None if train is None else str(train),
                "prompts": None if text.prompts is None else str(text.prompts),
                "prompt_texts": plan.prompts, "sampler": sampling.sampler,
                "steps": sampling.steps,
                "features": None if features is None else str(features),
                "seed": how.seed, "n_samples": plan.n},
                train=None if data is None else Rows(Centres(data)))
    except ValueError as err:
        refuse(str(err))
        return
    _echo_mitigate(summary, target, folder)


def _plan(model: str, train: Path | None, target: float, n_samples: int, sampling: Sampling,
          conditions: Path | None, conditioning: Conditioning, data_shape: str | None,
          loading: Loading, text: Text, seed: int, device: str, cures: str | None,
          strengths: list[str], combine: list[str]) -> tuple[Any, ...]:
    """Everything checked before anything is drawn: the plan of the uncured draws, the
    training set and its conditions, the cures' context, the runs and the cures left out
    (with why)."""
    from diffmem.audit import open_input
    from diffmem.audit.model import load_train_cond, plan_draw, training_shape
    from diffmem.mitigate import CURES, cure_context
    from diffmem.mitigate.sweep import plan_cures

    options = text.options()
    size = prompt_resolution(model, text.prompts, None, options)
    data = None if train is None else open_input(train, None, size if train.is_dir()
                                                 else None, "--train")
    if not 0 < target < 1:
        raise fail("--target", "a copy fraction in (0, 1)", target)
    if conditioning.train_cond is not None and data is None:
        raise fail("--train-cond", "--train (the items they condition)",
                   str(conditioning.train_cond))
    tcond = None if data is None else load_train_cond(conditioning.train_cond, data)
    plan = plan_draw(
        model, training_shape(data) if data is not None else parse_shape(data_shape),
        n_samples=n_samples, train_cond=tcond, conditions=conditions,
        per_condition=conditioning.per_condition, guidance=conditioning.guidance,
        null_cond=conditioning.null_cond, sampler=sampling.sampler, steps=sampling.steps,
        seed=seed, scheduler_class=sampling.scheduler_class, eta=sampling.eta,
        scheduler=loading.scheduler_path, schedule=loading.schedule, kind=loading.model_kind,
        index=loading.model_index, device=device, prompts=text.prompts, text_options=options,
        batch_size=sampling.batch_size)
    names = None if cures is None else [n.strip() for n in cures.split(",") if n.strip()]
    ctx = cure_context(plan.model, plan.null, data, tcond, search=names is None or any(
        CURES[n].searches for n in [*names, *_chained(combine)] if n in CURES))
    runs, skipped = plan_cures(plan.model, ctx, names, _strength_grids(strengths), combine)
    return plan, data, tcond, ctx, runs, skipped


def _echo_mitigate(summary: dict[str, Any], target: float, folder: Path) -> None:
    """The command's summary: the runs drawn, the uncured copies, the recommendation."""
    best = summary["recommended"]
    base = summary["baseline"]
    screened = f" ({len(summary['screen'])} screened)" if summary.get("screen") else ""
    typer.echo(f"{len(summary['runs'])} cured runs at full size{screened}; uncured copies "
               f"{base['copy_fraction']:.3f}"
               + (f"; recommended {best['cure']}={best['strength']:g}: copies "
                  f"{best['copy_fraction']:.3f}, cost {best['cost']:.4g}" if best else
                  f"; no cure brings the copies to {target:g} while keeping the samples")
               + f"\n      -> {folder / 'mitigate.json'}, {folder / 'index.html'}")


def _chained(combine: list[str]) -> list[str]:
    """The cure names of ``--combine`` chains (``A=a+B``: ``A`` and ``B``)."""
    return [part.partition("=")[0].strip() for chain in combine for part in chain.split("+")]


def _strength_grids(items: list[str]) -> dict[str, list[float]]:
    """``--strengths NAME=a,b,c`` as ``{NAME: [a, b, c]}``."""
    grids: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        try:
            grids[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError as err:
            raise fail("--strengths", "NAME=a,b,c with numbers", repr(item)) from err
        if not sep or not grids[name.strip()]:
            raise fail("--strengths", "NAME=a,b,c with at least one number", repr(item))
    return grids
