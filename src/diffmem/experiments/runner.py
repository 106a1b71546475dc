"""Running many experiments at once: :func:`run_all` runs them in order, or in worker
processes that share the cores (``diffmem reproduce --jobs``), each looked up by name in the
registry (so this module sits above :mod:`diffmem.experiments`, the registry, which sits above
every experiment and :mod:`diffmem.experiments.base`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffmem._checks import fail
from diffmem.experiments.base import Experiment, Record, prepare_out, run_experiment


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _worker_init(threads: int) -> None:
    """A ``run_all`` worker: ``threads`` torch threads, and (on Linux) killed with its parent,
    so that a killed ``reproduce`` leaves no process holding an experiment folder's lock."""
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


#: The folder of ``OUT`` where the experiments of one ``run_all`` share the models they train
#: alike (:attr:`diffmem.experiments.base.Context.shared`).
SHARED = "shared-training"


def _run_task(task: tuple[str, Path, dict[str, Any], int, str, bool, Path]) -> Record:
    """Run a registered experiment, named (its steps may be lambdas, which do not pickle)."""
    from diffmem.experiments import get_experiment

    name, out_dir, params, seed, device, resume, shared = task
    return run_experiment(get_experiment(name), out_dir, params, seed=seed, device=device,
                          progress=False, resume=resume, shared=shared)


def shared_folder(out_dir: Path, resume: bool) -> Path:
    """``OUT/SHARED``, emptied unless ``resume`` (a fresh run trains afresh)."""
    import shutil

    folder = prepare_out(out_dir) / SHARED
    if not resume and folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_all(exps: Sequence[Experiment], out_dir: Path, params: Mapping[str, dict[str, Any]],
            *, jobs: int = 1, seed: int = 0, device: str = "cpu", progress: bool = True,
            resume: bool = False, process_group: Any = None) -> Iterator[Record]:
    """Run ``exps`` (each with ``params[name]``) and yield each :class:`Record` as soon as its
    run is done. With ``jobs > 1`` the experiments run in that many worker processes, longest
    first (:attr:`Experiment.cost`), each with ``cores // jobs`` torch threads and without
    its own progress bars; every experiment is seeded on its own, so the results do not
    depend on the order. A model two experiments train alike is trained once, in
    ``OUT/SHARED`` (:func:`shared_folder`), and loaded by the other (who waits for it if it is
    being trained). Workers look the experiments up by name in the registry. A failing
    experiment stops the others (its error is raised)."""
    if jobs < 1:
        raise fail("--jobs", "an integer >= 1", jobs)
    shared = shared_folder(out_dir, resume) if process_group is None else None
    if jobs == 1 or len(exps) <= 1 or process_group is not None:
        for exp in exps:
            yield run_experiment(exp, out_dir, params[exp.name], seed=seed, device=device,
                                 progress=progress, resume=resume, process_group=process_group,
                                 shared=shared)
        return
    import multiprocessing as mp

    order = sorted(exps, key=lambda e: -e.cost)
    jobs = min(jobs, len(order))
    threads = max(1, available_cores() // jobs)
    tasks = [(e.name, Path(out_dir), params[e.name], seed, device, resume, shared)
             for e in order]
    pool = mp.get_context("spawn").Pool(jobs, initializer=_worker_init, initargs=(threads,))
    try:
        yield from pool.imap_unordered(_run_task, tasks, chunksize=1)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
