"""``diffmem audit``: do these samples (or a model's) copy the training set?"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from diffmem._checks import fail, positive
from diffmem.cli.app import app, leader, refuse, team_of
from diffmem.cli.inputs import cured_plan, parse_size, prompt_resolution, prompt_settings
from diffmem.cli.options import (
    BOOTSTRAP,
    CURE,
    FEATURES,
    MODEL_DRAW,
    OUT_REQUIRED,
    Conditioning,
    Loading,
    Run,
    Sampling,
    Text,
    with_groups,
)
from diffmem.parallel import Team


@app.command("audit")
@with_groups
def audit_command(
    samples: Path | None = typer.Argument(  # noqa: B008
        None, help="Samples: a .npy file (memory-mapped), a .npz archive (--key) or a "
                   "folder of PNG/JPEG images (or --model to draw them)."),
    train: list[Path] = typer.Option(  # noqa: B008
        ..., "--train", help="Training set, in the same forms (repeat for .npy shards)."),
    out: Path = OUT_REQUIRED,
    delta: list[float] = typer.Option(  # noqa: B008
        [], "--delta", help="Tolerance of the paper's metric, in data (or feature) units; "
                            "repeatable (default 0.01, 0.1, 1)."),
    key: str | None = typer.Option(None, "--key", help="Array of a SAMPLES .npz archive."),
    train_key: str | None = typer.Option(None, "--train-key",
                                         help="Array of a TRAIN .npz archive."),
    resize: str | None = typer.Option(None, "--resize",
                                      help="H,W: resample images of mixed sizes."),
    features: Path | None = FEATURES,
    index: str = typer.Option("exact", "--index", help="exact, faiss-flat or faiss-ivf."),
    ratio_threshold: float = typer.Option(1 / 3, "--ratio-threshold",
                                          help="Copies by d1/d2 below this."),
    calibrated_threshold: float = typer.Option(
        0.5, "--calibrated-threshold", help="Copies by Carlini et al.'s calibrated distance "
                                            "below this."),
    bootstrap: int = BOOTSTRAP,
    model: str | None = MODEL_DRAW,
    n_samples: int = typer.Option(1000, "--n-samples", help="Samples to draw with --model."),
    sampling: Sampling = None,  # type: ignore[assignment]
    conditions: Path | None = typer.Option(  # noqa: B008
        None, "--conditions", help="Conditions to sample a conditional --model at (.npy; "
        "embeddings (n, seq, dim) for a cross-attention UNet; default: each distinct "
        "--train-cond), or with SAMPLES the condition of each sample."),
    conditioning: Conditioning = None,  # type: ignore[assignment]
    cure: list[str] = CURE,
    cond_bandwidth: float | None = typer.Option(
        None, "--cond-bandwidth", help="Kernel width in y of the conditional empirical "
                                       "denoiser for vector conditions (default: exact)."),
    loading: Loading = None,  # type: ignore[assignment]
    held_out: Path | None = typer.Option(  # noqa: B008
        None, "--held-out", help="Held-out data for the denoiser comparison of --model."),
    text: Text = None,  # type: ignore[assignment]
    how: Run = None,  # type: ignore[assignment]
) -> None:
    """Audit SAMPLES (or samples drawn from --model) against a training set: nearest
    training items, the paper's fraction within delta, nn-ratio and calibrated-l2 copies,
    exact matches (binary images), duplicates; writes OUT/audit.json, OUT/per_sample.csv and
    OUT/index.html. With --model, also OUT/samples.npy (resumable: samples already drawn are
    kept) and OUT/denoiser_gap.json, how far the model's denoiser is from the memorizing
    empirical one at each noise level."""
    from diffmem.experiments.base import prepare_out

    try:
        team, device = team_of(how.device, locals())
        given = _read(samples, model, train, train_key, resize, delta, text,
                      conditioning.train_cond)
        plan, held = _plan(given, model, n_samples, sampling, conditions, conditioning,
                           loading, text, cure, how.seed, device, held_out)
        folder = prepare_out(out)
        found = _audit(given, plan, held, samples, key, conditions, folder, team, device, how,
                       cond_bandwidth, features, index, ratio_threshold, calibrated_threshold,
                       bootstrap)
        if found is None:
            return
        result, gap, drawn, sample_data = found
        if team.leader:
            _write(folder, result, given, sample_data, {
                "samples": str(folder / "samples.npy" if plan is not None else samples),
                "train": [str(t) for t in train], "model": model,
                "sampler": sampling.sampler if model else None,
                "features": None if features is None else str(features),
                "train_cond": None if conditioning.train_cond is None
                else str(conditioning.train_cond),
                "conditions": None if conditions is None else str(conditions),
                "guidance": conditioning.guidance, "cures": list(cure),
                **prompt_settings(plan, text.prompts, given.train_size), "seed": how.seed},
                   gap, drawn)
    except ValueError as err:  # the library's and the command line's input errors
        refuse(str(err))
        return
    if team.leader:
        _echo_audit(result, gap, folder)


@dataclass
class _Given:
    """The audit's inputs, read and checked: the tolerances, the image size, the training
    set (one, or several .npy shards) at the size it is read, its conditions and the
    prompts' pipeline options."""

    deltas: list[float]
    size: tuple[int, int] | None
    train_size: tuple[int, int] | None
    whole: Any
    tcond: Any
    text: Any


def _read(samples: Path | None, model: str | None, train: list[Path], train_key: str | None,
          resize: str | None, delta: list[float], text: Text, train_cond: Path | None) -> _Given:
    """Read and check everything the audit is given but the model (errors name their
    option)."""
    from diffmem.audit import DEFAULT_DELTAS, open_input
    from diffmem.audit.model import load_train_cond

    deltas = [positive("--delta", d) for d in delta] or list(DEFAULT_DELTAS)
    size = parse_size(resize)
    if (samples is None) == (model is None):
        raise fail("SAMPLES", "samples or --model (one of them)",
                   "neither" if samples is None else "both")
    options = text.options()
    train_size = prompt_resolution(model, text.prompts, size, options)
    train_data = [open_input(t, train_key, train_size if Path(t).is_dir() else size,
                             "--train") for t in train]
    if len(train_data) > 1 and not all(isinstance(t, str) for t in train_data):
        raise fail("--train", "one data set, or several .npy shards", [str(t) for t in train])
    whole = train_data if len(train_data) > 1 else train_data[0]
    return _Given(deltas, size, train_size, whole, load_train_cond(train_cond, whole), options)


def _plan(given: _Given, model: str | None, n_samples: int, sampling: Sampling,
          conditions: Path | None, conditioning: Conditioning, loading: Loading, text: Text,
          cure: list[str], seed: int, device: str, held_out: Path | None) -> tuple[Any, Any]:
    """The model's draw, every option checked before anything is written (``None`` to audit
    given samples), and the held-out data for its denoiser comparison."""
    from diffmem.audit import open_input
    from diffmem.audit.model import plan_draw, training_shape

    if model is None:
        if text.prompts is not None:
            raise fail("--prompts", "--model (a text-to-image pipeline folder)",
                       str(text.prompts))
        if cure:
            raise fail("--cure", "--model (a model to cure)", cure[0])
        return None, None
    plan = plan_draw(
        model, training_shape(given.whole), n_samples=n_samples, train_cond=given.tcond,
        conditions=conditions, per_condition=conditioning.per_condition,
        guidance=conditioning.guidance, null_cond=conditioning.null_cond,
        sampler=sampling.sampler, steps=sampling.steps, seed=seed,
        scheduler_class=sampling.scheduler_class, eta=sampling.eta,
        scheduler=loading.scheduler_path, schedule=loading.schedule, kind=loading.model_kind,
        index=loading.model_index, device=device, prompts=text.prompts,
        text_options=given.text, batch_size=sampling.batch_size)
    held = None if held_out is None else open_input(held_out, None, given.size, "--held-out")
    return cured_plan(plan, cure, given.whole, given.tcond), held


def _audit(given: _Given, plan: Any, held: Any, samples: Path | None, key: str | None,
           conditions: Path | None, folder: Path, team: Team, device: str, how: Run,
           bandwidth: float | None, features: Path | None, index: str, ratio: float,
           calibrated: float, bootstrap: int) -> tuple[Any, Any, dict[str, Any], Any] | None:
    """Draw the model's samples (with its denoiser gap), then audit the samples against the
    training set, split over ``team``'s processes where the audit splits; the result, the
    gap, what the draw records and the samples read, or ``None`` on the processes that have
    nothing more to do."""
    import torch.distributed as dist

    from diffmem.audit import Rows, audit, open_input
    from diffmem.centres import Centres, shard_rows
    from diffmem.conditions import as_conditions
    from diffmem.experiments.base import FolderLock
    from diffmem.models import draws_per_process

    group, gap, scond, drawn = team.group, None, None, {}
    if plan is not None:
        gap = _draw_from_model(plan, given.whole, folder, team, given.tcond, held,
                               bandwidth, device, how.progress)
        drawn = {"draws_per_process": draws_per_process(folder / "samples.npy")}
        samples, scond = folder / "samples.npy", plan.cond
    sample_data = open_input(samples, key, given.size, "SAMPLES")
    if plan is None and conditions is not None:
        scond = as_conditions(conditions, "--conditions", Rows(sample_data).n)
    if plan is not None and group is not None:
        # a model's samples are audited by process 0 against the whole training set
        # (every process holds it for the denoiser gap): the one-process audit.json
        if not team.leader:
            return None
        group = None
    block, cache = given.whole, folder / "features"
    if group is not None:  # this process's contiguous block, and its own feature cache
        full = Centres(given.whole)
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        block = full.read(*shard_rows(full.n_total, size, rank))
        cache = cache / f"rank{rank}of{size}"
    with FolderLock(folder) if leader(group) else contextlib.nullcontext():
        result = audit(sample_data, block, deltas=given.deltas, ratio_threshold=ratio,
                       calibrated_threshold=calibrated, features=features, index=index,
                       bootstrap=bootstrap, seed=how.seed, device=device,
                       progress=how.progress and leader(group), feature_cache=cache,
                       process_group=group, sample_cond=scond, train_cond=given.tcond)
    if plan is not None and plan.prompts is not None and result.conditions:
        from diffmem.text import name_by_prompt

        name_by_prompt(result.conditions, plan.prompts, plan.prompt_labels)
        result.sample_condition = [plan.prompts[int(i)] for i in result.sample_condition]
    return (result, gap, drawn, sample_data) if leader(group) else None


def _write(folder: Path, result: Any, given: _Given, sample_data: Any,
           inputs: dict[str, Any], gap: Any, drawn: dict[str, Any]) -> None:
    """audit.json, per_sample.csv and the page, under the folder's lock."""
    from diffmem.audit import Rows
    from diffmem.centres import Centres
    from diffmem.experiments.base import FolderLock
    from diffmem.report import write_audit_report

    with FolderLock(folder):
        write_audit_report(folder, result, Rows(sample_data), Rows(Centres(given.whole)),
                           inputs, gap=gap, extra=drawn)


def _draw_from_model(plan: Any, train: Any, folder: Path, team: Team, train_cond: Any,
                     held: Any, bandwidth: float | None, device: str,
                     progress: bool) -> dict[str, Any] | None:
    """Draw the model's samples into ``folder/samples.npy`` (resumable) and measure its
    denoiser against the closed forms, both split over ``team``'s processes (process 0
    writes); returns the denoiser gap (``None`` for a text pipeline, whose denoiser works on
    latents, not on the images)."""
    from diffmem.audit.model import draw, model_gap
    from diffmem.experiments.base import FolderLock

    with FolderLock(folder) if team.leader else contextlib.nullcontext():
        draw(plan, folder, device=device, progress=progress, team=team)
        if plan.prompts is not None:
            return None
        return model_gap(plan, train, train_cond=train_cond, held=held, bandwidth=bandwidth,
                         seed=plan.seed, team=team)


def _echo_audit(result: Any, gap: dict[str, Any] | None, folder: Path) -> None:
    """The audit's one-line summary and where its files are."""
    nn, cal = result.nn_ratio, result.calibrated_l2
    typer.echo(f"{result.n_samples} samples against {result.n_train} training items: "
               f"nn-ratio copies {nn['fraction']:.3f} [{nn['ci_low']:.3f}, "
               f"{nn['ci_high']:.3f}], calibrated-l2 copies {cal['fraction']:.3f}, "
               "within delta " + ", ".join(f"{k}: {v:.3f}" for k, v in
                                            result.fraction_within.items())
               + (f", exact matches {result.exact_match:.3f}"
                  if result.exact_match is not None else "")
               + (f", reproductions of a condition's item {result.reproduction['fraction']:.3f}"
                  if result.reproduction is not None else ""))
    if gap is not None:
        from diffmem.audit import follows_down_to

        level = follows_down_to(gap)
        typer.echo("the model's denoiser is within 0.1 of the empirical (memorizing) one "
                   + (f"from sigma(T) down to sigma = {level:.3g}" if level is not None
                      else "at no level of the grid") + f" ({folder / 'denoiser_gap.json'})")
    typer.echo(f"      -> {folder / 'audit.json'}, {folder / 'per_sample.csv'}, "
               f"{folder / 'index.html'}")
