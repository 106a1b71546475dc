"""What an experiment is, how its parameters are set, and how a run is written to disk.

An experiment runs in four visible steps, each a function of its own:

1. ``compute(ctx) -> raw``: the samples and trainings (everything expensive);
2. ``record(ctx, raw) -> Recorded``: the metrics dict (``metrics.json``) and the arrays the
   figures need (``arrays.npz``);
3. ``judge(metrics, params) -> Verdict``: each claim's status, from the recorded metrics only;
4. ``draw(recorded, params) -> {name: figure}``: the figures, from the recorded values only.

:func:`run_experiment` resolves the parameters (defaults, ``--quick`` overrides, a TOML file,
``--set key=value``), runs the steps and writes ``DIR/NAME/metrics.json``, ``config.json``,
``arrays.npz`` and the PNG figures, each atomically, under a lock file; a fresh run removes
what an earlier run left in the folder (stale figures and checkpoints), ``--resume`` keeps
the checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem._checks import fail
from diffmem.io import (
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    jsonable,
    remove_partial_files,
    versions,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: A verdict's three states: the paper's claim holds; a finding that differs from the paper
#: (with its numbers); settings too small to judge.
CONFIRMED, NOT_REPRODUCED, INCONCLUSIVE = "confirmed", "not_reproduced", "inconclusive"
STATUSES = (CONFIRMED, NOT_REPRODUCED, INCONCLUSIVE)
_LABEL = {CONFIRMED: "Confirmed", NOT_REPRODUCED: "Not reproduced",
          INCONCLUSIVE: "Inconclusive"}


class ConfigError(ValueError):
    """A bad experiment name, parameter key or value, output folder or device."""


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as judged by a run: ``status`` (one of :data:`STATUSES`) and
    the ``finding`` with its numbers."""

    claim: str
    status: str
    finding: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise fail("status", f"one of {STATUSES}", repr(self.status))

    @property
    def text(self) -> str:
        return f"{_LABEL[self.status]}: {self.finding}"


def status_of(holds: bool, judgeable: bool = True) -> str:
    """:data:`CONFIRMED` or :data:`NOT_REPRODUCED` by ``holds``; :data:`INCONCLUSIVE` when
    the run cannot judge the claim."""
    if not judgeable:
        return INCONCLUSIVE
    return CONFIRMED if holds else NOT_REPRODUCED


@dataclass(frozen=True)
class Verdict:
    """The judged claims of one run. The run's ``status`` is ``not_reproduced`` if any claim
    is, else ``inconclusive`` if any claim is, else ``confirmed``."""

    claims: tuple[Claim, ...]

    @classmethod
    def of(cls, claim: str, holds: bool, finding: str, judgeable: bool = True) -> Verdict:
        """A verdict on a single claim."""
        return cls((Claim(claim, status_of(holds, judgeable), finding),))

    @property
    def status(self) -> str:
        states = {c.status for c in self.claims}
        for s in (NOT_REPRODUCED, INCONCLUSIVE):
            if s in states:
                return s
        return CONFIRMED

    @property
    def text(self) -> str:
        return " | ".join(c.text for c in self.claims)

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "verdict": self.text,
                "claims": [{"claim": c.claim, "status": c.status, "finding": c.finding}
                           for c in self.claims]}


@dataclass
class Recorded:
    """What a run records: ``metrics`` (written to ``metrics.json``) and ``arrays`` (numpy
    arrays or tensors behind the figures, written to ``arrays.npz``)."""

    metrics: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)

    def array(self, name: str) -> np.ndarray:
        """A recorded array as numpy."""
        value = self.arrays[name]
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)


@dataclass
class Context:
    """Everything ``compute`` and ``record`` need: resolved ``params``, the output folder,
    device, seed, whether to show progress and whether to resume."""

    name: str
    params: dict[str, Any]
    out: Path
    device: torch.device
    seed: int
    progress: bool = True
    resume: bool = False
    process_group: Any = None
    #: A folder the experiments of one ``reproduce`` share: a model that several of them
    #: train alike (same configuration, data and seed) is trained once there and loaded by
    #: the others (``None``: each experiment trains its own).
    shared: Path | None = None

    def closed_form(self, make: Callable[..., Any], train: torch.Tensor, *args: Any,
                    **kw: Any) -> Any:
        """``make(train, *args, **kw)`` (a closed-form score class or factory); under a
        process group with this process's contiguous block of ``train`` and the group."""
        if self.process_group is None:
            return make(train, *args, **kw)
        import torch.distributed as dist

        from diffmem.centres import shard_rows

        lo, hi = shard_rows(train.shape[0], dist.get_world_size(self.process_group),
                            dist.get_rank(self.process_group))
        return make(train[lo:hi], *args, process_group=self.process_group, **kw)

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


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its four steps and parameters."""

    name: str
    summary: str
    claim: str
    defaults: Mapping[str, Any]
    quick: Mapping[str, Any]
    compute: Callable[[Context], Any]
    record: Callable[[Context, Any], Recorded]
    judge: Callable[[Mapping[str, Any], Mapping[str, Any]], Verdict]
    draw: Callable[[Recorded, Mapping[str, Any]], dict[str, Any]]
    #: Whether the closed-form scores may be split over a torch.distributed process group.
    distributed: bool = False
    #: Optional packages the experiment needs (``diffmem reproduce`` skips it without them).
    requires: tuple[str, ...] = ()
    #: Seconds of a ``--quick`` run on one core as last measured: parallel ``reproduce``
    #: starts the longest first.
    cost: float = 5.0
    #: Torch threads the experiment runs with, whatever runs it (``run``, ``reproduce`` alone
    #: or in a worker of ``--jobs``): float reductions split over another number of threads
    #: round otherwise, and a trained model's state would depend on the worker.
    threads: int = 1

    def missing(self) -> list[str]:
        """The packages of :attr:`requires` that are not installed."""
        import importlib.util

        return [m for m in self.requires if importlib.util.find_spec(m) is None]


@dataclass
class Record:
    """What one run produced."""

    name: str
    verdict: Verdict
    metrics: dict[str, Any]
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
    """Convert ``raw`` (a string from ``--set`` or a TOML value) to the type of ``default``.
    Counts (integers whose default is at least 1) must be at least 1."""
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
            value = int(raw) if not isinstance(raw, str) else int(raw.strip())
            if default >= 1 and value < 1:
                raise ConfigError(f"{key}: expected a count >= 1, received {raw!r}")
            return value
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, str):
            return str(raw)
    except ConfigError:
        raise
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
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
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


def check_device(device: str) -> torch.device:
    """The torch device named by ``--device``: ``cpu``, or ``cuda``/``cuda:N`` when CUDA is
    available (``ConfigError`` otherwise)."""
    expected = "'cpu' or an available CUDA device ('cuda', 'cuda:0', ...)"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device: expected {expected}, received {device!r}") from err
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"--device: expected {expected}, received {device!r} "
                          f"(torch.cuda.is_available() is {torch.cuda.is_available()})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device: expected {expected}, received {device!r} "
                          f"({torch.cuda.device_count()} CUDA devices)")
    return dev


def prepare_out(out_dir: Path) -> Path:
    """Create ``out_dir`` (``ConfigError`` when it is a file or cannot be written)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: expected a folder, received {out} (a file)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out: expected a folder that can be created, received {out} "
                          f"({err.strerror})") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: expected a writable folder, received {out} (not writable)")
    return out


class FolderLock:
    """``folder/.lock`` holding the writer's process id, taken with ``O_EXCL``: a second run
    into the same experiment folder is refused while the first is alive (with ``wait``, it
    waits for the first to finish instead, polling every second); a lock left by a process
    that no longer exists is taken over, and the temporary files of a killed writer are
    removed once the lock is held."""

    def __init__(self, folder: Path, wait: bool = False) -> None:
        self.path = Path(folder) / ".lock"
        self.wait = wait

    def __enter__(self) -> FolderLock:
        tries = 0
        while tries < 2:
            tries += 1
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid) and self.wait:
                    time.sleep(1.0)
                    tries = 0
                    continue
                if pid and _alive(pid):
                    raise ConfigError(
                        f"--out: expected an experiment folder no other run is writing, "
                        f"received {self.path.parent} (locked by running process {pid}; "
                        f"wait for it or remove {self.path} if that process is not diffmem)"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            remove_partial_files(self.path.parent)  # what a killed writer left
            return self
        raise ConfigError(f"--out: could not take the lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_folder(folder: Path, keep: set[str]) -> None:
    """Remove every file of ``folder`` whose name is not in ``keep`` (nor the lock)."""
    for entry in folder.iterdir():
        if entry.name not in keep and entry.name != ".lock" and not entry.is_dir():
            entry.unlink()


def _write_arrays(path: Path, arrays: Mapping[str, Any]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor)
                                    else np.asarray(v)) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


#: Files every run writes into its folder, besides its figures and checkpoint folders.
OUTPUT_FILES = ("metrics.json", "config.json", "arrays.npz")


def _rank(group: Any) -> int:
    if group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group)


def run_experiment(
    exp: Experiment,
    out_dir: Path,
    params: dict[str, Any],
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    resume: bool = False,
    process_group: Any = None,
    shared: Path | None = None,
) -> Record:
    """Run ``exp``'s four steps with resolved ``params`` and write ``out_dir/NAME/``:
    ``metrics.json`` (with ``status``, ``verdict`` and the judged ``claims``),
    ``config.json``, ``arrays.npz`` and the figures.

    The folder is locked while the run writes. A fresh run starts from an empty folder but
    for the previous results, which it replaces at the end (their figures included); with
    ``resume``, experiments that checkpoint (the network ones) continue from
    ``out_dir/NAME/checkpoints*``. Temporary files of interrupted writes are removed first.
    ``shared`` is :attr:`Context.shared`.
    With a ``process_group`` (closed-form experiments only) every process computes with its
    block of the training set and process 0 writes the outputs.
    """
    dev = check_device(device)
    if exp.missing():
        raise ConfigError(f"{exp.name}: expected {', '.join(exp.missing())} installed (pip "
                          f"install 'diffmem[diffusers]'), received an environment without it")
    if process_group is not None and not exp.distributed:
        raise ConfigError(f"--nproc-per-node: expected 1 process for {exp.name!r} (only the "
                          "closed-form experiments split their training set over processes), "
                          "received a group of several")
    if _rank(process_group) != 0:
        return _follow(exp, out_dir, params, seed, dev, resume, process_group)
    folder = prepare_out(out_dir) / exp.name
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    with FolderLock(folder):
        remove_partial_files(folder)
        for sub in folder.iterdir():
            if sub.is_dir():
                remove_partial_files(sub)
        if not resume:  # stale checkpoints would block a later --resume
            for entry in folder.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
        ctx = Context(name=exp.name, params=params, out=folder, device=dev, seed=seed,
                      progress=progress, resume=resume, process_group=process_group,
                      shared=shared)
        start = time.perf_counter()
        try:
            with fixed_threads(exp.threads):
                raw = exp.compute(ctx)
                recorded = exp.record(ctx, raw)
                verdict = exp.judge(recorded.metrics, params)
                figures = exp.draw(recorded, params)
        except BaseException:
            if created and not any(e.name != ".lock" for e in folder.iterdir()):
                (folder / ".lock").unlink(missing_ok=True)
                folder.rmdir()
            raise
        elapsed = time.perf_counter() - start
        names = []
        for name, fig in figures.items():
            atomic_save_figure(fig, folder / f"{name}.png")
            names.append(f"{name}.png")
        metrics = {**recorded.metrics, **verdict.as_json()}
        atomic_write_json(folder / "metrics.json", metrics)
        _write_arrays(folder / "arrays.npz", recorded.arrays)
        atomic_write_json(folder / "config.json", {
            "experiment": exp.name, "params": params, "seed": seed, "device": str(dev),
            "versions": versions(), "figures": names,
        })
        # what this run wrote, and its checkpoint folders (a fresh run removed older ones)
        written = set(OUTPUT_FILES) | set(names) | {e.name for e in folder.iterdir()
                                                   if e.is_dir()}
        _clean_folder(folder, keep=written)
    return Record(name=exp.name, verdict=verdict, metrics=jsonable(metrics), params=params,
                  figures=names, elapsed_s=elapsed, folder=folder)


def _follow(exp: Experiment, out_dir: Path, params: dict[str, Any], seed: int,
            dev: torch.device, resume: bool, group: Any) -> Record:
    """What a process other than 0 of a group does: compute (its part of every collective)
    and record, without writing or drawing."""
    ctx = Context(name=exp.name, params=params, out=Path(out_dir) / exp.name, device=dev,
                  seed=seed, progress=False, resume=resume, process_group=group)
    start = time.perf_counter()
    with fixed_threads(exp.threads):
        recorded = exp.record(ctx, exp.compute(ctx))
        verdict = exp.judge(recorded.metrics, params)
    return Record(name=exp.name, verdict=verdict, metrics=jsonable(recorded.metrics),
                  params=params, figures=[], elapsed_s=time.perf_counter() - start,
                  folder=ctx.out)


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Torch runs with ``threads`` threads inside, with the count it had after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
