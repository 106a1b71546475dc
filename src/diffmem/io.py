"""Atomic file writes and JSON conversion: an interrupted run never leaves a truncated file."""

from __future__ import annotations

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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
