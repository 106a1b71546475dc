"""What an experiment is, how its parameters are set, and how a run is written to disk.

An experiment is a function of a :class:`Context` returning an :class:`Outcome` (its metrics
and a verdict on the paper's claim). :func:`run_experiment` resolves the parameters (defaults,
``--quick`` overrides, a TOML file, ``--set key=value``), runs it and writes
``DIR/NAME/metrics.json``, ``DIR/NAME/config.json`` and the figures, each atomically.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffmem.io import atomic_save_figure, atomic_write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad experiment name, parameter key or value."""


@dataclass
class Context:
    """Everything an experiment needs: resolved ``params``, its output folder, device, seed."""

    name: str
    params: dict[str, Any]
    out: Path
    device: torch.device
    seed: int
    progress: bool = True
    resume: bool = False
    figures: list[str] = field(default_factory=list)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with ``seed + offset`` (noise is drawn on the CPU and moved,
        so the same seed gives the same noise on every device)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def noise(self, n: int, shape: tuple[int, ...], scale: float, offset: int = 0) -> torch.Tensor:
        """``scale * z`` with ``z ~ N(0, I)`` of shape ``(n, *shape)``, float64 on the device."""
        z = torch.randn((n, *shape), generator=self.generator(offset), dtype=torch.float64)
        return (scale * z).to(self.device)

    def bar(self, items: Iterable[Any], desc: str) -> Iterable[Any]:
        """A progress bar over ``items`` (silent when ``progress`` is off)."""
        return tqdm(list(items), desc=f"{self.name}: {desc}", disable=not self.progress,
                    leave=False)

    def save(self, fig: Any, name: str) -> None:
        """Save a figure as ``NAME.png`` in the experiment folder."""
        atomic_save_figure(fig, self.out / f"{name}.png")
        self.figures.append(f"{name}.png")


@dataclass
class Outcome:
    """An experiment's ``metrics`` (written to ``metrics.json``) and its verdict."""

    metrics: dict[str, Any]
    claim_holds: bool
    verdict: str

    @classmethod
    def judged(cls, metrics: dict[str, Any], holds: bool, finding: str) -> Outcome:
        """The outcome whose verdict is ``Confirmed: `` or ``Not confirmed: `` + ``finding``."""
        holds = bool(holds)
        return cls(metrics=metrics, claim_holds=holds,
                   verdict=("Confirmed: " if holds else "Not confirmed: ") + finding)


@dataclass(frozen=True)
class Experiment:
    """A registered experiment."""

    name: str
    summary: str
    claim: str
    defaults: Mapping[str, Any]
    quick: Mapping[str, Any]
    run: Callable[[Context], Outcome]


@dataclass
class Record:
    """What one run produced."""

    name: str
    outcome: Outcome
    params: dict[str, Any]
    figures: list[str]
    elapsed_s: float
    folder: Path


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        inner = _type_name(value[0]) if value else "value"
        return f"list of {inner}"
    return type(value).__name__


def coerce(key: str, raw: Any, default: Any) -> Any:
    """Convert ``raw`` (a string from ``--set`` or a TOML value) to the type of ``default``."""
    expected = _type_name(default)
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"true", "1", "yes"}:
                return True
            if text in {"false", "0", "no"}:
                return False
            raise ValueError
        if isinstance(default, list):
            if isinstance(raw, str):
                text = raw.strip()
                items = json.loads(text) if text.startswith("[") else [
                    p for p in text.split(",") if p.strip()]
            else:
                items = list(raw)
            if not items:
                raise ValueError
            proto = default[0] if default else ""
            return [coerce(key, item, proto) for item in items]
        if isinstance(default, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.strip())
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, str):
            return str(raw)
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    else:
        return raw
    raise ConfigError(f"{key}: expected a value of type {expected}, received {raw!r}")


def resolve_params(
    exp: Experiment,
    quick: bool = False,
    config_file: Path | None = None,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """Defaults, then ``quick`` overrides, then the TOML file (top-level keys or a table named
    after the experiment), then ``key=value`` overrides; unknown keys raise ConfigError."""
    params = dict(exp.defaults)
    if quick:
        params.update(exp.quick)

    def apply(key: str, raw: Any, source: str) -> None:
        if key not in exp.defaults:
            raise ConfigError(f"{source}: unknown key {key!r} for experiment {exp.name!r}; "
                              f"known keys: {', '.join(sorted(exp.defaults))}")
        params[key] = coerce(key, raw, exp.defaults[key])

    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"--config: expected a readable TOML file, received "
                              f"{config_file} ({err})") from err
        table = data.get(exp.name, {k: v for k, v in data.items() if not isinstance(v, dict)})
        for key, raw in table.items():
            apply(key, raw, f"--config {config_file}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected key=value, received {item!r}")
        key, raw = item.split("=", 1)
        apply(key.strip(), raw, "--set")
    return params


def versions() -> dict[str, str]:
    """Versions of diffmem, torch and Python."""
    import diffmem

    return {"diffmem": diffmem.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


def run_experiment(
    exp: Experiment,
    out_dir: Path,
    params: dict[str, Any],
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    resume: bool = False,
) -> Record:
    """Run ``exp`` with resolved ``params`` and write ``out_dir/NAME/{metrics,config}.json``.
    ``resume`` lets experiments that checkpoint (the network ones) continue from
    ``out_dir/NAME/checkpoints``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: expected 'cpu' or an available CUDA device, received "
                          f"{device!r} (torch.cuda.is_available() is False)")
    folder = Path(out_dir) / exp.name
    folder.mkdir(parents=True, exist_ok=True)
    ctx = Context(name=exp.name, params=params, out=folder, device=dev, seed=seed,
                  progress=progress, resume=resume)
    start = time.perf_counter()
    outcome = exp.run(ctx)
    elapsed = time.perf_counter() - start
    metrics = dict(outcome.metrics)
    metrics.update(claim_holds=outcome.claim_holds, verdict=outcome.verdict)
    atomic_write_json(folder / "metrics.json", metrics)
    atomic_write_json(folder / "config.json", {
        "experiment": exp.name, "params": params, "seed": seed, "device": device,
        "versions": versions(), "figures": ctx.figures,
    })
    return Record(name=exp.name, outcome=outcome, params=params, figures=ctx.figures,
                  elapsed_s=elapsed, folder=folder)
