"""``diffmem detect``: what a model memorizes, without its training set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer

from diffmem._checks import fail, positive_int
from diffmem.cli.app import app, refuse, team_of
from diffmem.cli.inputs import cured, labels, parse_shape, prompt_marks, same_kind, sample_array
from diffmem.cli.options import (
    CURE,
    DATA_SHAPE,
    MODEL,
    OUT_REQUIRED,
    Loading,
    Run,
    Text,
    group,
    with_groups,
)


@group
class Screening:
    """How detect screens: the measures, their noise draws and levels, the sampler whose
    first step it reads, the network inputs at once."""

    measures: str | None = typer.Option(None, "--measures", help="Comma-separated measures "
                                        "(default: the conditional or per-sample defaults).")
    levels: str | None = typer.Option(None, "--levels", help="Noise-to-signal ratios "
                                      "sigma/m of the scale-free measures, comma-separated.")
    n_noise: int = typer.Option(4, "--n-noise", help="Noise draws per condition or sample.")
    steps: int = typer.Option(50, "--steps", help="Steps of the deterministic sampler whose "
                              "first step the screen reads (and that draws --n-samples).")
    batch_size: int = typer.Option(256, "--batch-size", help="Network inputs at once: "
                                   "conditions (or samples) x --n-noise a chunk; the chunks "
                                   "are split over the processes of a torchrun launch.")


@group
class Confirming:
    """How detect confirms a condition's verdict by full generations."""

    confirm: int | None = typer.Option(None, "--confirm", help="Conditions, ranked highest by "
                                       "the screen, confirmed by full generations "
                                       "(default: all up to 64 distinct ones, beyond that "
                                       "down the ranking while batches confirm some).")
    generations: int | None = typer.Option(None, "--generations", help="The most "
                                           "confirmation generations a condition gets, drawn "
                                           "in rounds of 8, 16, 32 until its verdict is "
                                           "settled (default 32; at least 8).")
    alpha: float = typer.Option(0.05, "--alpha", help="Error of a settled verdict: a "
                                "condition whose consistency ratio is at least the line is "
                                "called memorized with probability at most this.")
    confirm_steps: int | None = typer.Option(None, "--confirm-steps", help="DDIM steps of "
                                             "the confirmation generations (default 10: "
                                             "their ratios agree with 50 steps').")


@group
class Judging:
    """What the verdicts are judged against: labels, and a reference known not memorized."""

    labels_file: Path | None = typer.Option(  # noqa: B008
        None, "--labels", help="1 (memorized) or 0 per condition or sample (.npy): ROC, AUC "
        "(with --prompts, a label column of the prompts file is read instead).")
    reference: Path | None = typer.Option(  # noqa: B008
        None, "--reference", help="Known not memorized, of the kind tested: a prompts file "
        "(--prompts), conditions (.npy, --conditions) or samples the model was not trained "
        "on (.npy, --samples). The verdict threshold is set on them at --fpr (on the "
        "consistency ratio, each reference condition confirmed as the tested ones, "
        "where the conditions are confirmed; else on the primary measure).")
    fpr: float = typer.Option(0.05, "--fpr", help="False-positive rate of the --reference "
                              "verdict threshold, for a new entry like the reference (reached "
                              "with 1/fpr - 1 reference entries or more).")


@app.command("detect")
@with_groups
def detect_command(
    model: str = MODEL,
    out: Path = OUT_REQUIRED,
    conditions: Path | None = typer.Option(  # noqa: B008
        None, "--conditions", help="A conditional model's conditions to test (.npy: labels "
        "or embeddings)."),
    null_cond: str | None = typer.Option(None, "--null-cond", help="The condition meaning "
                                         "'no condition': a label, a number or a .npy file."),
    samples: Path | None = typer.Option(  # noqa: B008
        None, "--samples", help="An unconditional model's samples to test (.npy); default: "
        "--n-samples drawn by the model."),
    n_samples: int = typer.Option(64, "--n-samples", help="Samples an unconditional model "
                                  "draws when --samples is not given."),
    screening: Screening = None,  # type: ignore[assignment]
    confirming: Confirming = None,  # type: ignore[assignment]
    judging: Judging = None,  # type: ignore[assignment]
    data_shape: str | None = DATA_SHAPE,
    cure: list[str] = CURE,
    loading: Loading = None,  # type: ignore[assignment]
    text: Text = None,  # type: ignore[assignment]
    how: Run = None,  # type: ignore[assignment]
) -> None:
    """Find what a model memorizes without its training set: per condition of a conditional
    model (--conditions, --null-cond), per prompt of a text-to-image pipeline (--prompts),
    or per sample of an unconditional one (--samples or --n-samples); each gets a verdict,
    memorized or not, by the rule of diffmem.verdicts (--reference, or the confirmation
    generations). Writes OUT/detect.json, OUT/detect.csv and OUT/index.html."""
    from diffmem.confirm import check_alpha
    from diffmem.verdicts import check_fpr, judge

    try:
        check_fpr(judging.fpr)
        check_alpha(confirming.alpha)
        team, device = team_of(how.device, locals())
        ask = _ask(model, conditions, null_cond, samples, judging.reference, screening,
                   loading, text, device)
        loaded = _load(ask, model, data_shape, loading, cure, device)
        common = {"n_noise": screening.n_noise, "seed": how.seed, "progress": how.progress,
                  "chunk": ask.chunk, "team": team, **ask.measures}
        if ask.per_condition:
            result, ref = _conditions(ask, loaded, judging, confirming, out,
                                      {**common, "steps": screening.steps})
        else:
            result, ref = _samples(loaded, samples, n_samples, judging, screening, common)
        judge(result, ref, judging.fpr)
        if not team.leader:
            return
        folder = _write(out, result, ref, {
            "model": model, "conditions": None if conditions is None else str(conditions),
            "null_cond": ask.null_cond, "samples": None if samples is None else str(samples),
            "labels": None if judging.labels_file is None else str(judging.labels_file),
            "reference": None if judging.reference is None else str(judging.reference),
            "cures": list(cure)})
    except ValueError as err:
        refuse(str(err))
        return
    _echo_detect(result, folder)


@dataclass
class _Asked:
    """What detect tests, read and checked: conditions (a file, or a text pipeline's prompt
    indices) with their null condition and reference, or samples; the measures (as keyword
    arguments) and the conditions a chunk holds."""

    per_condition: bool
    conditions: Any
    null_cond: Any
    ref_table: Any
    text: Any
    measures: dict[str, Any]
    chunk: int


def _ask(model: str, conditions: Path | None, null_cond: str | None, samples: Path | None,
         reference: Path | None, screening: Screening, loading: Loading, text: Text,
         device: str) -> _Asked:
    """Read and check what is tested and how (a text pipeline is loaded with its prompts
    and the reference's)."""
    from diffmem import detect as det

    ref_table = loaded_text = None
    options = text.options()
    if text.prompts is not None:
        conditions, ref_table, null_cond, loaded_text = _detect_prompts(
            model, text.prompts, reference, options, device,
            {"--conditions": conditions, "--null-cond": null_cond, "--samples": samples,
             "--scheduler": loading.scheduler})
    per_condition = conditions is not None
    if per_condition and samples is not None:
        raise fail("--samples", "either --conditions (a conditional model) or --samples "
                   "(an unconditional one)", "both")
    if per_condition and null_cond is None:
        raise fail("--null-cond", "the condition that means 'no condition', with "
                   "--conditions", None)
    measures, levels = screening.measures, screening.levels
    names = None if measures is None else [m.strip() for m in measures.split(",")]
    chunk = max(1, positive_int("--batch-size", screening.batch_size)
                // max(1, screening.n_noise))
    if names is not None:
        det._check_measures(names, det.MEASURES if per_condition else det.SAMPLE_MEASURES)
    kw: dict[str, Any] = {} if names is None else {"measures": names}
    if levels is not None:
        try:
            lv = det._check_levels([float(v) for v in levels.split(",")])
        except ValueError as err:
            raise fail("--levels", "positive numbers separated by commas",
                       repr(levels)) from err
        kw |= {"levels": lv} if per_condition else {"level": lv[0]}
    return _Asked(per_condition, conditions, null_cond, ref_table, loaded_text, kw, chunk)


def _load(ask: _Asked, model: str, data_shape: str | None, loading: Loading,
          cure: list[str], device: str) -> Any:
    """The model (a text pipeline's, already loaded), cured, checked to be conditional
    exactly when conditions are tested."""
    from diffmem.conditions import as_conditions, parse_null
    from diffmem.models import load_model

    shape = parse_shape(data_shape)
    loaded = ask.text.model if ask.text is not None else load_model(
        model, scheduler=loading.scheduler_path, schedule=loading.schedule,
        kind=loading.model_kind, data_shape=shape, index=loading.model_index, device=device,
        conditional=ask.per_condition)
    if cure:
        null = ask.null_cond
        loaded = cured(loaded, cure, null if ask.text is not None or null is None
                       else parse_null(null, as_conditions(ask.conditions, "--conditions")))
    if ask.per_condition and not getattr(loaded, "conditional", False):
        raise fail("--conditions", "a conditional model (this one takes no condition: "
                   "drop --conditions to test its samples)", str(ask.conditions))
    if not ask.per_condition and getattr(loaded, "conditional", False):
        raise fail("--conditions", "the conditions to test for a conditional model (with "
                   "--null-cond)", None)
    return loaded


def _conditions(ask: _Asked, loaded: Any, judging: Judging, confirming: Confirming,
                out: Path, kw: dict[str, Any]) -> tuple[Any, Any]:
    """detect on the conditions (and the reference), labels read from ``--labels`` or the
    prompts file."""
    from diffmem.conditions import as_conditions, parse_null

    text, reference, labels_file = ask.text, judging.reference, judging.labels_file
    table = as_conditions(ask.conditions, "--conditions") if text is None else ask.conditions
    ref_table = ask.ref_table
    if text is None and reference is not None:
        ref_table = same_kind(as_conditions(reference, "--reference"), table)
    marks = labels(labels_file, len(table)) if text is None or labels_file is not None \
        else prompt_marks(text, table)
    null = parse_null(ask.null_cond, table) if text is None else ask.null_cond
    kw |= {"guidance": None if text is None else text.guidance_applied,
           "generations": confirming.generations, "alpha": confirming.alpha,
           "confirm_steps": confirming.confirm_steps}
    return _detect_conditions(loaded, table, null, ref_table, text,
                              confirm=confirming.confirm, labels=marks, fpr=judging.fpr,
                              out=out, **kw)


def _detect_conditions(model: Any, table: Any, null: Any, ref_table: Any, text: Any,
                       confirm: int | None, labels: Any, fpr: float, out: Path,
                       **kw: Any) -> tuple[Any, Any]:
    """:func:`diffmem.detect.detect` on the reference first (confirmed in full: its verdict
    reads ``consistency_ratio``), then on the conditions, confirmed against the line the
    reference sets (its threshold at ``fpr``, when below the consistency rule's); each
    keeps its finished confirmation batches under ``out`` (resumable); prompts named and
    deduplicated by their text."""
    from diffmem.confirm import LINE
    from diffmem.detect import detect
    from diffmem.verdicts import threshold_at_fpr

    texts = None if text is None else text.prompts.texts
    ref = line = None
    if ref_table is not None:
        ref = detect(model, ref_table, null, confirm=len(ref_table), store=out /
                     "confirmations_reference", keys=None if texts is None else
                     [texts[int(j)] for j in ref_table], **kw)
        ratios = [e.get("consistency_ratio") for e in ref.entries]
        if any(r is not None for r in ratios):
            line = min(LINE, threshold_at_fpr(ratios, fpr, below=True))
    result = detect(model, table, null, confirm=confirm, labels=labels, line=line,
                    store=out / "confirmations", keys=None if texts is None else
                    [texts[int(j)] for j in table], **kw)
    if text is not None:
        from diffmem.text import name_by_prompt

        name_by_prompt(result.entries, text.prompts.texts, text.prompts.labels)
        if ref is not None:
            name_by_prompt(ref.entries, text.prompts.texts)
    return result, ref


def _samples(model: Any, samples: Path | None, n_samples: int, judging: Judging,
             screening: Screening, kw: dict[str, Any]) -> tuple[Any, Any]:
    """:func:`diffmem.detect.detect_samples` on ``--samples`` (or ``n_samples`` the model
    draws) and on the ``--reference`` samples, checked first."""
    from diffmem.detect import detect_samples, draw_samples

    reference, labels_file = judging.reference, judging.labels_file
    steps, batch = screening.steps, positive_int("--batch-size", screening.batch_size)

    held = None if reference is None else same_kind(
        sample_array(reference, "--reference"),
        torch.zeros(1, *model.data_shape, dtype=torch.float64))
    given = sample_array(samples, "--samples") if samples is not None else draw_samples(
        model, n_samples, steps=steps, seed=kw["seed"], batch=batch, team=kw["team"])
    result = detect_samples(model, given, labels=labels(labels_file, given.shape[0]), **kw)
    return result, None if held is None else detect_samples(model, held, **kw)


def _write(out: Path, result: Any, ref: Any, inputs: dict[str, Any]) -> Path:
    """detect.json, detect.csv and the page into ``out``, under its lock."""
    from diffmem.experiments.base import FolderLock, prepare_out
    from diffmem.report import write_detect_report

    folder = prepare_out(out)
    with FolderLock(folder):
        write_detect_report(folder, result, inputs, reference=ref)
    return folder


def _echo_detect(result: Any, folder: Path) -> None:
    """The command's summary: the top of the ranking, each measure's AUC, the verdicts."""
    from diffmem.verdicts import bound_note

    what = "conditions" if result.kind == "conditions" else "samples"
    top = result.ranking()[:5]
    typer.echo(f"{len(result.entries)} {what}; most likely memorized: " + ", ".join(
        f"{e.get('condition', e['index'])} ({result.primary} {e[result.primary]:.3g})"
        for e in top if e.get(result.primary) is not None))
    for name, r in result.roc.items():
        typer.echo(f"{name}: AUC {r['auc']:.3f}, TPR at 1% FPR {r['tpr_at_1pct_fpr']:.3f}")
    v = result.verdict or {}
    typer.echo(f"verdict: {v['n_memorized']} of {len(result.entries)} {what} memorized ("
               f"{v['rule']})" if v.get("rule") else f"verdict: none ({v.get('why')})")
    note = bound_note(v)
    if note:
        typer.echo(f"note: {note}")
    rates = v.get("against_labels")
    if rates and rates["tpr"] is not None and rates["fpr"] is not None:
        typer.echo(f"verdicts against the labels: TPR {rates['tpr']:.3f}, FPR "
                   f"{rates['fpr']:.3f}")
    typer.echo(f"      -> {folder / 'detect.json'}, {folder / 'detect.csv'}, "
               f"{folder / 'index.html'}")


def _detect_prompts(model: str, prompts: Path, reference: Path | None, options: Any,
                    device: str, rejected: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``detect --prompts``: the pipeline loaded with its prompts (and the ``--reference``
    prompts after them) encoded; the conditions are the prompts' indices, the reference's
    the next ones (``None`` without it), and the null condition the negative prompt's."""
    from diffmem.prompts import Prompts, read_prompts
    from diffmem.text import load_text_model, refuse_with_prompts

    refuse_with_prompts(rejected)
    given = read_prompts(prompts)
    if reference is not None and reference.suffix == ".npy":
        raise fail("--reference", "a prompts file, like --prompts", str(reference))
    ref = Prompts([], [], []) if reference is None else read_prompts(reference, "--reference")
    both = Prompts(given.texts + ref.texts, given.labels + ref.labels,
                   given.memorized + ref.memorized)
    text = load_text_model(model, both, options, device=device)
    n, m = len(given.texts), len(ref.texts)
    return (torch.arange(n), None if reference is None else torch.arange(n, n + m),
            torch.tensor(n + m), text)
