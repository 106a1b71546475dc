"""What the two training loops (:func:`diffmem.nn.train_dsm` for score MLPs and
:func:`diffmem.unet.train_edm` for U-Nets) share:

* :class:`EMA`, an exponential moving average of the weights set by its half-life ``h`` in
  steps, as EDM does: after every step ``ema <- beta ema + (1 - beta) w`` with
  ``beta = 0.5^(1/h)`` (``h = 0``: no averaging), and a warning when the average still leans on
  the initialisation;
* :class:`Checkpoints`: atomic saves, the latest checkpoint, resume with ``weights_only``
  loading and a check that the checkpoint belongs to the same configuration, leftovers of a
  killed write removed;
* :func:`check_losses`, which stops a diverging run at its first non-finite loss.

The ground floor of the networks: it imports nothing of diffmem but its checks and file
writes (the text-to-image loop, which reads the paper's penalty, is
:mod:`diffmem.finetune`).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffmem._checks import fail
from diffmem.io import atomic_write_bytes, remove_partial_files

#: Share of the EMA still on the initialisation above which training warns.
EMA_INIT_WARNING = 0.05


def decay_from_half_life(half_life: float) -> float:
    """Per-step decay ``beta = 0.5^(1/h)`` of an EMA with half-life ``h`` steps (``h = 0``:
    ``beta = 0``, the raw weights)."""
    h = float(half_life)
    if not math.isfinite(h) or h < 0:
        raise fail("ema_half_life", "a number of steps >= 0", half_life)
    return 0.0 if h == 0 else 0.5 ** (1 / h)


def half_life_from_decay(decay: float) -> float:
    """Half-life ``h = ln(1/2) / ln(beta)`` in steps of an EMA with per-step decay ``beta``
    (``beta = 0``: 0); :func:`decay_from_half_life` inverts it exactly for the decays used here."""
    d = float(decay)
    if not 0 <= d < 1:
        raise fail("ema_decay", "a number in [0, 1)", decay)
    return 0.0 if d == 0 else math.log(0.5) / math.log(d)


def ema_init_share(decay: float, steps: int) -> float:
    """Weight ``beta^steps`` of the initialisation in an EMA of the weights after ``steps``
    updates; warns when it exceeds :data:`EMA_INIT_WARNING`."""
    share = decay**steps
    if share > EMA_INIT_WARNING:
        warnings.warn(
            f"EMA half-life {half_life_from_decay(decay):.0f} steps (decay {decay}) over {steps} "
            f"steps: {100 * share:.0f}% of the EMA weights is still the initialisation; "
            "shorten the half-life (for example to steps / 15) or evaluate the raw weights",
            stacklevel=4)
    return share


class EMA:
    """An exponential moving average of ``model``'s parameters: a frozen copy updated by
    ``ema <- beta ema + (1 - beta) w`` (``Tensor.lerp_``) after every optimizer step, with
    ``beta = 0.5^(1/half_life)``."""

    def __init__(self, model: nn.Module, half_life: float, steps: int) -> None:
        self.decay = decay_from_half_life(half_life)
        self.half_life = float(half_life)
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.init_share = ema_init_share(self.decay, steps)
        self._pairs = list(zip(self.model.parameters(), model.parameters(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        """One averaging step towards the current weights."""
        weight = 1 - self.decay
        for avg, w in self._pairs:
            avg.lerp_(w, weight)


class Checkpoints:
    """Checkpoints ``folder/step_000000123.pt`` of one training configuration (its
    ``fingerprint``): written atomically, loaded with ``torch.load(weights_only=True)``.
    ``keep`` bounds how many are kept (the newest; ``None`` keeps all). Creating it removes
    the temporary files a killed write left behind."""

    def __init__(self, folder: Path | None, fingerprint: str, keep: int | None = None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.fingerprint = fingerprint
        self.keep = keep
        if self.folder is not None and self.folder.is_dir():
            remove_partial_files(self.folder)

    def path(self, step: int) -> Path:
        assert self.folder is not None
        return self.folder / f"step_{step:09d}.pt"

    def all(self) -> list[Path]:
        """Every checkpoint in the folder, oldest step first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("step_*.pt"))

    def latest(self, max_step: int | None = None) -> Path | None:
        """The checkpoint with the largest step, at most ``max_step`` when given (``None`` if
        there is none)."""
        files = [f for f in self.all()
                 if max_step is None or int(f.stem.removeprefix("step_")) <= max_step]
        return files[-1] if files else None

    def load_latest(self, device: torch.device | str = "cpu",
                    max_step: int | None = None) -> dict[str, Any] | None:
        """The latest checkpoint's state (of a step at most ``max_step``: a run resumed with
        fewer steps than an earlier one must not take a network trained longer), or ``None``
        (with a warning) when there is none. Raises ``ValueError`` for an unreadable file or
        another configuration's checkpoint."""
        path = self.latest(max_step)
        if path is None:
            warnings.warn(f"--resume: no checkpoint in {self.folder}; training from step 0",
                          stacklevel=4)
            return None
        state = load_checkpoint(path, device)
        if state.get("fingerprint") != self.fingerprint:
            raise fail("checkpoint", f"a checkpoint of this configuration ({self.fingerprint})",
                       f"{path} from configuration {state.get('fingerprint')}")
        return state

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write ``state`` (with the fingerprint and step) atomically, then drop the oldest
        checkpoints beyond ``keep``."""
        if self.folder is None:
            return
        buf = io.BytesIO()
        torch.save({**state, "fingerprint": self.fingerprint, "step": step}, buf)
        atomic_write_bytes(self.path(step), buf.getvalue())
        if self.keep is not None:
            for old in self.all()[: -self.keep]:
                old.unlink()


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; a corrupt or foreign file raises
    ``ValueError`` naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise fail("checkpoint", "a readable diffmem checkpoint",
                   f"{path} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise fail("checkpoint", "a diffmem checkpoint (a dict with a step)", str(path))
    return state


def check_losses(losses: Tensor | float, step: int, lr: float,
                 last_checkpoint: Path | None) -> None:
    """Stop a diverging run: raise ``ValueError`` naming the step and the learning rate at
    the first non-finite loss (the last checkpoint on disk is left as it is)."""
    ok = bool(torch.isfinite(losses).all()) if isinstance(losses, Tensor) else math.isfinite(
        losses)
    if not ok:
        kept = f"; the last checkpoint, {last_checkpoint}, is kept" if last_checkpoint else ""
        raise fail("lr", "a learning rate at which training stays finite",
                   f"{lr} (the loss became non-finite at step {step}{kept})")


def restore_rng(generator: torch.Generator, state: Tensor) -> None:
    """Set ``generator`` to a saved state (moved to the generator's device kind)."""
    generator.set_state(state.to(generator.get_state().device))


def fingerprint(config: dict[str, Any], *data: Tensor | None) -> str:
    """A 16-hex-digit hash of a training configuration (JSON, sorted keys) and its data: a
    checkpoint resumes only a run with the same fingerprint."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for part in data:
        if part is not None:
            h.update(part.detach().to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
