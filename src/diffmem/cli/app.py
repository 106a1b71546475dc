"""The ``diffmem`` command's application, and what every command does the same way: join a
``torchrun`` launch's process group, agree on the options across its processes, print and
write on process 0 alone, and end on a bad input with the error and exit status 2.

Launched by ``torchrun --nproc-per-node P -m diffmem ...`` (``WORLD_SIZE > 1``), the commands
join the torch.distributed group (gloo on the CPU, NCCL with ``--device cuda``, one GPU per
process); process 0 prints and writes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import typer

from diffmem.parallel import Team

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="diffmem: memorization and regularization in score-based diffusion models "
         "(Baptista et al., arXiv:2501.15785). Each paper experiment is one command.",
)


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


def team_of(device: str, options: dict[str, Any]) -> tuple[Team, str]:
    """This command's :class:`diffmem.parallel.Team` (one process, or a ``torchrun`` group)
    and device; every process must have been given the same ``options`` (the command's
    ``locals()``: its parameters, option groups spread out; checked here, before any work:
    :meth:`Team.agree`)."""
    group, device = process_group(device)
    team = Team.of(group)
    plain = (str, int, float, bool, Path, list, tuple, type(None))
    spread: dict[str, Any] = {}
    for k, v in options.items():
        spread |= dataclasses.asdict(v) if dataclasses.is_dataclass(v) else {k: v}
    team.agree({k: str(v) for k, v in spread.items()
                if isinstance(v, plain) and k not in ("progress", "device")})
    return team, device


def leader(group: Any) -> bool:
    """Whether this process prints and writes (process 0, or the only one)."""
    if group is None:
        return True
    import torch.distributed as dist

    return dist.get_rank(group) == 0


def refuse(message: str) -> None:
    """End the command on a bad input: the error on stderr, exit status 2."""
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


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
