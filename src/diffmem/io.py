"""Atomic file writes and JSON conversion: an interrupted run never leaves a truncated file,
and a full disk is an error that names the file (never a half-written one)."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def jsonable(value: Any) -> Any:
    """Convert tensors, numpy values, tuples and non-finite floats into plain JSON values
    (``NaN``/``inf`` become the strings ``"nan"``/``"inf"``/``"-inf"``)."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


#: Suffix of the temporary files of atomic writes (``.NAME.XXXX.tmp``).
PARTIAL_SUFFIX = ".tmp"


#: Errors that mean there is no room for the file: no space, quota, file-size limit.
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """A write that found no room: the message names the file and says what to do."""


def disk_full(path: Path | str, err: OSError) -> DiskFullError:
    """The :class:`DiskFullError` for a failed write of ``path`` (``err`` one of ``FULL``)."""
    reason = os.strerror(err.errno) if err.errno is not None else str(err)
    return DiskFullError(err.errno, f"{path}: the disk is full ({reason}); nothing was "
                                    "written there: free some space and run the command again "
                                    "(finished outputs are kept)")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, then rename it over ``path``.
    The file gets the usual permissions, ``0666`` less the umask (``0644`` under the common
    umask 022), not ``mkstemp``'s private ``0600``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in FULL:
            raise disk_full(path, err) from err
        raise


def preallocate(path: Path, size: int) -> None:
    """Reserve ``size`` bytes for the file at ``path`` (a memory-map about to be filled), so
    that a full disk is a :class:`DiskFullError` now, not a crash (SIGBUS) when a page of
    the map is first written. Where the file system cannot reserve space, nothing is done."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in FULL:
            raise disk_full(path, err) from err
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def append_line(path: Path, line: str) -> None:
    """Append one line to a log file (monitor records): a full disk is a
    :class:`DiskFullError`, and a partial line is cut off again so the log stays whole."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as handle:
            handle.write(line.rstrip("\n") + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        with open(path, "a") as handle:
            handle.truncate(size)
        if err.errno in FULL:
            raise disk_full(path, err) from err
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    """Atomically write ``value`` as sorted, indented JSON (byte-identical for equal values)."""
    text = json.dumps(jsonable(value), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode())


def figure_png(fig: Any, dpi: int = 110, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes (laid out, trimmed to its content when ``tight``,
    without a software stamp, so the bytes depend on the figure only); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None,
                metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def atomic_save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    atomic_write_bytes(path, figure_png(fig, dpi))


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder``
    (hidden ``.NAME.*.tmp`` files); returns what was removed."""
    removed = []
    for f in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        if f.is_file():
            f.unlink()
            removed.append(f)
    return removed


def versions() -> dict[str, str]:
    """Versions of diffmem, torch and Python (recorded beside every result)."""
    import diffmem

    return {"diffmem": diffmem.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}
