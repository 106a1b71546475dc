"""``diffmem list``, ``diffmem run NAME`` and ``diffmem reproduce``: the paper's experiments.

Launched by ``torchrun``, the closed-form experiments split their training set over the
launch's processes; process 0 prints and writes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from diffmem.cli.app import app, leader, process_group, refuse
from diffmem.cli.options import OUT, QUICK, RESUME, Run, with_groups
from diffmem.experiments import REGISTRY, get_experiment
from diffmem.experiments.base import Record, resolve_params, run_experiment

_MARK = {"confirmed": "OK", "not_reproduced": "NO", "inconclusive": "??"}


def echo_record(rec: Record) -> None:
    """One experiment's verdicts, its time and where its files are."""
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
@with_groups
def run(
    name: str = typer.Argument(..., help="Experiment name (see `diffmem list`)."),
    out: Path = OUT,
    quick: bool = QUICK,
    how: Run = None,  # type: ignore[assignment]
    set_: list[str] = typer.Option(  # noqa: B008
        [], "--set", help="Override a parameter: --set key=value (repeatable; lists as "
                          "a,b,c or \\[a, b, c])."),
    config: Path | None = typer.Option(  # noqa: B008
        None, "--config", help="TOML file of parameters (top-level keys or a [NAME] table)."),
    resume: bool = RESUME,
) -> None:
    """Run one experiment and write OUT/NAME/metrics.json, config.json and figures."""
    try:
        group, device = process_group(how.device)
        exp = get_experiment(name)
        params = resolve_params(exp, quick=quick, config_file=config, overrides=set_)
        rec = run_experiment(exp, out, params, seed=how.seed, device=device,
                             progress=how.progress, resume=resume, process_group=group)
    except ValueError as err:  # ConfigError and the library's input errors
        refuse(str(err))
        return
    if leader(group):
        echo_record(rec)


@app.command("reproduce")
@with_groups
def reproduce(
    out: Path = OUT,
    quick: bool = QUICK,
    how: Run = None,  # type: ignore[assignment]
    only: str | None = typer.Option(  # noqa: B008
        None, "--only", help="Comma-separated subset of experiments (default: all)."),
    jobs: int | None = typer.Option(  # noqa: B008
        None, "--jobs", help="Experiments run at once, in worker processes sharing the "
        "cores (default: one per core on the CPU, 1 on a GPU or under torchrun)."),
    resume: bool = RESUME,
) -> None:
    """Run every registered experiment; write OUT/index.html and OUT/summary.json, updated as
    each experiment is done."""
    from diffmem.report import claim_counts, counts_text, write_report

    try:
        group, device = process_group(how.device)
        exps = _installed(only)
        params = {e.name: resolve_params(e, quick=quick) for e in exps}
        start = time.perf_counter()
        records = _run_all(exps, out, params, jobs, how, device, resume, group, quick, start)
        total = time.perf_counter() - start
    except ValueError as err:  # ConfigError and the library's input errors
        refuse(str(err))
        return
    if not leader(group):
        return
    write_report(out, _in_order(records, exps), dict(REGISTRY), quick=quick, seed=how.seed,
                 total_s=total)
    typer.echo(f"Claims: {counts_text(claim_counts(records))} ({len(records)} experiments, "
               f"{total:.1f} s). Report: {out / 'index.html'}")


def _installed(only: str | None) -> list[Any]:
    """The experiments to run (``--only``, else all): with all, those this installation
    cannot run are skipped, saying so."""
    names = list(REGISTRY) if only is None else [n.strip() for n in only.split(",") if n]
    exps = [get_experiment(n) for n in names]
    if only is None:
        for exp in [e for e in exps if e.missing()]:
            extra = "pipelines" if "transformers" in exp.missing() else "diffusers"
            typer.echo(f"[skipped] {exp.name}: needs {', '.join(exp.missing())} (pip "
                       f"install 'diffmem[{extra}]')")
        exps = [e for e in exps if not e.missing()]
    return exps


def _run_all(exps: list[Any], out: Path, params: dict[str, Any], jobs: int | None, how: Run,
             device: str, resume: bool, group: Any, quick: bool,
             start: float) -> list[Record]:
    """Run ``exps`` (:func:`diffmem.experiments.runner.run_all`), printing each as it ends
    and writing the report after each."""
    from tqdm.auto import tqdm

    from diffmem.experiments.runner import available_cores, run_all
    from diffmem.report import write_report

    if jobs is None:  # run_all refuses a count below 1
        jobs = 1 if group is not None or device != "cpu" else available_cores()
    records: list[Record] = []
    bar = tqdm(total=len(exps), desc="reproduce", unit="experiment",
               disable=not (how.progress and leader(group)))
    for rec in run_all(exps, out, params, jobs=jobs, seed=how.seed, device=device,
                       progress=how.progress and jobs == 1, resume=resume,
                       process_group=group):
        records.append(rec)
        bar.update()
        if not leader(group):
            continue
        with tqdm.external_write_mode():
            echo_record(rec)
        done = {r.name for r in records}
        write_report(out, _in_order(records, exps), dict(REGISTRY), quick=quick,
                     seed=how.seed, total_s=time.perf_counter() - start,
                     pending=[e.name for e in exps if e.name not in done])
    bar.close()
    return records


def _in_order(records: list[Record], exps: list[Any]) -> list[Record]:
    """``records`` in the order of ``exps`` (the registry's), whatever order they ended in."""
    rank = {e.name: i for i, e in enumerate(exps)}
    return sorted(records, key=lambda r: rank[r.name])
