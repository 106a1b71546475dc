"""Neighbour search: the ``k`` nearest training items of every sample, exactly (streamed
matrix products, the two nearest certified) or with a faiss index, and the recall of an
approximate index against exact search."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.audit.inputs import Rows, progress_batches
from diffmem.centres import Centres
from diffmem.metrics import knn

INDEXES = ("exact", "faiss-flat", "faiss-ivf")
#: Samples per exact-search batch when faiss shortlists the candidates.
FAISS_BATCH = 8192
#: Samples whose IVF neighbours are checked against exact search.
RECALL_SAMPLES = 200


def shortlist_kernel() -> str:
    """Whose matrix products shortlist the exact search's candidates: faiss's float32
    kernel when faiss is installed (1.2-1.3x torch's rate on the CPUs measured, see
    ``benchmarks/bench_audit.py``), else torch's. Certification makes the result the same."""
    import importlib.util

    return "faiss" if importlib.util.find_spec("faiss") is not None else "torch"


def exact_search(samples: Rows, train: Centres, k: int, batch: int,
                  chunk_size: int, progress: bool) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest training points of every sample (streamed over both sets): the two
    nearest certified exact (d1, d2 and which item is nearest), the others with their
    matrix-product distances (they only enter the calibrated distance's mean)."""
    dist, idx = [], []
    kernel = shortlist_kernel()
    if kernel == "faiss":  # each training chunk read once for many samples (faiss blocks
        batch = max(batch, FAISS_BATCH)  # its products itself; results are O(batch k))
    for x in progress_batches(samples, batch, progress, "nearest neighbours"):
        d, i = knn(x, train, k, chunk_size=chunk_size, exact=2, shortlist=kernel)
        dist.append(d.cpu())
        idx.append(i.cpu())
    return torch.cat(dist), torch.cat(idx)


def faiss_search(samples: Rows, train: Centres, k: int, batch: int, kind: str,
                  seed: int, progress: bool) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``k`` nearest by a faiss index (``IndexFlatL2`` or ``IndexIVFFlat`` with
    ``nlist = 4 sqrt(N)`` lists, ``nprobe = 16``); Euclidean distances."""
    try:
        import faiss
    except ImportError as err:
        raise fail("index", "faiss installed for --index faiss-flat/faiss-ivf (pip install "
                   "'diffmem[faiss]')", kind) from err
    d = train.d
    info: dict[str, Any] = {"library": f"faiss {faiss.__version__}"}
    if kind == "faiss-flat":
        index = faiss.IndexFlatL2(d)
    else:
        nlist = max(1, min(train.n, int(4 * math.sqrt(train.n))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        gen = np.random.default_rng(seed)
        pick = np.sort(gen.choice(train.n, size=min(train.n, 256 * nlist), replace=False))
        sample = train.take_raw(torch.from_numpy(pick), torch.empty(0)).numpy()
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = min(nlist, 16)
        info.update(nlist=nlist, nprobe=index.nprobe)
    for rows in train.stored_chunks(dtype=torch.float32):
        index.add(np.ascontiguousarray(rows.reshape(rows.shape[0], d).numpy()))
    dist, idx = [], []
    for x in progress_batches(samples, batch, progress, "faiss search"):
        sq, ii = index.search(np.ascontiguousarray(x.reshape(x.shape[0], d).float().numpy()),
                              k)
        dist.append(torch.from_numpy(np.sqrt(np.maximum(sq, 0)).astype(np.float64)))
        idx.append(torch.from_numpy(ii.astype(np.int64)))
    return torch.cat(dist), torch.cat(idx), info


def nearest(space_rows: Rows, space_train: Centres, k: int, index: str,
             batch_size: int, chunk_size: int, seed: int, progress: bool
             ) -> tuple[Tensor, Tensor, dict[str, Any], float | None]:
    """The ``k`` nearest training points of every sample (distances, indices), how they were
    found, and the IVF's measured recall (``None`` for the other indexes)."""
    search: dict[str, Any] = {"k": k}
    if index == "exact":
        dist, idx = exact_search(space_rows, space_train, k, batch_size, chunk_size, progress)
        search["method"] = ("exact: streamed matrix products; the two nearest re-ranked and "
                            "certified exact, the rest of the k within the product bound")
        search["matrix_products"] = shortlist_kernel()
        return dist, idx, search, None
    dist, idx, info = faiss_search(space_rows, space_train, k, batch_size, index, seed,
                                   progress)
    search.update(info)
    measured = (recall(space_rows, space_train, idx, k, seed, chunk_size)
                if index == "faiss-ivf" else None)
    return dist, idx, search, measured


def recall(samples: Rows, train: Centres, found: Tensor, k: int, seed: int,
            chunk_size: int) -> dict[str, Any]:
    """Recall of approximate neighbours against exact search on a random subsample:
    ``recall@1`` (the nearest found) and ``recall@k`` (overlap of the ``k`` sets)."""
    gen = np.random.default_rng(seed)
    pick = np.sort(gen.choice(samples.n, size=min(samples.n, RECALL_SAMPLES), replace=False))
    x = samples.take(pick)
    _, exact = knn(x, train, k, chunk_size=chunk_size)
    approx = found[torch.from_numpy(pick)]
    at1 = (approx[:, 0] == exact[:, 0]).to(torch.float64).mean()
    overlap = [len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact,
                                                                        strict=True)]
    return {"samples_checked": int(len(pick)), "recall_at_1": float(at1),
            f"recall_at_{k}": float(np.mean(overlap))}
