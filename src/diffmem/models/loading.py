"""Loading any model the commands take (``--model``): a diffusers folder, a diffmem
checkpoint, or a Python callable (``module:function`` / ``file.py:function``), as a
:class:`~diffmem.models.score.ModelScore`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.models.score import ModelScore
from diffmem.models.wrappers import load_diffusers
from diffmem.schedules import (
    EDM,
    get_schedule,
)


def load_checkpoint_model(path: str | Path, index: int = 0,
                          device: str | torch.device = "cpu") -> ModelScore:
    """A diffmem checkpoint as a score: a score-MLP stack (``train_dsm``; model ``index``,
    EMA weights) or an EDM U-Net (``train_edm``; EMA weights when kept)."""
    from diffmem.nn import MLPConfig, NetworkScore, ScoreMLP
    from diffmem.training import load_checkpoint

    state = load_checkpoint(Path(path), device)
    if "architecture" in state:  # an EDM U-Net
        from diffmem.unet import EDMDenoiser, UNet

        arch = state["architecture"]
        den = EDMDenoiser(UNet(int(arch["channels"]), int(arch["image_channels"])))
        den.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        den = den.to(device).eval()
        shape = tuple(int(v) for v in state.get("data_shape", [arch["image_channels"], 32, 32]))
        return ModelScore(lambda x, t: den(x, t), EDM(), shape, "denoiser",
                          name=f"U-Net {Path(path).name}")
    cfg = state.get("config")
    if not isinstance(cfg, dict) or "parameterizations" not in cfg:
        raise fail("--model", "a diffmem checkpoint (train_dsm or train_edm)", str(path))
    weights = state["ema"]
    dim = int(weights["weights.0"].shape[1]) - int(cfg["mlp"].get("n_fourier", 8))
    out_dim = int(weights[f"weights.{len([k for k in weights if k.startswith('weights.')]) - 1}"]
                  .shape[2])
    mlp = ScoreMLP(MLPConfig(dim=out_dim, cond_dim=dim - out_dim, **cfg["mlp"]),
                   cfg["parameterizations"])
    mlp.load_state_dict(weights)
    if not 0 <= index < mlp.n_models:
        raise fail("--model-index", f"a model of the stack, 0..{mlp.n_models - 1}", index)
    schedule = get_schedule(cfg.get("schedule", "VP"))
    net = NetworkScore(mlp.to(device), schedule, index)
    conditional = mlp.config.cond_dim > 0

    def fn(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return net(x, t) if not conditional else net(x, t, y.reshape(x.shape[0], -1).to(x))

    return ModelScore(fn, schedule, (out_dim,), "score",
                      name=f"score MLP {Path(path).name}[{index}]", conditional=conditional)


def load_callable(spec: str, schedule: str, kind: str, data_shape: tuple[int, ...],
                  conditional: bool = False) -> ModelScore:
    """``package.module:function`` or ``path/to/file.py:function``: a function ``fn(x, t)``
    (``fn(x, t, y)`` when ``conditional``, ``y`` the batch's conditions) returning the score
    (``kind='score'``) or the denoiser ``D(x, t)`` (``'denoiser'``; on the EDM schedule
    ``t`` is the noise level ``sigma``) on ``schedule`` (VE, VP, EDM or RF)."""
    if ":" not in spec:
        raise fail("--model", "package.module:function or path/to/file.py:function", spec)
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise fail("--model", "an existing Python file", str(file))
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[file.stem] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as err:  # the user's code: say what happened
        raise fail("--model", f"an importable module {where!r}",
                   f"{type(err).__name__}: {err}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise fail("--model", f"a callable named {name!r} in {where}",
                   "nothing callable by that name")
    return ModelScore(fn, get_schedule(schedule), data_shape, kind, name=spec,
                      conditional=conditional)


def load_model(spec: str, *, scheduler: str | None = None, schedule: str = "VP",
               kind: str = "score", data_shape: tuple[int, ...] | None = None,
               index: int = 0, device: str | torch.device = "cpu",
               conditional: bool = False) -> ModelScore:
    """A model named on the command line: a diffusers folder, a diffmem checkpoint
    (``.pt``) or a Python callable (``module:function``, ``file.py:function``; called
    ``fn(x, t, y)`` when ``conditional``). Diffusers models and checkpoints say themselves
    whether they are conditional."""
    path = Path(spec)
    if path.is_dir():
        return load_diffusers(path, scheduler, device)
    if path.suffix == ".pt":
        if not path.is_file():
            raise fail("--model", "an existing checkpoint file", str(path))
        return load_checkpoint_model(path, index, device)
    if data_shape is None:
        raise fail("--model", "a training set to take the data shape from", spec)
    return load_callable(spec, schedule, kind, data_shape, conditional)
