"""The options several commands share, declared once.

Single options are module constants (``OUT``, ``FEATURES``, ``CURE``, ...). Options that go
together are an *option group*, a dataclass whose fields default to their ``typer.Option``:
:class:`Run` (seed, device, progress bars), :class:`Loading` (how ``--model`` is loaded),
:class:`Text` (a text-to-image pipeline's prompts), :class:`Sampling` (how a model is
sampled) and :class:`Conditioning` (what a conditional model is sampled at). A command
decorated with :func:`with_groups` declares one parameter per group (``run: Run``); its
command line gets the group's options, and its body receives the group filled in.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

OUT = typer.Option(Path("results"), "--out", help="Output folder.")
OUT_REQUIRED = typer.Option(..., "--out", help="Output folder.")
QUICK = typer.Option(False, "--quick", help="Small smoke-test sizes (seconds, not minutes).")
MODEL = typer.Option(..., "--model", help="A diffusers folder, a diffmem checkpoint or "
                     "module:function / file.py:function.")
MODEL_DRAW = typer.Option(None, "--model", help="Draw the samples from a model: a local "
                          "diffusers folder, a diffmem checkpoint (.pt) or module:function / "
                          "file.py:function.")
DATA_SHAPE = typer.Option(None, "--data-shape", help="C,H,W (or d) of a callable model's "
                          "samples (without a training set to take it from).")
CURE = typer.Option([], "--cure", help="NAME=STRENGTH: sample the model with a cure "
                    "(repeatable, applied in order): tikhonov=LAMBDA, guidance=W, "
                    "guidance-schedule=FRACTION, nn-guidance=G, prompt-opt=S, "
                    "random-tokens=K, embedding-noise=S, attention-rescale=C (see "
                    "diffmem mitigate).")
FEATURES = typer.Option(None, "--features", help="Measure in a feature space: a TorchScript "
                        "module mapping a batch of images to vectors (a copy descriptor such "
                        "as SSCD) or a CLIP model folder (local; features are cached in "
                        "OUT/features).")
BATCH_SIZE = typer.Option(64, "--batch-size", help="Samples a model draws at once (each "
                          "batch is written before the next: a rerun after a kill goes on "
                          "from the last one).")
SCHEDULER = typer.Option(None, "--scheduler",
                         help="Scheduler config of a bare UNet folder (or its folder).")
SCHEDULE = typer.Option("VP", "--schedule", help="VE, VP, EDM or RF (flow matching's linear "
                        "path): the schedule of a callable model.")
MODEL_KIND = typer.Option("score", "--model-kind", help="score or denoiser: what a callable "
                          "model returns.")
RESUME = typer.Option(False, "--resume", help="Continue network training from the latest "
                      "checkpoint in OUT/NAME/checkpoints (same configuration required).")
BOOTSTRAP = typer.Option(1000, "--bootstrap", help="Bootstrap resamples.")
GROUP = "__option_group__"


def group(cls: type) -> type:
    """Mark a dataclass of options as an option group (:func:`with_groups`)."""
    setattr(cls, GROUP, True)
    return dataclasses.dataclass(cls)


@group
class Run:
    """How any command runs."""

    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (same seed, same "
                             "metrics).")
    device: str = typer.Option("cpu", "--device", help="Torch device: cpu or cuda.")
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")


@group
class Loading:
    """How ``--model`` is loaded."""

    scheduler: Path | None = SCHEDULER
    schedule: str = SCHEDULE
    model_kind: str = MODEL_KIND
    model_index: int = typer.Option(0, "--model-index", help="Model of a checkpoint's stack.")

    @property
    def scheduler_path(self) -> str | None:
        return None if self.scheduler is None else str(self.scheduler)


@group
class Text:
    """A text-to-image pipeline's prompts and how it is loaded."""

    prompts: Path | None = typer.Option(
        None, "--prompts", help="With a text-to-image pipeline folder as --model: its "
        "prompts, one a line (or JSON lines with 'prompt' and 'label'); the conditions are "
        "their indices.")
    negative_prompt: str = typer.Option("", "--negative-prompt", help="The null condition of "
                                        "--prompts (default: the empty prompt).")
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16: the "
                              "precision a --prompts pipeline is loaded in.")
    resolution: str | None = typer.Option(
        None, "--resolution", help="H,W: the image size a --prompts pipeline generates "
        "(default: its own); training images are resized to it.")
    attention_slicing: bool = typer.Option(
        False, "--attention-slicing", help="Compute a --prompts pipeline's attention in "
        "slices (less memory, same images to rounding; Stable Diffusion and SDXL UNets).")

    def options(self) -> Any:
        """The pipeline's :class:`diffmem.text.TextOptions` (``None`` without ``--prompts``;
        then the options that only mean something with it are refused)."""
        from diffmem._checks import fail
        from diffmem.cli.inputs import parse_size

        if self.prompts is None:
            if self.resolution is not None or self.attention_slicing:
                raise fail("--resolution" if self.resolution is not None
                           else "--attention-slicing", "--prompts (a text-to-image pipeline)",
                           "no --prompts")
            return None
        from diffmem.text import TextOptions

        return TextOptions(self.negative_prompt, self.dtype,
                           parse_size(self.resolution, "--resolution"), self.attention_slicing)


@group
class Sampling:
    """How a model is sampled."""

    batch_size: int = BATCH_SIZE
    sampler: str = typer.Option("ode", "--sampler", help="ode (probability flow), edm (Heun) "
                                "or pipeline (a diffusers model's own scheduler).")
    steps: int = typer.Option(18, "--steps", help="Noise levels of the edm sampler; timesteps "
                              "of the pipeline sampler.")
    scheduler_class: str | None = typer.Option(
        None, "--scheduler-class", help="Diffusers scheduler class for --sampler pipeline "
        "(DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, "
        "...; default: the saved one).")
    eta: float | None = typer.Option(None, "--eta", help="DDIM's eta (--sampler pipeline).")


@group
class Conditioning:
    """What a conditional model is sampled at."""

    train_cond: Path | None = typer.Option(None, "--train-cond", help="One condition per "
                                           "training item (.npy: integer labels or vectors).")
    per_condition: int | None = typer.Option(None, "--per-condition", help="Samples per "
                                             "condition (default: --n-samples shared out).")
    guidance: float | None = typer.Option(None, "--guidance", help="Classifier-free guidance "
                                          "weight w: out(null) + w (out(y) - out(null)).")
    null_cond: str | None = typer.Option(None, "--null-cond", help="The condition meaning 'no "
                                         "condition': a label, a number or a .npy file.")


def with_groups(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with each parameter annotated by an option group replaced, on the command line,
    by the group's options; ``fn`` receives the group filled in. Other parameters are kept
    as they are, in order."""
    hints = typing.get_type_hints(fn)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for p in inspect.signature(fn).parameters.values():
        kind = hints[p.name]
        if getattr(kind, GROUP, False):
            fields = typing.get_type_hints(kind)
            names = [f.name for f in dataclasses.fields(kind)]
            params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                         default=f.default, annotation=fields[f.name])
                       for f in dataclasses.fields(kind)]
            groups[p.name] = (kind, names)
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=kind))

    @functools.wraps(fn)
    def command(**given: Any) -> Any:
        for name, (kind, names) in groups.items():
            given[name] = kind(**{n: given.pop(n) for n in names})
        return fn(**given)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return command
