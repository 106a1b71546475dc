"""``diffmem compare``: the two-model test."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from diffmem.cli.app import app, refuse, team_of
from diffmem.cli.inputs import prompt_resolution
from diffmem.cli.options import (
    BATCH_SIZE,
    BOOTSTRAP,
    MODEL_KIND,
    OUT_REQUIRED,
    SCHEDULE,
    SCHEDULER,
    Run,
    Text,
    with_groups,
)


@app.command("compare")
@with_groups
def compare_command(
    model_a: str = typer.Option(..., "--model-a", help="Model trained on --train-a."),
    model_b: str = typer.Option(..., "--model-b", help="Model trained on --train-b."),
    train_a: Path = typer.Option(..., "--train-a", help="Training set of model A."),  # noqa: B008
    train_b: Path = typer.Option(..., "--train-b", help="Training set of model B."),  # noqa: B008
    out: Path = OUT_REQUIRED,
    n_samples: int = typer.Option(200, "--n-samples", help="Pairs to draw."),
    batch_size: int = BATCH_SIZE,
    sampler: str = typer.Option("ode", "--sampler", help="ode, edm or pipeline."),
    steps: int = typer.Option(18, "--steps", help="Steps of the edm or pipeline sampler."),
    scheduler: Path | None = SCHEDULER,
    schedule: str = SCHEDULE,
    model_kind: str = MODEL_KIND,
    bootstrap: int = BOOTSTRAP,
    text: Text = None,  # type: ignore[assignment]
    how: Run = None,  # type: ignore[assignment]
) -> None:
    """The two-model test: models trained on disjoint halves, sampled from the same noise
    (and, with --prompts, the same prompts); the fraction of pairs closer to each other than
    to either training set ("agreement"). Writes OUT/compare.json, OUT/per_pair.csv and
    OUT/index.html."""
    import numpy as np

    from diffmem.audit import open_input
    from diffmem.audit.compare import compare, plan_pair
    from diffmem.experiments.base import FolderLock, prepare_out
    from diffmem.report import write_compare_report

    try:
        team, device = team_of(how.device, locals())
        options = text.options()
        size_a = prompt_resolution(model_a, text.prompts, None, options)
        ta, tb = (open_input(t, None, size_a if t.is_dir() else None, name)
                  for t, name in ((train_a, "--train-a"), (train_b, "--train-b")))
        prompted = {} if text.prompts is None else {"prompts": text.prompts,
                                                    "text_options": options}
        plans = plan_pair(model_a, model_b, ta, tb, n_samples=n_samples, device=device,
                          sampler=sampler, steps=steps, seed=how.seed, kind=model_kind,
                          schedule=schedule,
                          scheduler=None if scheduler is None else str(scheduler),
                          batch_size=batch_size, **prompted)
        folder = prepare_out(out)
        with FolderLock(folder) if team.leader else contextlib.nullcontext():
            result = compare(plans, ta, tb, folder, bootstrap=bootstrap,
                             progress=how.progress, device=device, team=team)
            if team.leader:
                write_compare_report(folder, result, np.load(folder / "a" / "samples.npy"),
                                     np.load(folder / "b" / "samples.npy"),
                                     {"model_a": model_a, "model_b": model_b,
                                      "train_a": str(train_a), "train_b": str(train_b),
                                      "sampler": sampler, "seed": how.seed})
    except ValueError as err:
        refuse(str(err))
        return
    if not team.leader:
        return
    s = result.to_json()
    typer.echo(f"{s['n_pairs']} pairs: agreement {s['agreement']:.3f} "
               f"[{s['agreement_ci'][0]:.3f}, {s['agreement_ci'][1]:.3f}], copies A "
               f"{s['copied_a']:.3f}, B {s['copied_b']:.3f}; median d_ab {s['median_d_ab']:.4g}"
               f"\n      -> {folder / 'compare.json'}, {folder / 'per_pair.csv'}, "
               f"{folder / 'index.html'}")
