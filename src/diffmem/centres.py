"""Where a training set lives when the mixture kernel streams it.

A :class:`Centres` holds the training points ``y_n`` of this process and hands them to
:func:`diffmem.mixture.gaussian_mixture` in chunks, centred by the training mean ``c``
(``y_n - c``: centring shrinks ``|y|`` and so the round-off of matrix-product distances):

* in memory: a tensor ``(N, *data_shape)`` (a centred copy is cached per dtype and device);
* from disk: a numpy array or memory-map (``np.load(path, mmap_mode="r")``), a path to a
  ``.npy`` file, or a list of ``.npy`` shards (paths or arrays, concatenated in order), read
  chunk by chunk and never loaded whole: memory stays ``O(chunk x d)`` whatever ``N``;
* stored in ``float16`` or ``bfloat16`` (``storage=``), with every chunk converted to the
  float32/float64 of the queries before any arithmetic (the storage rounds each coordinate to
  a relative ``2^-11`` (float16) or ``2^-8`` (bfloat16); nothing else changes);
* split over the processes of a ``torch.distributed`` group (``process_group=``): each process
  holds a contiguous block of the training set, in rank order (block sizes may differ and may
  be 0); the block's global offset and the global mean are agreed with collectives, and the
  kernel merges the per-block results exactly (:mod:`diffmem.mixture`).

Streamed and in-memory sources give bit-identical results: the chunks are converted, centred
and reduced by the same operations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, positive_int

#: Values (rows x coordinates) per chunk when a source is read whole, for its mean,
#: finiteness, norms, covariance or a copy test: 2^22 (32 MB in float64) whatever the
#: dimension, so that a scan's memory does not grow with the rows' size.
SCAN_VALUES = 1 << 22


def scan_rows(row_size: int) -> int:
    """Rows per scanning chunk of rows of ``row_size`` values: ``max(1, 2^22 // row_size)``."""
    return max(1, SCAN_VALUES // max(1, int(row_size)))


#: Storage dtypes that may hold a training set (computation is float32 or float64).
STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}

TrainingData = Any  # Tensor | np.ndarray | str | Path | Sequence[str | Path | np.ndarray]


def _group_info(group: Any) -> tuple[int, int]:
    """``(rank, world size)`` of a process group (``(0, 1)`` without one)."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise fail("process_group", "a group of an initialised torch.distributed run",
                   "torch.distributed is not initialised")
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(t: Tensor, group: Any, op: str = "sum") -> Tensor:
    """``t`` reduced over the group in place (``sum``, ``max`` or ``min``); unchanged
    without a group. Reduces on the CPU for gloo groups."""
    if group is None:
        return t
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    work = _backend_tensor(t, group)
    dist.all_reduce(work, op=ops[op], group=group)
    if work is not t:
        t.copy_(work.to(t.device))
    return t


def all_gather(t: Tensor, group: Any, dim: int = 0) -> Tensor:
    """Concatenate ``t`` from every rank along ``dim`` in rank order (sizes along ``dim`` may
    differ between ranks); ``t`` itself without a group."""
    if group is None:
        return t
    import torch.distributed as dist

    _, world = _group_info(group)
    size = torch.tensor([t.shape[dim]], dtype=torch.long)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, _backend_tensor(size, group), group=group)
    longest = max(int(s) for s in sizes)
    pad = list(t.shape)
    pad[dim] = longest - t.shape[dim]
    padded = torch.cat([t, torch.zeros(pad, dtype=t.dtype, device=t.device)], dim)
    work = _backend_tensor(padded.contiguous(), group)
    parts = [torch.empty_like(work) for _ in range(world)]
    dist.all_gather(parts, work, group=group)
    return torch.cat([p.to(t.device).narrow(dim, 0, int(s)) for p, s in zip(parts, sizes,
                                                                            strict=True)], dim)


def _backend_tensor(t: Tensor, group: Any) -> Tensor:
    """``t`` on a device the group's backend can reduce on (CPU for gloo)."""
    import torch.distributed as dist

    if dist.get_backend(group) == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def _from_numpy(a: np.ndarray) -> Tensor:
    """A tensor viewing ``a`` (a read-only memory-map is only ever read through it)."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def open_npy(path: str | Path, name: str) -> np.ndarray:
    """The ``.npy`` file at ``path`` memory-mapped read-only (argument ``name`` in errors)."""
    p = Path(path)
    if not p.is_file():
        raise fail(name, "an existing .npy file", str(p))
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise fail(name, "a readable .npy file", f"{p} ({err})") from err


def _as_arrays(data: TrainingData) -> list[Any] | None:
    """Numpy arrays (memory-maps for paths) of a streamed source, or ``None`` for a tensor."""
    if isinstance(data, Tensor):
        return None
    items = list(data) if isinstance(data, list | tuple) else [data]
    if not items:
        raise fail("train", "a tensor, an array, a .npy path or a non-empty list of shards",
                   "an empty list")
    arrays = []
    for item in items:
        if isinstance(item, str | Path):
            item = open_npy(item, "train")
        if isinstance(item, Tensor):
            item = item.detach().cpu().numpy()
        if not isinstance(item, np.ndarray):
            raise fail("train", "a tensor, a numpy array or memory-map, a .npy path, or a list "
                       "of those", type(item).__name__)
        if item.dtype.kind != "f":
            raise fail("train", "floating-point values", f"dtype {item.dtype}")
        arrays.append(item)
    shape = arrays[0].shape[1:]
    for a in arrays:
        if a.ndim < 2 or a.shape[1:] != shape:
            raise fail("train", f"shards of shape (n, *{tuple(shape)})",
                       f"a shard of shape {a.shape}")
    return arrays


class Centres:
    """This process's block of a training set, streamed in chunks centred by the global
    training mean. ``data`` is a tensor ``(N, *data_shape)``, a numpy array or memory-map, a
    ``.npy`` path, or a list of shards; ``storage`` an optional dtype name to hold it in
    (``'float16'``, ``'bfloat16'``, ...); ``process_group`` a ``torch.distributed`` group when
    the training set is split over processes (this process holds the rows
    ``start .. start + n - 1`` of ``n_total``)."""

    def __init__(self, data: TrainingData, *, storage: str | None = None,
                 process_group: Any = None, name: str = "train") -> None:
        self.group = process_group
        self.rank, self.world = _group_info(process_group)
        self._arrays = _as_arrays(data)
        if storage is not None and storage not in STORAGE:
            raise fail("storage", f"one of {sorted(STORAGE)}", repr(storage))
        self.storage = None if storage is None else STORAGE[storage]
        if self._arrays is None:
            if not data.is_floating_point():
                raise fail(name, "a floating-point tensor", data.dtype)
            if data.dim() < 2:
                raise fail(name, "a tensor of shape (N, *data_shape) with at least 2 "
                           "dimensions", f"shape {tuple(data.shape)}")
            flat = data.flatten(1)
            self._tensor: Tensor | None = flat if self.storage is None else flat.to(self.storage)
            self.data_shape = tuple(data.shape[1:])
            self.n = flat.shape[0]
            self.source_dtype = data.dtype
        else:
            self._tensor = None
            self.data_shape = tuple(self._arrays[0].shape[1:])
            self._bounds = np.cumsum([0] + [a.shape[0] for a in self._arrays])
            self.n = int(self._bounds[-1])
            self.source_dtype = torch.from_numpy(np.zeros(0, self._arrays[0].dtype)).dtype
        self.d = int(math.prod(self.data_shape))
        sizes = torch.zeros(self.world, dtype=torch.long)
        sizes[self.rank] = self.n
        all_reduce(sizes, self.group)
        self.sizes = sizes.tolist()
        self.start = int(sum(self.sizes[: self.rank]))
        self.n_total = int(sum(self.sizes))
        if self.n_total == 0:
            raise fail(name, "at least one training point", "an empty set (N = 0)")
        self.offset, self._raw_sq, self._norm_bound = self._scan(name)
        self._centred_sq: Tensor | None = None
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        self._raw: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._sqnorm: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    # --- reading --------------------------------------------------------------------------
    @property
    def streamed(self) -> bool:
        """True when chunks are converted as they are read (disk or compact storage)."""
        return self._arrays is not None or self.storage is not None

    def _rows(self, lo: int, hi: int, copy: bool = True) -> Tensor:
        """Rows ``lo:hi`` of this block as stored (flattened, no conversion); a memory-map is
        copied unless ``copy`` is False (then the tensor views the read-only map)."""
        if self._tensor is not None:
            return self._tensor[lo:hi]
        assert self._arrays is not None
        parts = []
        for k, a in enumerate(self._arrays):
            a_lo, a_hi = int(self._bounds[k]), int(self._bounds[k + 1])
            if a_hi <= lo or a_lo >= hi:
                continue
            view = a[max(lo, a_lo) - a_lo: min(hi, a_hi) - a_lo]
            block = np.array(view) if copy or not view.flags.c_contiguous else np.asarray(view)
            parts.append(_from_numpy(block.reshape(block.shape[0], self.d)))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out if self.storage is None else out.to(self.storage)

    def _scan(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """One pass with matrix products (elementwise passes are several times slower): the
        global mean ``c`` (column sums), every value checked finite, the squared norms
        ``|y_n|^2`` (float64, from sums in the data's precision) and the norm that bounds
        the round-off of matrix products on the uncentred rows, ``max |y_n| + |c|``."""
        work = self._work_dtype()
        total = torch.zeros(self.d, dtype=torch.float64)
        sq = torch.empty(self.n, dtype=torch.float64)
        step = scan_rows(self.d)
        for lo in range(0, self.n, step):
            hi = min(self.n, lo + step)
            rows = self._rows(lo, hi, copy=False).to(work)
            sums = torch.ones(hi - lo, dtype=work, device=rows.device) @ rows
            norms = torch.einsum("ij,ij->i", rows, rows)
            if not bool(torch.isfinite(sums).all() and torch.isfinite(norms).all()):
                if not bool(torch.isfinite(rows).all()):
                    raise fail(name, "finite values (no NaN or inf)", "non-finite entries")
                raise fail(name, f"values whose squares are finite in {work}",
                           "values too large")
            total += sums.to(torch.float64).cpu()
            sq[lo:hi] = norms.to(torch.float64).cpu()
        all_reduce(total, self.group)
        mean = total / self.n_total
        top = sq.max(0, keepdim=True).values if self.n else torch.zeros(1, dtype=torch.float64)
        bound = all_reduce(top.sqrt(), self.group, "max") + mean.norm()
        return mean, sq, bound

    def _work_dtype(self) -> torch.dtype:
        return torch.float64 if self.source_dtype == torch.float64 else torch.float32

    @property
    def _sqnorm64(self) -> Tensor:
        """Squared norms of the centred rows ``|y_n - c|^2 = |y_n|^2 - 2 y_n.c + |c|^2``
        (float64), computed on first use by a second pass (only the mixture kernel and
        torch's matrix products need them; a faiss search does not)."""
        if self._centred_sq is None:
            work, mean, sq = self._work_dtype(), self.offset, self._raw_sq
            step = scan_rows(self.d)
            for lo in range(0, self.n, step):
                hi = min(self.n, lo + step)
                rows = self._rows(lo, hi, copy=False).to(work)
                cross = (rows @ mean.to(dtype=work, device=rows.device)).to(torch.float64).cpu()
                sq[lo:hi] += float(mean @ mean) - 2 * cross
            self._centred_sq = sq.clamp_min_(0)
        return self._centred_sq

    def centred(self, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """The whole block centred, in ``like``'s dtype and device, with its squared norms
        (cached); ``None`` for streamed sources."""
        if self.streamed:
            return None
        key = (like.dtype, like.device)
        if key not in self._cache:
            assert self._tensor is not None
            flat = self._tensor.to(device=like.device)
            centred = flat.to(like.dtype) - self.offset.to(device=like.device,
                                                            dtype=like.dtype)
            self._cache[key] = (centred, centred.pow(2).sum(1))
        return self._cache[key]

    def chunk(self, lo: int, hi: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Centred rows ``lo:hi`` of this block in ``like``'s dtype and device, with their
        squared norms."""
        cached = self.centred(like)
        if cached is not None:
            return cached[0][lo:hi], cached[1][lo:hi]
        rows = self._rows(lo, hi).to(device=like.device)
        y = rows.to(like.dtype) - self.offset.to(device=like.device, dtype=like.dtype)
        return y, y.pow(2).sum(1)

    def chunks(self, step: int, like: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(lo, centred rows lo:lo+step, their squared norms)`` over this block."""
        for lo in range(0, self.n, step):
            y, yy = self.chunk(lo, min(self.n, lo + step), like)
            yield lo, y, yy

    @property
    def raw_shift(self) -> Tensor:
        """``c``: the uncentred rows of :meth:`raw_chunk` are ``y_n = (y_n - c) + c``."""
        return self.offset

    def raw_chunk(self, lo: int, hi: int, like: Tensor,
                  out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Uncentred rows ``lo:hi`` in ``like``'s dtype and device without a copy where the
        storage allows (an in-memory tensor of that dtype, a float memory-map of it), and
        the squared norms of the centred rows ``|y_n - c|^2`` (computed once, in float64).
        Rows that must be converted are written into ``out`` (at least ``hi - lo`` rows of
        ``like``'s dtype and device) when one is given, else into a new tensor."""
        key = (like.dtype, like.device)
        if key not in self._sqnorm:
            self._sqnorm[key] = self._sqnorm64.to(dtype=like.dtype, device=like.device)
        if not self.streamed:
            rows = self._raw_tensor(like)[lo:hi]
        else:
            rows = self._rows(lo, hi, copy=False)
            if rows.dtype != like.dtype or rows.device != like.device:
                rows = rows.to(dtype=like.dtype, device=like.device) if out is None else \
                    out[: hi - lo].copy_(rows)
        return rows, self._sqnorm[key][lo:hi]

    def converts(self, like: Tensor) -> bool:
        """True when streamed rows are converted to ``like``'s dtype or device as they are
        read (half-precision storage, a memory-map of another dtype, another device)."""
        stored = self.storage or self.source_dtype
        where = self._tensor.device if self._tensor is not None else torch.device("cpu")
        return self.streamed and (stored != like.dtype or where != like.device)

    def float32_rows(self) -> np.ndarray | None:
        """This block's uncentred rows ``(n, d)`` as one C-contiguous float32 CPU array
        viewing the storage (an in-memory float32 tensor, one float32 memory-map), or
        ``None`` where that would need a copy (read only)."""
        if self.storage is not None:
            return None
        if self._tensor is not None:
            t = self._tensor
            ok = t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
            return t.numpy() if ok else None
        assert self._arrays is not None
        if len(self._arrays) != 1:
            return None
        a = self._arrays[0]
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            return None
        return np.asarray(a).reshape(self.n, self.d)

    def raw_chunks(self, step: int, like: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(lo, uncentred rows lo:lo+step, centred squared norms)`` over this block, as
        :meth:`raw_chunk`. Rows that must be converted (half-precision storage, a
        memory-map of another dtype or device) are converted into one buffer reused from
        chunk to chunk (a fresh tensor per chunk costs the page faults of its allocation, as
        much again as the conversion): a chunk is valid until the next one is drawn."""
        out = torch.empty(min(step, self.n), self.d, dtype=like.dtype, device=like.device) \
            if self.converts(like) else None
        for lo in range(0, self.n, step):
            y, yy = self.raw_chunk(lo, min(self.n, lo + step), like, out)
            yield lo, y, yy

    def _raw_tensor(self, like: Tensor) -> Tensor:
        """The in-memory block, uncentred, in ``like``'s dtype and device (cached)."""
        assert self._tensor is not None
        key = (like.dtype, like.device)
        if key not in self._raw:
            self._raw[key] = self._tensor.to(dtype=like.dtype, device=like.device)
        return self._raw[key]

    def take(self, index: Tensor, like: Tensor) -> Tensor:
        """Centred rows at local ``index`` (any shape), shape ``(*index.shape, d)``."""
        cached = self.centred(like)
        if cached is not None:
            return cached[0][index]
        return self.take_raw(index, like) - self.offset.to(dtype=like.dtype,
                                                           device=like.device)

    def take_raw(self, index: Tensor, like: Tensor) -> Tensor:
        """Uncentred rows at local ``index`` (any shape), shape ``(*index.shape, d)``."""
        if not self.streamed:
            return self._raw_tensor(like)[index.to(like.device)]
        flat = index.reshape(-1).cpu()
        uniq, inverse = torch.unique(flat, return_inverse=True)
        if self._tensor is not None:
            rows = self._tensor[uniq.to(self._tensor.device)]
        else:
            assert self._arrays is not None
            parts = [torch.empty(0, self.d, dtype=self.source_dtype)]
            for k, a in enumerate(self._arrays):  # one fancy-indexed read per shard
                a_lo, a_hi = int(self._bounds[k]), int(self._bounds[k + 1])
                sel = uniq[(uniq >= a_lo) & (uniq < a_hi)] - a_lo
                if sel.numel():
                    block = np.array(a[sel.numpy()])
                    parts.append(torch.from_numpy(block.reshape(block.shape[0], self.d)))
            rows = torch.cat(parts)
            rows = rows if self.storage is None else rows.to(self.storage)
        rows = rows.to(device=like.device, dtype=like.dtype)
        return rows[inverse.to(like.device)].reshape(*index.shape, self.d)

    def raw_norm_max(self, like: Tensor) -> Tensor:
        """``max |y_n| + |c|`` over every process: the norm in the round-off bound of
        matrix products on uncentred rows with the precomputed centred norms."""
        return self._norm_bound[0].to(dtype=like.dtype, device=like.device)

    def read(self, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi`` of this block as stored (uncentred), ``(rows, *data_shape)``."""
        return self._rows(lo, hi).reshape(hi - lo, *self.data_shape)

    def stored_chunks(self, step: int | None = None,
                      dtype: torch.dtype = torch.float64) -> Iterator[Tensor]:
        """This block's rows as stored (uncentred) in chunks ``(rows, *data_shape)`` of
        ``step`` rows (default :func:`scan_rows`: a bounded number of values)."""
        step = scan_rows(self.d) if step is None else step
        for lo in range(0, self.n, step):
            hi = min(self.n, lo + step)
            yield self._rows(lo, hi).to(dtype).reshape(hi - lo, *self.data_shape)

    def to_tensor(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """This block as one in-memory tensor ``(n, *data_shape)`` (uncentred)."""
        return self._rows(0, self.n).to(dtype).reshape(self.n, *self.data_shape)

    def __repr__(self) -> str:
        where = "memory" if self._arrays is None else f"{len(self._arrays)} array(s)"
        return (f"Centres(n={self.n} of {self.n_total}, data_shape={self.data_shape}, {where}"
                + (f", storage={self.storage}" if self.storage is not None else "")
                + (f", rank {self.rank} of {self.world}" if self.group is not None else "")
                + ")")


def as_centres(data: TrainingData | Centres, **kw: Any) -> Centres:
    """``data`` as a :class:`Centres` (unchanged when it already is one)."""
    return data if isinstance(data, Centres) else Centres(data, **kw)


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous block ``[lo, hi)`` of ``n`` rows that ``rank`` of ``world`` holds
    (the first ``n % world`` ranks hold one more row)."""
    positive_int("world", world)
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)
