"""Command line: ``diffmem list``, ``diffmem run NAME`` and ``diffmem reproduce``.

Launched by ``torchrun --nproc-per-node P -m diffmem ...`` (``WORLD_SIZE > 1``), the commands
join the torch.distributed group (gloo on the CPU, NCCL with ``--device cuda``, one GPU per
process) and the closed-form experiments split their training set over it; process 0 prints
and writes.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch
import typer
from torch import Tensor

from diffmem._checks import fail, positive, positive_int
from diffmem.experiments import REGISTRY, get_experiment
from diffmem.experiments.base import Record, resolve_params, run_experiment
from diffmem.parallel import Team

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="diffmem: memorization and regularization in score-based diffusion models "
         "(Baptista et al., arXiv:2501.15785). Each paper experiment is one command.",
)

OUT = typer.Option(Path("results"), "--out", help="Output folder.")
QUICK = typer.Option(False, "--quick", help="Small smoke-test sizes (seconds, not minutes).")
SEED = typer.Option(0, "--seed", help="Seed of every random draw (same seed, same metrics).")
DEVICE = typer.Option("cpu", "--device", help="Torch device: cpu or cuda.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
SCHEDULER = typer.Option(None, "--scheduler",
                         help="Scheduler config of a bare UNet folder (or its folder).")
SCHEDULE = typer.Option("VP", "--schedule", help="VE, VP, EDM or RF (flow matching's linear "
                        "path): the schedule of a callable model.")
PROMPTS = typer.Option(None, "--prompts", help="With a text-to-image pipeline folder as "
                       "--model: its prompts, one a line (or JSON lines with 'prompt' and "
                       "'label'); the conditions are their indices.")
NEGATIVE_PROMPT = typer.Option("", "--negative-prompt", help="The null condition of "
                               "--prompts (default: the empty prompt).")
BATCH_SIZE = typer.Option(64, "--batch-size", help="Samples a model draws at once (each "
                          "batch is written before the next: a rerun after a kill goes on "
                          "from the last one).")
DTYPE = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16: the precision "
                     "a --prompts pipeline is loaded in.")
RESOLUTION = typer.Option(None, "--resolution", help="H,W: the image size a --prompts "
                          "pipeline generates (default: its own); training images are "
                          "resized to it.")
ATTENTION_SLICING = typer.Option(False, "--attention-slicing", help="Compute a --prompts "
                                 "pipeline's attention in slices (less memory, same images "
                                 "to rounding; Stable Diffusion and SDXL UNets).")
MODEL_KIND = typer.Option("score", "--model-kind", help="score or denoiser: what a callable "
                          "model returns.")
DATA_SHAPE = typer.Option(None, "--data-shape", help="C,H,W (or d) of a callable model's "
                          "samples (without a training set to take it from).")
MODEL_DRAW = typer.Option(None, "--model", help="Draw the samples from a model: a local "
                          "diffusers folder, a diffmem checkpoint (.pt) or module:function / "
                          "file.py:function.")
SAMPLER = typer.Option("ode", "--sampler", help="ode (probability flow), edm (Heun) or "
                       "pipeline (a diffusers model's own scheduler).")
STEPS = typer.Option(18, "--steps", help="Noise levels of the edm sampler; timesteps of the "
                     "pipeline sampler.")
SCHEDULER_CLASS = typer.Option(None, "--scheduler-class", help="Diffusers scheduler class "
                               "for --sampler pipeline (DDPMScheduler, DDIMScheduler, "
                               "EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...; "
                               "default: the saved one).")
ETA = typer.Option(None, "--eta", help="DDIM's eta (--sampler pipeline).")
TRAIN_COND = typer.Option(None, "--train-cond", help="One condition per training item (.npy: "
                          "integer labels or vectors).")
PER_CONDITION = typer.Option(None, "--per-condition", help="Samples per condition (default: "
                             "--n-samples shared out).")
GUIDANCE = typer.Option(None, "--guidance", help="Classifier-free guidance weight w: "
                        "out(null) + w (out(y) - out(null)).")
NULL_COND = typer.Option(None, "--null-cond", help="The condition meaning 'no condition': a "
                         "label, a number or a .npy file.")
CURE = typer.Option([], "--cure", help="NAME=STRENGTH: sample the model with a cure "
                    "(repeatable, applied in order): tikhonov=LAMBDA, guidance=W, "
                    "guidance-schedule=FRACTION, nn-guidance=G, prompt-opt=S, "
                    "random-tokens=K, embedding-noise=S, attention-rescale=C (see "
                    "diffmem mitigate).")
FEATURES = typer.Option(None, "--features", help="Measure in a feature space: a TorchScript "
                        "module mapping a batch of images to vectors (a copy descriptor such "
                        "as SSCD) or a CLIP model folder (local; features are cached in "
                        "OUT/features).")
MODEL_INDEX = typer.Option(0, "--model-index", help="Model of a checkpoint's stack.")
RESUME = typer.Option(False, "--resume", help="Continue network training from the latest "
                      "checkpoint in OUT/NAME/checkpoints (same configuration required).")


def process_group(device: str) -> tuple[Any, str]:
    """The torch.distributed group of a ``torchrun`` launch (``WORLD_SIZE > 1``), initialised
    here, and the device this process uses (``cuda:LOCAL_RANK`` for ``--device cuda``);
    ``(None, device)`` otherwise."""
    from diffmem.experiments.base import check_device

    check_device(device)  # before any GPU is picked: no CUDA is an error, exit 2
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.group.WORLD, device


def _team(device: str, options: dict[str, Any]) -> tuple[Team, str]:
    """This command's :class:`diffmem.parallel.Team` (one process, or a ``torchrun`` group)
    and device; every process must have been given the same ``options`` (the command's
    ``locals()``: its parameters; checked here, before any work: :meth:`Team.agree`)."""
    group, device = process_group(device)
    team = Team.of(group)
    plain = (str, int, float, bool, Path, list, tuple, type(None))
    team.agree({k: str(v) for k, v in options.items()
                if isinstance(v, plain) and k not in ("progress", "device")})
    return team, device


def _leader(group: Any) -> bool:
    """Whether this process prints and writes (process 0, or the only one)."""
    if group is None:
        return True
    import torch.distributed as dist

    return dist.get_rank(group) == 0


def _fail(message: str) -> None:
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


_MARK = {"confirmed": "OK", "not_reproduced": "NO", "inconclusive": "??"}


def _echo_record(rec: Record) -> None:
    typer.echo(f"[{_MARK[rec.verdict.status]}] {rec.name} ({rec.elapsed_s:.1f} s)")
    for claim in rec.verdict.claims:
        typer.echo(f"     {_MARK[claim.status]} {claim.text}")
    typer.echo(f"      -> {rec.folder}/metrics.json, {len(rec.figures)} figures")


@app.command("list")
def list_experiments() -> None:
    """List the registered experiments, one line each."""
    width = max(len(n) for n in REGISTRY)
    for name, exp in REGISTRY.items():
        typer.echo(f"{name:<{width}}  {exp.summary}")


@app.command("run")
def run(
    name: str = typer.Argument(..., help="Experiment name (see `diffmem list`)."),
    out: Path = OUT,
    quick: bool = QUICK,
    seed: int = SEED,
    device: str = DEVICE,
    set_: list[str] = typer.Option(  # noqa: B008
        [], "--set", help="Override a parameter: --set key=value (repeatable; lists as "
                          "a,b,c or \\[a, b, c])."),
    config: Path | None = typer.Option(  # noqa: B008
        None, "--config", help="TOML file of parameters (top-level keys or a [NAME] table)."),
    progress: bool = PROGRESS,
    resume: bool = RESUME,
) -> None:
    """Run one experiment and write OUT/NAME/metrics.json, config.json and figures."""
    try:
        group, device = process_group(device)
        exp = get_experiment(name)
        params = resolve_params(exp, quick=quick, config_file=config, overrides=set_)
        rec = run_experiment(exp, out, params, seed=seed, device=device, progress=progress,
                             resume=resume, process_group=group)
    except ValueError as err:  # ConfigError and the library's input errors
        _fail(str(err))
        return
    if _leader(group):
        _echo_record(rec)


@app.command("reproduce")
def reproduce(
    out: Path = OUT,
    quick: bool = QUICK,
    seed: int = SEED,
    device: str = DEVICE,
    only: str | None = typer.Option(  # noqa: B008
        None, "--only", help="Comma-separated subset of experiments (default: all)."),
    jobs: int | None = typer.Option(  # noqa: B008
        None, "--jobs", help="Experiments run at once, in worker processes sharing the "
        "cores (default: one per core on the CPU, 1 on a GPU or under torchrun)."),
    progress: bool = PROGRESS,
    resume: bool = RESUME,
) -> None:
    """Run every registered experiment; write OUT/index.html and OUT/summary.json, updated as
    each experiment is done."""
    from tqdm.auto import tqdm

    from diffmem.experiments.base import available_cores, run_all
    from diffmem.report import claim_counts, counts_text, write_report

    try:
        group, device = process_group(device)
        names = list(REGISTRY) if only is None else [n.strip() for n in only.split(",") if n]
        exps = [get_experiment(n) for n in names]
        if only is None:  # all: skip, saying so, what this installation cannot run
            for exp in [e for e in exps if e.missing()]:
                extra = "pipelines" if "transformers" in exp.missing() else "diffusers"
                typer.echo(f"[skipped] {exp.name}: needs {', '.join(exp.missing())} (pip "
                           f"install 'diffmem[{extra}]')")
            exps = [e for e in exps if not e.missing()]
        params = {e.name: resolve_params(e, quick=quick) for e in exps}
        if jobs is None:  # run_all refuses a count below 1
            jobs = 1 if group is not None or device != "cpu" else available_cores()
        start = time.perf_counter()
        records: list[Record] = []
        leader = _leader(group)
        bar = tqdm(total=len(exps), desc="reproduce", unit="experiment",
                   disable=not (progress and leader))
        for rec in run_all(exps, out, params, jobs=jobs, seed=seed, device=device,
                           progress=progress and jobs == 1, resume=resume,
                           process_group=group):
            records.append(rec)
            bar.update()
            if not leader:
                continue
            with tqdm.external_write_mode():
                _echo_record(rec)
            done = {r.name for r in records}
            write_report(out, _in_order(records, exps), dict(REGISTRY), quick=quick,
                         seed=seed, total_s=time.perf_counter() - start,
                         pending=[e.name for e in exps if e.name not in done])
        bar.close()
        total = time.perf_counter() - start
    except ValueError as err:  # ConfigError and the library's input errors
        _fail(str(err))
        return
    if not _leader(group):
        return
    write_report(out, _in_order(records, exps), dict(REGISTRY), quick=quick, seed=seed,
                 total_s=total)
    typer.echo(f"Claims: {counts_text(claim_counts(records))} ({len(records)} experiments, "
               f"{total:.1f} s). Report: {out / 'index.html'}")


def _in_order(records: list[Record], exps: list[Any]) -> list[Record]:
    """``records`` in the order of ``exps`` (the registry's), whatever order they ended in."""
    rank = {e.name: i for i, e in enumerate(exps)}
    return sorted(records, key=lambda r: rank[r.name])


def _parse_size(text: str | None, name: str = "--resize") -> tuple[int, int] | None:
    """``H,W`` as two positive integers (``None`` when not given); errors name ``name``."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError as err:
        raise fail(name, "H,W (two integers)", repr(text)) from err
    if h < 1 or w < 1:
        raise fail(name, "H,W of integers >= 1", repr(text))
    return h, w


def _text_options(prompts: Path | None, negative_prompt: str, dtype: str,
                  resolution: str | None, attention_slicing: bool) -> Any:
    """The options of a --prompts pipeline (``None`` without --prompts; then the options
    that only mean something with it are refused)."""
    if prompts is None:
        if resolution is not None or attention_slicing:
            raise fail("--resolution" if resolution is not None else "--attention-slicing",
                       "--prompts (a text-to-image pipeline)", "no --prompts")
        return None
    from diffmem.text import TextOptions

    return TextOptions(negative_prompt, dtype, _parse_size(resolution, "--resolution"),
                       attention_slicing)


@app.command("audit")
def audit_command(
    samples: Path | None = typer.Argument(  # noqa: B008
        None, help="Samples: a .npy file (memory-mapped), a .npz archive (--key) or a "
                   "folder of PNG/JPEG images (or --model to draw them)."),
    train: list[Path] = typer.Option(  # noqa: B008
        ..., "--train", help="Training set, in the same forms (repeat for .npy shards)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),  # noqa: B008
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
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples."),
    model: str | None = MODEL_DRAW,
    n_samples: int = typer.Option(1000, "--n-samples", help="Samples to draw with --model."),
    batch_size: int = BATCH_SIZE,
    sampler: str = SAMPLER,
    steps: int = STEPS,
    scheduler: Path | None = SCHEDULER,
    scheduler_class: str | None = SCHEDULER_CLASS,
    eta: float | None = ETA,
    train_cond: Path | None = TRAIN_COND,
    conditions: Path | None = typer.Option(  # noqa: B008
        None, "--conditions", help="Conditions to sample a conditional --model at (.npy; "
        "embeddings (n, seq, dim) for a cross-attention UNet; default: each distinct "
        "--train-cond), or with SAMPLES the condition of each sample."),
    per_condition: int | None = PER_CONDITION,
    guidance: float | None = GUIDANCE,
    null_cond: str | None = NULL_COND,
    cure: list[str] = CURE,
    cond_bandwidth: float | None = typer.Option(
        None, "--cond-bandwidth", help="Kernel width in y of the conditional empirical "
                                       "denoiser for vector conditions (default: exact)."),
    schedule: str = SCHEDULE,
    model_kind: str = MODEL_KIND,
    model_index: int = MODEL_INDEX,
    held_out: Path | None = typer.Option(  # noqa: B008
        None, "--held-out", help="Held-out data for the denoiser comparison of --model."),
    prompts: Path | None = PROMPTS,
    negative_prompt: str = NEGATIVE_PROMPT,
    dtype: str = DTYPE,
    resolution: str | None = RESOLUTION,
    attention_slicing: bool = ATTENTION_SLICING,
    seed: int = SEED,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Audit SAMPLES (or samples drawn from --model) against a training set: nearest
    training items, the paper's fraction within delta, nn-ratio and calibrated-l2 copies,
    exact matches (binary images), duplicates; writes OUT/audit.json, OUT/per_sample.csv and
    OUT/index.html. With --model, also OUT/samples.npy (resumable: samples already drawn are
    kept) and OUT/denoiser_gap.json, how far the model's denoiser is from the memorizing
    empirical one at each noise level."""
    import torch.distributed as dist

    from diffmem.audit import DEFAULT_DELTAS, Rows, audit, open_input
    from diffmem.audit.model import load_train_cond, plan_draw, training_shape
    from diffmem.centres import Centres, shard_rows
    from diffmem.conditions import as_conditions
    from diffmem.experiments.base import FolderLock, prepare_out
    from diffmem.models import draws_per_process
    from diffmem.report import write_audit_report

    try:
        team, device = _team(device, locals())
        group = team.group
        deltas = [positive("--delta", d) for d in delta] or list(DEFAULT_DELTAS)
        size = _parse_size(resize)
        if (samples is None) == (model is None):
            raise fail("SAMPLES", "samples or --model (one of them)",
                       "neither" if samples is None else "both")
        text = _text_options(prompts, negative_prompt, dtype, resolution, attention_slicing)
        train_size = _prompt_resolution(model, prompts, size, text)
        train_data = [open_input(t, train_key, train_size if Path(t).is_dir() else size,
                                 "--train") for t in train]
        if len(train_data) > 1 and not all(isinstance(t, str) for t in train_data):
            raise fail("--train", "one data set, or several .npy shards",
                       [str(t) for t in train])
        whole = train_data if len(train_data) > 1 else train_data[0]
        tcond = load_train_cond(train_cond, whole)
        plan = None
        if model is not None:  # everything checked before anything is written
            plan = plan_draw(
                model, training_shape(whole), n_samples=n_samples, train_cond=tcond,
                conditions=conditions, per_condition=per_condition, guidance=guidance,
                null_cond=null_cond, sampler=sampler, steps=steps, seed=seed,
                scheduler_class=scheduler_class, eta=eta,
                scheduler=None if scheduler is None else str(scheduler), schedule=schedule,
                kind=model_kind, index=model_index, device=device, prompts=prompts,
                text_options=text, batch_size=batch_size)
            plan = _cured_plan(plan, cure, whole, tcond)
            held = None if held_out is None else open_input(held_out, None, size, "--held-out")
        elif prompts is not None:
            raise fail("--prompts", "--model (a text-to-image pipeline folder)", str(prompts))
        elif cure:
            raise fail("--cure", "--model (a model to cure)", cure[0])
        folder = prepare_out(out)
        gap = None
        scond = None
        drawn: dict[str, Any] = {}
        if plan is not None:
            gap = _draw_from_model(plan, whole, folder, team, tcond, held, cond_bandwidth,
                                   device, progress)
            drawn = {"draws_per_process": draws_per_process(folder / "samples.npy")}
            samples = folder / "samples.npy"
            scond = plan.cond
        sample_data = open_input(samples, key, size, "SAMPLES")
        if plan is None and conditions is not None:
            scond = as_conditions(conditions, "--conditions", Rows(sample_data).n)
        if plan is not None and group is not None:
            # a model's samples are audited by process 0 against the whole training set
            # (every process holds it for the denoiser gap): the one-process audit.json
            if not team.leader:
                return
            group = None
        block = whole
        if group is not None:  # this process's contiguous block of the training set
            full = Centres(whole)
            lo, hi = shard_rows(full.n_total, dist.get_world_size(group),
                                dist.get_rank(group))
            block = full.read(lo, hi)
        cache = folder / "features"
        if group is not None:  # each process caches the features of its own block
            cache = cache / f"rank{dist.get_rank(group)}of{dist.get_world_size(group)}"
        with FolderLock(folder) if _leader(group) else contextlib.nullcontext():
            result = audit(sample_data, block, deltas=deltas, ratio_threshold=ratio_threshold,
                           calibrated_threshold=calibrated_threshold, features=features,
                           index=index, bootstrap=bootstrap, seed=seed, device=device,
                           progress=progress and _leader(group), feature_cache=cache,
                           process_group=group, sample_cond=scond, train_cond=tcond)
            if plan is not None and plan.prompts is not None and result.conditions:
                from diffmem.text import name_by_prompt

                name_by_prompt(result.conditions, plan.prompts, plan.prompt_labels)
                result.sample_condition = [plan.prompts[int(i)] for i in result.sample_condition]
            if _leader(group):
                write_audit_report(folder, result, Rows(sample_data), Rows(Centres(whole)),
                                   {"samples": str(samples), "train": [str(t) for t in train],
                                    "model": model, "sampler": sampler if model else None,
                                    "features": None if features is None else str(features),
                                    "train_cond": None if train_cond is None
                                    else str(train_cond),
                                    "conditions": None if conditions is None
                                    else str(conditions), "guidance": guidance,
                                    "cures": list(cure),
                                    **_prompt_settings(plan, prompts, train_size),
                                    "seed": seed}, gap=gap, extra=drawn)
    except ValueError as err:  # the library's and the command line's input errors
        _fail(str(err))
        return
    if _leader(group):
        _echo_audit(result, gap, folder)


def _cured(model: Any, cures: list[str], null: Any = None, train: Any = None,
           train_cond: Any = None) -> Any:
    """``model`` cured by ``--cure NAME=STRENGTH`` (none: unchanged), with its null
    condition, training set and training conditions for the cures that need them."""
    if not cures:
        return model
    from diffmem.mitigate import cure_context, cure_model, parse_cure

    parsed = [parse_cure(c) for c in cures]
    return cure_model(model, parsed, cure_context(
        model, null, train, train_cond, search=any(c.searches for c in parsed)))


def _cured_plan(plan: Any, cures: list[str], train: Any = None,
                train_cond: Any = None) -> Any:
    """``plan`` with its model cured by ``--cure`` (:func:`_cured`)."""
    import dataclasses

    return dataclasses.replace(plan, model=_cured(plan.model, cures, plan.null, train,
                                                  train_cond))


def _prompt_resolution(model: str | None, prompts: Path | None,
                       size: tuple[int, int] | None, text: Any) -> tuple[int, int] | None:
    """The size training images are resized to: ``--resize``, or with ``--prompts`` the
    resolution the pipeline generates (``--resolution`` or its own)."""
    if prompts is None or model is None or size is not None:
        return size
    from diffmem.text import pipeline_resolution

    if text is not None and text.resolution is not None:
        return text.resolution

    return pipeline_resolution(model)


def _prompt_settings(plan: Any, prompts: Path | None,
                     size: tuple[int, int] | None) -> dict[str, Any]:
    """What audit.json records of a --prompts run: the file, the guidance applied, the
    prompts the tokenizer truncated and the size training images were resized to."""
    if prompts is None or plan is None:
        return {}
    return {"prompts": str(prompts), "guidance_applied": plan.model.guidance,
            "truncated_prompts": plan.truncated, "train_resized_to": size}


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


@app.command("detect")
def detect_command(
    model: str = typer.Option(..., "--model", help="A diffusers folder, a diffmem checkpoint "
                              "or module:function / file.py:function."),
    out: Path = typer.Option(..., "--out", help="Output folder."),  # noqa: B008
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
    measures: str | None = typer.Option(None, "--measures", help="Comma-separated measures "
                                        "(default: the conditional or per-sample defaults)."),
    levels: str | None = typer.Option(None, "--levels", help="Noise-to-signal ratios "
                                      "sigma/m of the scale-free measures, comma-separated."),
    confirm: int | None = typer.Option(None, "--confirm", help="Conditions, ranked highest by "
                                       "the screen, confirmed by full generations "
                                       "(consistency; default a tenth of them)."),
    n_noise: int = typer.Option(4, "--n-noise", help="Noise draws per condition or sample."),
    generations: int | None = typer.Option(None, "--generations", help="The most "
                                           "confirmation generations a condition gets, drawn "
                                           "in rounds of 8, 16, 32 until its verdict is "
                                           "settled (default 32; at least 8)."),
    alpha: float = typer.Option(0.05, "--alpha", help="Error of a settled verdict: a "
                                "condition whose consistency ratio is at least the line is "
                                "called memorized with probability at most this."),
    confirm_steps: int | None = typer.Option(None, "--confirm-steps", help="DDIM steps of "
                                             "the confirmation generations (default 10: "
                                             "their ratios agree with 50 steps')."),
    steps: int = typer.Option(50, "--steps", help="Steps of the deterministic sampler whose "
                              "first step the screen reads (and that draws --n-samples)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Network inputs at once: "
                                   "conditions (or samples) x --n-noise a chunk; the chunks "
                                   "are split over the processes of a torchrun launch."),
    data_shape: str | None = DATA_SHAPE,
    labels: Path | None = typer.Option(  # noqa: B008
        None, "--labels", help="1 (memorized) or 0 per condition or sample (.npy): ROC, AUC "
        "(with --prompts, a label column of the prompts file is read instead)."),
    reference: Path | None = typer.Option(  # noqa: B008
        None, "--reference", help="Known not memorized, of the kind tested: a prompts file "
        "(--prompts), conditions (.npy, --conditions) or samples the model was not trained "
        "on (.npy, --samples). The verdict threshold is set on them at --fpr (on the "
        "consistency ratio, each reference condition generated --generations times, "
        "where the conditions are confirmed; else on the primary measure)."),
    fpr: float = typer.Option(0.05, "--fpr", help="False-positive rate of the --reference "
                              "verdict threshold, for a new entry like the reference (reached "
                              "with 1/fpr - 1 reference entries or more)."),
    cure: list[str] = CURE,
    scheduler: Path | None = SCHEDULER,
    schedule: str = SCHEDULE,
    model_kind: str = MODEL_KIND,
    model_index: int = MODEL_INDEX,
    prompts: Path | None = PROMPTS,
    negative_prompt: str = NEGATIVE_PROMPT,
    dtype: str = DTYPE,
    resolution: str | None = RESOLUTION,
    attention_slicing: bool = ATTENTION_SLICING,
    seed: int = SEED,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Find what a model memorizes without its training set: per condition of a conditional
    model (--conditions, --null-cond), per prompt of a text-to-image pipeline (--prompts),
    or per sample of an unconditional one (--samples or --n-samples); each gets a verdict,
    memorized or not, by the rule of diffmem.verdicts (--reference, or the confirmation
    generations). Writes OUT/detect.json, OUT/detect.csv and OUT/index.html."""
    from diffmem import detect as det
    from diffmem.conditions import as_conditions, parse_null
    from diffmem.confirm import check_alpha
    from diffmem.experiments.base import FolderLock, prepare_out
    from diffmem.models import load_model
    from diffmem.report import write_detect_report
    from diffmem.verdicts import check_fpr, judge

    try:
        check_fpr(fpr)
        check_alpha(alpha)
        team, device = _team(device, locals())
        shape = _parse_shape(data_shape)
        text = ref_table = None
        options = _text_options(prompts, negative_prompt, dtype, resolution, attention_slicing)
        if prompts is not None:
            conditions, ref_table, null_cond, text = _detect_prompts(
                model, prompts, reference, options, device,
                {"--conditions": conditions, "--null-cond": null_cond, "--samples": samples,
                 "--scheduler": scheduler})
        per_condition = conditions is not None
        if per_condition and samples is not None:
            raise fail("--samples", "either --conditions (a conditional model) or --samples "
                       "(an unconditional one)", "both")
        if per_condition and null_cond is None:
            raise fail("--null-cond", "the condition that means 'no condition', with "
                       "--conditions", None)
        names = None if measures is None else [m.strip() for m in measures.split(",")]
        chunk = max(1, positive_int("--batch-size", batch_size) // max(1, n_noise))
        allowed = det.MEASURES if per_condition else det.SAMPLE_MEASURES
        if names is not None:
            det._check_measures(names, allowed)
        lv = None
        if levels is not None:
            try:
                lv = det._check_levels([float(v) for v in levels.split(",")])
            except ValueError as err:
                raise fail("--levels", "positive numbers separated by commas",
                           repr(levels)) from err
        loaded = text.model if text is not None else load_model(
            model, scheduler=None if scheduler is None else str(scheduler),
            schedule=schedule, kind=model_kind, data_shape=shape, index=model_index,
            device=device, conditional=per_condition)
        if cure:
            loaded = _cured(loaded, cure, null_cond if text is not None or null_cond is None
                            else parse_null(null_cond, as_conditions(conditions,
                                                                     "--conditions")))
        if per_condition and not getattr(loaded, "conditional", False):
            raise fail("--conditions", "a conditional model (this one takes no condition: "
                       "drop --conditions to test its samples)", str(conditions))
        if not per_condition and getattr(loaded, "conditional", False):
            raise fail("--conditions", "the conditions to test for a conditional model (with "
                       "--null-cond)", None)
        if per_condition:
            assert conditions is not None and null_cond is not None
            table = as_conditions(conditions, "--conditions") if text is None else conditions
            if text is None and reference is not None:
                ref_table = _same_kind(as_conditions(reference, "--reference"), table)
            marks = _labels(labels, len(table)) if text is None or labels is not None \
                else _prompt_marks(text, table)
            kw: dict[str, Any] = {} if names is None else {"measures": names}
            if lv is not None:
                kw["levels"] = lv
            null = parse_null(null_cond, table) if text is None else null_cond
            kw |= {"n_noise": n_noise, "steps": steps, "seed": seed, "progress": progress,
                   "guidance": None if text is None else text.guidance_applied,
                   "chunk": chunk, "team": team, "generations": generations,
                   "alpha": alpha, "confirm_steps": confirm_steps}
            result, ref = _detect_conditions(loaded, table, null, ref_table, text,
                                             confirm=confirm, labels=marks, fpr=fpr,
                                             out=out, **kw)
        else:
            kw = {"n_noise": n_noise, "seed": seed, "progress": progress, "chunk": chunk,
                  "team": team, **({} if names is None else {"measures": names}),
                  **({} if lv is None else {"level": lv[0]})}
            result, ref = _detect_samples(loaded, samples, n_samples, reference, labels,
                                          steps, positive_int("--batch-size", batch_size),
                                          **kw)
        judge(result, ref, fpr)
        if not team.leader:
            return
        folder = prepare_out(out)
        with FolderLock(folder):
            write_detect_report(folder, result, {
                "model": model, "conditions": None if conditions is None else str(conditions),
                "null_cond": null_cond, "samples": None if samples is None else str(samples),
                "labels": None if labels is None else str(labels),
                "reference": None if reference is None else str(reference),
                "cures": list(cure)}, reference=ref)
    except ValueError as err:
        _fail(str(err))
        return
    _echo_detect(result, folder)


@app.command("mitigate")
def mitigate_command(
    model: str = typer.Option(..., "--model", help="A diffusers folder, a diffmem checkpoint "
                              "or module:function / file.py:function."),
    out: Path = typer.Option(..., "--out", help="Output folder."),  # noqa: B008
    train: Path | None = typer.Option(  # noqa: B008
        None, "--train", help="The training set (.npy, .npz or an image folder): copies "
        "by the audit; without it, by detect's verdicts."),
    cures: str | None = typer.Option(None, "--cures", help="Comma-separated cures to sweep "
                                     "(default: every one that applies to the model)."),
    strengths: list[str] = typer.Option(  # noqa: B008
        [], "--strengths", help="NAME=a,b,c: the strengths swept for a cure (repeatable; "
        "default: each cure's own grid)."),
    combine: list[str] = typer.Option(  # noqa: B008
        [], "--combine", help="A=a+B: cures applied together, the last swept over its grid "
        "(repeatable), e.g. guidance-schedule=0.6+nn-guidance."),
    target: float = typer.Option(0.1, "--target", help="Copies a recommended cure must not "
                                 "exceed (fraction of the memorized conditions' samples)."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Draw every cure at every "
                                    "strength of its grid at full size, instead of searching "
                                    "(screen, refine, confirm) for the cheapest that meets "
                                    "--target."),
    n_samples: int = typer.Option(256, "--n-samples", help="Samples per run."),
    features: Path | None = FEATURES,
    batch_size: int = BATCH_SIZE,
    sampler: str = SAMPLER,
    steps: int = STEPS,
    scheduler: Path | None = SCHEDULER,
    scheduler_class: str | None = SCHEDULER_CLASS,
    eta: float | None = ETA,
    train_cond: Path | None = TRAIN_COND,
    conditions: Path | None = typer.Option(  # noqa: B008
        None, "--conditions", help="Conditions to sample a conditional --model at (.npy; "
        "default: each distinct --train-cond)."),
    per_condition: int | None = PER_CONDITION,
    guidance: float | None = GUIDANCE,
    null_cond: str | None = NULL_COND,
    data_shape: str | None = DATA_SHAPE,
    schedule: str = SCHEDULE,
    model_kind: str = MODEL_KIND,
    model_index: int = MODEL_INDEX,
    prompts: Path | None = PROMPTS,
    negative_prompt: str = NEGATIVE_PROMPT,
    dtype: str = DTYPE,
    resolution: str | None = RESOLUTION,
    attention_slicing: bool = ATTENTION_SLICING,
    seed: int = SEED,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Which cure stops the model copying, and at what cost? Sample the model uncured; screen
    every applicable cure on its memorized conditions with few samples, refine each cure
    that can win to its weakest strength under --target, and draw the best candidates at
    full size from the same seeded noise as the uncured run (--exhaustive: every strength of
    every grid at full size); measure each run's copies and its cost (how far the samples of
    the conditions that did not copy move); recommend the cheapest full-size run under
    --target. Writes OUT/mitigate.json and OUT/index.html (the plane of copies against
    cost); resumable."""
    from diffmem.audit import Rows, open_input
    from diffmem.audit.model import load_train_cond, plan_draw, training_shape
    from diffmem.centres import Centres
    from diffmem.experiments.base import FolderLock, prepare_out
    from diffmem.mitigate import CURES, cure_context
    from diffmem.mitigate.search import search
    from diffmem.mitigate.sweep import measure_space, plan_cures, sweep
    from diffmem.report import write_mitigate_report

    try:
        team, device = _team(device, locals())
        options = _text_options(prompts, negative_prompt, dtype, resolution, attention_slicing)
        size = _prompt_resolution(model, prompts, None, options)
        data = None if train is None else open_input(train, None, size if train.is_dir()
                                                     else None, "--train")
        if not 0 < target < 1:
            raise fail("--target", "a copy fraction in (0, 1)", target)
        if train_cond is not None and data is None:
            raise fail("--train-cond", "--train (the items they condition)", str(train_cond))
        tcond = None if data is None else load_train_cond(train_cond, data)
        plan = plan_draw(
            model, training_shape(data) if data is not None else _parse_shape(data_shape),
            n_samples=n_samples, train_cond=tcond, conditions=conditions,
            per_condition=per_condition, guidance=guidance, null_cond=null_cond,
            sampler=sampler, steps=steps, seed=seed, scheduler_class=scheduler_class, eta=eta,
            scheduler=None if scheduler is None else str(scheduler), schedule=schedule,
            kind=model_kind, index=model_index, device=device, prompts=prompts,
            text_options=options, batch_size=batch_size)
        names = None if cures is None else [n.strip() for n in cures.split(",") if n.strip()]
        ctx = cure_context(plan.model, plan.null, data, tcond, search=names is None or any(
            CURES[n].searches for n in [*names, *_chained(combine)] if n in CURES))
        runs, skipped = plan_cures(plan.model, ctx, names, _strength_grids(strengths),
                                   combine)
        space = measure_space(features, plan.prompts, device)
        folder = prepare_out(out)
        with FolderLock(folder) if team.leader else contextlib.nullcontext():
            summary = (sweep if exhaustive else search)(
                plan, runs, folder, train=data, train_cond=tcond, ctx=ctx, target=target,
                device=device, progress=progress, team=team, space=space)
            summary["not_applicable"] = skipped
            if not team.leader:
                return
            write_mitigate_report(folder, summary, {
                "model": model, "train": None if train is None else str(train),
                "prompts": None if prompts is None else str(prompts),
                "prompt_texts": plan.prompts, "sampler": sampler, "steps": steps,
                "features": None if features is None else str(features),
                "seed": seed, "n_samples": plan.n},
                train=None if data is None else Rows(Centres(data)))
    except ValueError as err:
        _fail(str(err))
        return
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


def _detect_samples(model: Any, samples: Path | None, n_samples: int,
                    reference: Path | None, labels: Path | None, steps: int, batch: int,
                    **kw: Any) -> tuple[Any, Any]:
    """:func:`diffmem.detect.detect_samples` on ``--samples`` (or ``n_samples`` the model
    draws) and on the ``--reference`` samples, checked first."""
    from diffmem.detect import detect_samples, draw_samples

    held = None if reference is None else _same_kind(
        _sample_array(reference, "--reference"),
        torch.zeros(1, *model.data_shape, dtype=torch.float64))
    given = _sample_array(samples, "--samples") if samples is not None else draw_samples(
        model, n_samples, steps=steps, seed=kw["seed"], batch=batch, team=kw["team"])
    result = detect_samples(model, given, labels=_labels(labels, given.shape[0]), **kw)
    return result, None if held is None else detect_samples(model, held, **kw)


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


def _prompt_marks(text: Any, table: Tensor) -> Tensor | None:
    """The prompts file's labels of the prompts ``table`` (-1 where unlabelled)."""
    marks = text.prompts.marks()
    return None if marks is None else torch.tensor(marks)[table]


def _same_kind(ref: Tensor, like: Tensor) -> Tensor:
    """``--reference`` checked to be of the kind of what is tested (dtype and shape)."""
    if ref.is_floating_point() != like.is_floating_point() or ref.shape[1:] != like.shape[1:]:
        raise fail("--reference", f"entries like those tested (dtype {like.dtype}, shape "
                   f"(n, *{tuple(like.shape[1:])}))",
                   f"dtype {ref.dtype}, shape {tuple(ref.shape)}")
    return ref


def _sample_array(path: Path, name: str) -> Tensor:
    """A ``.npy`` of samples as float64 (``name`` in errors)."""
    import numpy as np

    from diffmem.centres import open_npy

    arr = open_npy(path, name)
    if arr.dtype.kind not in "fiu":
        raise fail(name, "a numeric array", f"dtype {arr.dtype}")
    return torch.from_numpy(np.array(arr, dtype=np.float64))


def _parse_shape(data_shape: str | None) -> tuple[int, ...] | None:
    """``--data-shape`` as integers (``None`` when not given)."""
    if data_shape is None:
        return None
    try:
        shape = tuple(int(v) for v in data_shape.split(","))
    except ValueError as err:
        raise fail("--data-shape", "integers separated by commas, e.g. 1,8,8",
                   repr(data_shape)) from err
    if not shape or min(shape) < 1:
        raise fail("--data-shape", "positive integers", repr(data_shape))
    return shape


def _labels(path: Path | None, n: int) -> Any:
    """``--labels``: 0/1 integers, one per condition or sample (``None`` when not given)."""
    if path is None:
        return None
    from diffmem.conditions import as_conditions

    marks = as_conditions(path, "--labels", n)
    if marks.is_floating_point():
        raise fail("--labels", "integer labels 0 or 1", f"dtype {marks.dtype}")
    return marks


@app.command("compare")
def compare_command(
    model_a: str = typer.Option(..., "--model-a", help="Model trained on --train-a."),
    model_b: str = typer.Option(..., "--model-b", help="Model trained on --train-b."),
    train_a: Path = typer.Option(..., "--train-a", help="Training set of model A."),  # noqa: B008
    train_b: Path = typer.Option(..., "--train-b", help="Training set of model B."),  # noqa: B008
    out: Path = typer.Option(..., "--out", help="Output folder."),  # noqa: B008
    n_samples: int = typer.Option(200, "--n-samples", help="Pairs to draw."),
    batch_size: int = BATCH_SIZE,
    sampler: str = typer.Option("ode", "--sampler", help="ode, edm or pipeline."),
    steps: int = typer.Option(18, "--steps", help="Steps of the edm or pipeline sampler."),
    scheduler: Path | None = SCHEDULER,
    schedule: str = SCHEDULE,
    model_kind: str = MODEL_KIND,
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples."),
    prompts: Path | None = PROMPTS,
    negative_prompt: str = NEGATIVE_PROMPT,
    dtype: str = DTYPE,
    resolution: str | None = RESOLUTION,
    attention_slicing: bool = ATTENTION_SLICING,
    seed: int = SEED,
    device: str = DEVICE,
    progress: bool = PROGRESS,
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
        team, device = _team(device, locals())
        options = _text_options(prompts, negative_prompt, dtype, resolution,
                                attention_slicing)
        size_a = _prompt_resolution(model_a, prompts, None, options)
        ta, tb = (open_input(t, None, size_a if t.is_dir() else None, name)
                  for t, name in ((train_a, "--train-a"), (train_b, "--train-b")))
        text: dict[str, Any] = {} if prompts is None else {
            "prompts": prompts, "text_options": options}
        plans = plan_pair(model_a, model_b, ta, tb, n_samples=n_samples, device=device,
                          sampler=sampler, steps=steps, seed=seed, kind=model_kind,
                          schedule=schedule,
                          scheduler=None if scheduler is None else str(scheduler),
                          batch_size=batch_size, **text)
        folder = prepare_out(out)
        with FolderLock(folder) if team.leader else contextlib.nullcontext():
            result = compare(plans, ta, tb, folder, bootstrap=bootstrap, progress=progress,
                             device=device, team=team)
            if team.leader:
                write_compare_report(folder, result, np.load(folder / "a" / "samples.npy"),
                                     np.load(folder / "b" / "samples.npy"),
                                     {"model_a": model_a, "model_b": model_b,
                                      "train_a": str(train_a), "train_b": str(train_b),
                                      "sampler": sampler, "seed": seed})
    except ValueError as err:
        _fail(str(err))
        return
    if not team.leader:
        return
    s = result.to_json()
    typer.echo(f"{s['n_pairs']} pairs: agreement {s['agreement']:.3f} "
               f"[{s['agreement_ci'][0]:.3f}, {s['agreement_ci'][1]:.3f}], copies A "
               f"{s['copied_a']:.3f}, B {s['copied_b']:.3f}; median d_ab {s['median_d_ab']:.4g}"
               f"\n      -> {folder / 'compare.json'}, {folder / 'per_pair.csv'}, "
               f"{folder / 'index.html'}")


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


def main() -> None:
    """The ``diffmem`` command: a full disk ends it with the message of
    :class:`diffmem.io.DiskFullError` (the file, what to do) and exit status 1, not a
    traceback, and so does the death of another process of a ``torchrun`` launch
    (:class:`diffmem.parallel.LostProcess`, naming it); under ``torchrun`` the process group
    is destroyed before the process exits."""
    from diffmem.io import DiskFullError
    from diffmem.parallel import LostProcess

    try:
        app()
    except DiskFullError as err:
        typer.secho(f"Error: {err.strerror}", err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None
    except LostProcess as err:  # another process of the launch died: say which, exit 1
        typer.secho(f"Error: {err}", err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None
    finally:  # a torchrun process leaves its group before exiting (gloo's threads joined)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
