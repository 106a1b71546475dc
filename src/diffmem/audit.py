"""Does a model copy its training data? Audit any set of samples against any training set.

:func:`audit` finds, for every sample, its nearest training points (exactly by default, or
with a faiss index) in data units or in the units of a feature space, and computes, through
the functions of :mod:`diffmem.metrics` that the experiments use too:

* ``fraction_within``: the paper's metric, the fraction of samples closer than ``delta`` to a
  training point (data or feature units; for images also as the per-pixel RMS difference
  ``delta / sqrt(d)``);
* ``nn_ratio``: copies by ``d1 / d2 < threshold`` (dimensionless; 1/3 as in Gu et al. and
  Bonnaire et al.), with a bootstrap interval;
* ``calibrated_l2``: Carlini et al. (2023)'s ``d1 / (alpha * mean distance to the n nearest
  training points)`` (dimensionless; ``alpha = 0.5``, ``n = 50``); copies below a threshold
  (:data:`CALIBRATED_THRESHOLD`, chosen by the measurement described there);
* ``exact_match``: when the training images are binary, the fraction of samples equal to a
  training image after thresholding at 0.5;
* ``duplicates``: how many samples land on each training item (copies by the nn-ratio
  test), the most-copied items and how many distinct items were copied (coverage);
* quantiles of ``d1``, ``d1 / d2`` and the calibrated distance.

Samples and training sets are tensors, numpy arrays or memory-maps (streamed in batches and
chunks, never loaded whole), ``.npy`` paths, or (training sets) lists of shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmem._checks import fail, positive, positive_int
from diffmem.centres import Centres, TrainingData, all_reduce, as_centres, open_npy
from diffmem.images import exact_matches, is_binary
from diffmem.io import atomic_write_bytes
from diffmem.metrics import (
    bootstrap_interval,
    calibrated_l2,
    delta_key,
    distance_ratios,
    knn,
    ratio_test,
    rms_per_coordinate,
    within,
)

INDEXES = ("exact", "faiss-flat", "faiss-ivf")
#: Default tolerances of ``fraction_within`` (data or feature units).
DEFAULT_DELTAS = (0.01, 0.1, 1.0)
#: Default threshold of the calibrated distance, measured on scikit-learn's 8x8 digits (1500
#: training, 297 held out; ``tests/test_audit.py`` repeats it): training digits plus pixel
#: noise of standard deviation 0.02 score at most 0.34 (median 0.20), with noise 0.05 median
#: 0.47 (max 0.73); held-out digits score at least 0.61 (5% quantile 0.89, median 1.25). At
#: 0.5 every lightly perturbed copy and no held-out digit is flagged.
CALIBRATED_THRESHOLD = 0.5
#: Quantiles reported for d1, d1/d2 and the calibrated distance.
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
#: Training items listed as the most copied.
TOP_COPIED = 20
#: Samples whose IVF neighbours are checked against exact search.
RECALL_SAMPLES = 200

UNITS = {
    "distances": "Euclidean norm of the flattened difference, in data units (feature units "
                 "with features); for images also per-pixel RMS (delta / sqrt(d))",
    "fractions": "fraction of samples in [0, 1]",
    "ratios": "dimensionless (d1 / d2; calibrated distance)",
    "cosine": "cosine similarity in [-1, 1] between a sample's features and its nearest "
              "training item's",
}


# --- inputs ------------------------------------------------------------------------------
class Rows:
    """Samples (or a training set's rows) as a stream of batches: a tensor, a numpy array or
    memory-map, a ``.npy`` path, or a :class:`diffmem.centres.Centres`, read ``batch`` rows
    at a time as float tensors (a memory-map is never loaded whole)."""

    def __init__(self, data: Any, name: str = "samples") -> None:
        self.name = name
        self.centres = data if isinstance(data, Centres) else None
        if self.centres is not None:
            self.data, self.n, self.data_shape = None, data.n, data.data_shape
            return
        if isinstance(data, str | Path):
            data = open_npy(data, name)
        if isinstance(data, np.ndarray):
            if data.dtype.kind != "f":
                raise fail(name, "floating-point values", f"dtype {data.dtype}")
        elif isinstance(data, Tensor):
            if not data.is_floating_point():
                raise fail(name, "a floating-point tensor", data.dtype)
        else:
            raise fail(name, "a tensor, a numpy array or memory-map, or a .npy path",
                       type(data).__name__)
        if data.ndim < 2:
            raise fail(name, "an array (n, *data_shape)", f"shape {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise fail(name, "at least one sample", "an empty set")
        self.data = data
        self.n = int(data.shape[0])
        self.data_shape = tuple(int(v) for v in data.shape[1:])

    def batch(self, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi`` as a float tensor (checked finite)."""
        if self.centres is not None:
            t = self.centres.read(lo, hi)
        else:
            part = self.data[lo:hi]
            t = part if isinstance(part, Tensor) else torch.from_numpy(np.array(part))
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise fail(self.name, "finite values (no NaN or inf)",
                       f"non-finite values in rows {lo}..{hi - 1}")
        return t

    def batches(self, size: int) -> Iterator[tuple[int, Tensor]]:
        for lo in range(0, self.n, size):
            yield lo, self.batch(lo, min(self.n, lo + size))

    def take(self, index: Sequence[int]) -> Tensor:
        """Rows at ``index`` (for galleries and recall checks)."""
        index = [int(i) for i in index]
        if self.centres is not None:
            like = torch.empty(0, dtype=torch.float64)
            return self.centres.take_raw(torch.tensor(index, dtype=torch.long), like).reshape(
                len(index), *self.data_shape)
        if isinstance(self.data, Tensor):
            return self.data[index]
        order = np.argsort(index)
        rows = np.array(self.data[np.asarray(index)[order]])
        out = np.empty_like(rows)
        out[order] = rows
        return torch.from_numpy(out)


def open_input(path: str | Path, key: str | None = None,
               resize: tuple[int, int] | None = None, name: str = "samples") -> Any:
    """A data set named on the command line: a ``.npy`` file (returned as its path, to be
    memory-mapped), a ``.npz`` archive (its array ``key``), or a folder of PNG/JPEG images
    (loaded as floats in ``[0, 1]``, resampled to ``resize`` if given)."""
    from diffmem.images import load_array, load_images

    p = Path(path)
    if not p.exists():
        raise fail(name, "an existing .npy/.npz file or a folder of PNG/JPEG images", str(p))
    if p.is_dir():
        return load_images(p, resize=resize, name=name)
    if resize is not None:
        raise fail("--resize", "a folder of images (arrays are used as they are)", str(p))
    if p.suffix == ".npy":
        return str(p)
    if p.suffix == ".npz":
        return load_array(p, key, name)
    raise fail(name, "a .npy or .npz file or a folder of PNG/JPEG images", str(p))


# --- feature spaces ----------------------------------------------------------------------
def load_features(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript module (``torch.jit.save``) mapping a batch of images to vectors."""
    p = Path(path)
    if not p.is_file():
        raise fail("features", "an existing TorchScript file (torch.jit.save)", str(p))
    try:
        with warnings.catch_warnings():  # TorchScript is how copy detectors are published
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError, OSError) as err:
        raise fail("features", "a TorchScript module file",
                   f"{p} ({str(err).splitlines()[0][:200]})") from err
    return module.eval()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def embed(rows: Rows, module: Callable[[Tensor], Tensor], batch: int,
          device: torch.device, progress: bool, cache: Path | None = None,
          fingerprint: str = "") -> Tensor:
    """``module`` applied to every row in batches (float32), checked: one finite vector per
    row. With ``cache``, the vectors are stored there (``.npy`` beside a ``.json``
    fingerprint) and reused while the module and the data are unchanged."""
    if cache is not None:
        meta = cache.with_suffix(".json")
        if cache.is_file() and meta.is_file() and json.loads(meta.read_text()).get(
                "fingerprint") == fingerprint:
            return torch.from_numpy(np.load(cache))
    parts = []
    bar = tqdm(rows.batches(batch), total=math.ceil(rows.n / batch), disable=not progress,
               desc=f"features of {rows.name}", leave=False)
    with torch.no_grad():
        for lo, x in bar:
            try:
                out = module(x.to(device=device, dtype=torch.float32))
            except Exception as err:  # the user's module: report what it raised
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                raise fail("features", f"a module that maps a batch of {rows.name} of shape "
                           f"{tuple(x.shape)} to vectors",
                           f"{type(err).__name__}: {(lines or [''])[-1][:200]}") from err
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
                raise fail("features", f"vectors of shape ({x.shape[0]}, f) for a batch of "
                           f"{x.shape[0]}", f"shape {tuple(out.shape)}" if isinstance(
                               out, Tensor) else type(out).__name__)
            if not bool(torch.isfinite(out).all()):
                raise fail("features", "finite feature vectors",
                           f"non-finite values for rows {lo}..{lo + x.shape[0] - 1}")
            parts.append(out.detach().to("cpu", torch.float32))
    vectors = torch.cat(parts)
    if cache is not None:
        import io

        buf = io.BytesIO()
        np.save(buf, vectors.numpy())
        atomic_write_bytes(cache, buf.getvalue())
        atomic_write_bytes(cache.with_suffix(".json"),
                           json.dumps({"fingerprint": fingerprint}).encode())
    return vectors


def _identity(data: Any) -> str:
    """What identifies a data set for the feature cache: paths with size and time, else a
    hash of the values."""
    if isinstance(data, str | Path):
        st = Path(data).stat()
        return f"{Path(data).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if isinstance(data, list | tuple):
        return "|".join(_identity(d) for d in data)
    if isinstance(data, np.memmap) and data.filename is not None:
        return _identity(data.filename) + f":{data.shape}"
    arr = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


# --- neighbour search --------------------------------------------------------------------
def _exact_search(samples: Rows, train: Centres, k: int, batch: int,
                  chunk_size: int, progress: bool) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest training points of every sample (streamed over both sets): the two
    nearest certified exact (d1, d2 and which item is nearest), the others with their
    matrix-product distances (they only enter the calibrated distance's mean)."""
    dist, idx = [], []
    for x in _progress_batches(samples, batch, progress, "nearest neighbours"):
        d, i = knn(x, train, k, chunk_size=chunk_size, exact=2)
        dist.append(d.cpu())
        idx.append(i.cpu())
    return torch.cat(dist), torch.cat(idx)


def _faiss_search(samples: Rows, train: Centres, k: int, batch: int, kind: str,
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
    for x in _progress_batches(samples, batch, progress, "faiss search"):
        sq, ii = index.search(np.ascontiguousarray(x.reshape(x.shape[0], d).float().numpy()),
                              k)
        dist.append(torch.from_numpy(np.sqrt(np.maximum(sq, 0)).astype(np.float64)))
        idx.append(torch.from_numpy(ii.astype(np.int64)))
    return torch.cat(dist), torch.cat(idx), info


def _progress_batches(rows: Rows, batch: int, progress: bool, desc: str) -> Iterator[Tensor]:
    """``rows`` in batches of ``batch``, with a progress bar."""
    bar = tqdm(total=rows.n, disable=not progress, desc=desc, leave=False)
    for _, x in rows.batches(batch):
        yield x
        bar.update(x.shape[0])
    bar.close()


# --- the result --------------------------------------------------------------------------
@dataclass
class AuditResult:
    """What :func:`audit` measured: the aggregates (attributes named as in ``audit.json``)
    and per-sample arrays (``nearest``, ``d1``, ``d2``, ``ratio``, ``calibrated``,
    ``copies`` per criterion, and ``cosine`` with features)."""

    n_samples: int
    n_train: int
    dim: int
    data_shape: tuple[int, ...]
    features: str | None
    index: str
    fraction_within: dict[str, float]
    rms_per_coordinate: dict[str, float] | None
    nn_ratio: dict[str, float]
    calibrated_l2: dict[str, float]
    exact_match: float | None
    duplicates: dict[str, Any]
    quantiles: dict[str, dict[str, float]]
    nearest: Tensor
    d1: Tensor
    d2: Tensor
    ratio: Tensor
    calibrated: Tensor
    copies: dict[str, Tensor]
    cosine: Tensor | None = None
    cosine_summary: dict[str, float] | None = None
    recall: dict[str, Any] | None = None
    search: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The aggregates as plain JSON values, with units and versions."""
        from diffmem.experiments.base import versions

        out = {"n_samples": self.n_samples, "n_train": self.n_train, "dim": self.dim,
               "data_shape": list(self.data_shape), "features": self.features,
               "index": self.index, "search": self.search, "units": UNITS,
               "fraction_within": self.fraction_within,
               "fraction_within_rms_per_pixel": self.rms_per_coordinate,
               "nn_ratio": self.nn_ratio, "calibrated_l2": self.calibrated_l2,
               "exact_match": self.exact_match, "duplicates": self.duplicates,
               "quantiles": self.quantiles, "versions": versions()}
        if self.cosine_summary is not None:
            out["cosine"] = self.cosine_summary
        if self.recall is not None:
            out["recall"] = self.recall
        return out

    def per_sample(self) -> Iterator[dict[str, Any]]:
        """One row per sample: index, nearest training item, d1, d2, ratio, calibrated
        distance, a copy flag per criterion (and the cosine similarity with features)."""
        for i in range(self.n_samples):
            row = {"sample": i, "nearest": int(self.nearest[i]), "d1": float(self.d1[i]),
                   "d2": float(self.d2[i]), "ratio": float(self.ratio[i]),
                   "calibrated": float(self.calibrated[i])}
            if self.cosine is not None:
                row["cosine"] = float(self.cosine[i])
            row.update({f"copy_{k}": int(v[i]) for k, v in self.copies.items()})
            yield row


def _quantiles(v: Tensor) -> dict[str, float]:
    q = torch.quantile(v.to(torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return {repr(p): float(x) for p, x in zip(QUANTILES, q, strict=True)}


def audit(
    samples: Any,
    train: TrainingData,
    *,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    ratio_threshold: float = 1 / 3,
    calibrated_alpha: float = 0.5,
    calibrated_n: int = 50,
    calibrated_threshold: float = CALIBRATED_THRESHOLD,
    features: Callable[[Tensor], Tensor] | str | Path | None = None,
    index: str = "exact",
    bootstrap: int = 1000,
    seed: int = 0,
    chunk_size: int = 4096,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    progress: bool = False,
    feature_cache: Path | None = None,
    process_group: Any = None,
) -> AuditResult:
    """Audit ``samples`` ``(n, *data_shape)`` against ``train`` ``(N, *data_shape)``: the
    nearest training points of every sample and the memorization figures listed in the
    module's description, each in the units stated in :data:`UNITS`.

    Args:
        samples: a tensor, numpy array or memory-map, or a ``.npy`` path.
        train: a tensor, numpy array or memory-map, a ``.npy`` path, or a list of shards.
        deltas: tolerances of ``fraction_within`` (data or feature units, > 0).
        ratio_threshold: the nn-ratio test's ``d1 / d2`` threshold.
        calibrated_alpha, calibrated_n, calibrated_threshold: the calibrated distance
            (Carlini et al.) and its copy threshold.
        features: a callable or the path of a TorchScript module mapping a batch of
            ``data_shape`` arrays to vectors; distances are then measured between vectors,
            and cosine similarities reported beside them.
        index: ``'exact'`` (streamed matrix products with exact re-ranking), ``'faiss-flat'``
            or ``'faiss-ivf'`` (its recall against exact search is measured on a subsample).
        bootstrap, seed: the nn-ratio interval's resamples and seed (also the IVF's).
        chunk_size, batch_size: training rows and samples processed at once.
        feature_cache: a folder in which feature vectors are kept and reused.
        process_group: a torch.distributed group when each process holds a contiguous block
            of ``train`` (exact search only); every process returns the full result.
    """
    deltas = [positive("deltas", d) for d in deltas]
    if not deltas:
        raise fail("deltas", "at least one tolerance", "an empty list")
    ratio_threshold = positive("ratio_threshold", ratio_threshold)
    calibrated_alpha = positive("calibrated_alpha", calibrated_alpha)
    calibrated_n = positive_int("calibrated_n", calibrated_n)
    calibrated_threshold = positive("calibrated_threshold", calibrated_threshold)
    if index not in INDEXES:
        raise fail("index", f"one of {INDEXES}", repr(index))
    batch_size = positive_int("batch_size", batch_size)
    dev = torch.device(device)
    if process_group is not None and index != "exact":
        raise fail("index", "'exact' when the training set is split over processes", index)
    rows = Rows(samples, "samples")
    centres = as_centres(train, process_group=process_group)
    if rows.data_shape != centres.data_shape:
        raise fail("samples", f"arrays of shape (n, *{centres.data_shape}) like train",
                   f"shape ({rows.n}, *{rows.data_shape})")
    if centres.n_total < 2:
        raise fail("train", "at least 2 training points (for d1 / d2)", centres.n_total)
    space_rows, space_train, feature_name = _feature_space(
        rows, centres, features, batch_size, dev, progress, feature_cache, (samples, train))
    k = min(centres.n_total, max(2, calibrated_n))
    dist, idx, search, recall = _nearest(space_rows, space_train, k, index, batch_size,
                                         chunk_size, seed, progress)
    d1, d2 = dist[:, 0], dist[:, 1]
    ratio = distance_ratios(d1, d2)
    calibrated = calibrated_l2(dist, calibrated_alpha, min(calibrated_n, k))
    test = ratio_test(d1, d2, ratio_threshold, bootstrap, seed=seed)
    copies = {f"within_{delta_key(d)}": d1 < d for d in deltas}
    copies["nn_ratio"] = ratio < ratio_threshold
    copies["calibrated_l2"] = calibrated < calibrated_threshold
    exact = _exact_matches(rows, centres, batch_size, process_group)
    if exact is not None:
        copies["exact_match"] = exact
    cal_lo, cal_hi = bootstrap_interval(copies["calibrated_l2"], bootstrap, seed=seed)
    dim = int(math.prod(rows.data_shape))
    result = AuditResult(
        n_samples=rows.n, n_train=centres.n_total, dim=dim, data_shape=rows.data_shape,
        features=feature_name, index=index,
        fraction_within={delta_key(d): f for d, f in within(d1, deltas).items()},
        rms_per_coordinate=({delta_key(d): float(rms_per_coordinate(d, dim)) for d in deltas}
                            if len(rows.data_shape) >= 2 and features is None else None),
        nn_ratio={"threshold": ratio_threshold, "fraction": test.fraction,
                  "ci_low": test.ci_low, "ci_high": test.ci_high, "level": test.level},
        calibrated_l2={"alpha": calibrated_alpha, "n": min(calibrated_n, k),
                       "threshold": calibrated_threshold,
                       "fraction": float(copies["calibrated_l2"].to(torch.float64).mean()),
                       "ci_low": cal_lo, "ci_high": cal_hi},
        exact_match=None if exact is None else float(exact.to(torch.float64).mean()),
        duplicates=_duplicates(idx[:, 0], copies["nn_ratio"], centres.n_total),
        quantiles={"d1": _quantiles(d1), "ratio": _quantiles(ratio),
                   "calibrated": _quantiles(calibrated)},
        nearest=idx[:, 0], d1=d1, d2=d2, ratio=ratio, calibrated=calibrated, copies=copies,
        recall=recall, search=search)
    if features is not None:
        vectors = space_rows.data  # the samples' feature vectors, in memory
        near = space_train.take_raw(idx[:, 0], vectors)
        cos = torch.nn.functional.cosine_similarity(vectors, near, dim=1)
        result.cosine = cos
        result.cosine_summary = {"nearest_mean": float(cos.mean()), "quantiles": _quantiles(cos)}
    return result


def _feature_space(rows: Rows, centres: Centres, features: Any, batch_size: int,
                   dev: torch.device, progress: bool, feature_cache: Path | None,
                   sources: tuple[Any, Any]) -> tuple[Rows, Centres, str | None]:
    """The space the distances are measured in: the data itself, or the vectors of a feature
    module (cached per module file and data set, ``sources`` = (samples, train) as given,
    in ``feature_cache``)."""
    if features is None:
        return rows, centres, None
    module, digest = features, ""
    if isinstance(features, str | Path):
        module = load_features(features, dev)
        feature_name, digest = str(features), _file_digest(Path(features))
    else:
        feature_name = type(features).__name__
    if not callable(module):
        raise fail("features", "a callable or a TorchScript file", type(module).__name__)

    def cached(role: str) -> Path | None:
        return None if feature_cache is None or not digest else \
            Path(feature_cache) / f"{role}.npy"

    train_vec = embed(Rows(centres, "train"), module, batch_size, dev, progress,
                      cached("train"), f"{digest}:{_identity(sources[1])}")
    sample_vec = embed(rows, module, batch_size, dev, progress, cached("samples"),
                       f"{digest}:{_identity(sources[0])}")
    if train_vec.shape[1] != sample_vec.shape[1]:
        raise fail("features", "vectors of one length", f"{train_vec.shape[1]} and "
                   f"{sample_vec.shape[1]}")
    return (Rows(sample_vec, "samples"), Centres(train_vec, process_group=centres.group),
            feature_name)


def _nearest(space_rows: Rows, space_train: Centres, k: int, index: str,
             batch_size: int, chunk_size: int, seed: int, progress: bool
             ) -> tuple[Tensor, Tensor, dict[str, Any], float | None]:
    """The ``k`` nearest training points of every sample (distances, indices), how they were
    found, and the IVF's measured recall (``None`` for the other indexes)."""
    search: dict[str, Any] = {"k": k}
    if index == "exact":
        dist, idx = _exact_search(space_rows, space_train, k, batch_size, chunk_size, progress)
        search["method"] = ("exact: streamed matrix products; the two nearest re-ranked and "
                            "certified exact, the rest of the k within the product bound")
        return dist, idx, search, None
    dist, idx, info = _faiss_search(space_rows, space_train, k, batch_size, index, seed,
                                    progress)
    search.update(info)
    recall = (_recall(space_rows, space_train, idx, k, seed, chunk_size)
              if index == "faiss-ivf" else None)
    return dist, idx, search, recall


def _exact_matches(rows: Rows, centres: Centres, batch_size: int,
                   process_group: Any) -> Tensor | None:
    """For binary training images: whether each sample, thresholded at 0.5, equals a
    training image (``None`` when the training set is not binary)."""
    binary = float(all_reduce(torch.tensor([float(centres.n == 0 or is_binary(centres))]),
                              process_group, "min")) == 1.0
    if not binary:
        return None
    local = (exact_matches((x for _, x in rows.batches(batch_size)), centres) if centres.n
             else torch.zeros(rows.n, dtype=torch.bool))
    return all_reduce(local.to(torch.float64), process_group, "max") > 0


def _duplicates(nearest: Tensor, copied: Tensor, n_train: int) -> dict[str, Any]:
    """Copies per training item by ``copied`` samples: how many items, the coverage and the
    :data:`TOP_COPIED` most copied."""
    counts = torch.zeros(n_train, dtype=torch.long)
    hit = nearest[copied]
    counts.index_add_(0, hit, torch.ones_like(hit))
    top = torch.argsort(counts, descending=True, stable=True)[:TOP_COPIED]
    return {"criterion": "nn_ratio", "copied_samples": int(copied.sum()),
            "distinct_train_items": int((counts > 0).sum()),
            "coverage": float((counts > 0).to(torch.float64).mean()),
            "most_copied": [{"train_index": int(i), "copies": int(counts[i])}
                            for i in top if counts[i] > 0]}


def _recall(samples: Rows, train: Centres, found: Tensor, k: int, seed: int,
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


# --- how far is a model from the memorizing score? ------------------------------------------
def _model_denoiser(model: Any, x: Tensor, t: Tensor) -> Tensor:
    """``D(x, t) = x + sigma^2 s(x, t)`` of any score (its ``denoiser``/``sigma2_score`` when
    it has one)."""
    from diffmem.scores import HasDenoiser, HasSigma2Score

    if isinstance(model, HasDenoiser):
        return model.denoiser(x, t)
    if isinstance(model, HasSigma2Score):
        return x + model.sigma2_score(x, t)
    from diffmem.schedules import expand_as_batch

    return x + expand_as_batch(model.schedule.sigma2(t).to(x), x) * model(x, t)


def denoiser_gap(model: Any, train: TrainingData, *, held: Any = None,
                 sigmas: Sequence[float] | None = None,
                 references: dict[str, Any] | None = None, n_points: int = 256,
                 seed: int = 0) -> dict[str, Any]:
    """How far a model's denoiser is from the empirical (memorizing) one at each noise level:

        gap(sigma) = E |D_model(x, t) - D_e(x, t)|^2 / E |D_e(x, t) - x|^2

    (dimensionless; 0: the model memorizes like the empirical score, about 1 or more: it does
    something else), with ``x = m(t) y + sigma(t) z`` for training points ``y`` and,
    separately, held-out points, at ``sigma(t)`` on a log grid (``sigmas``; default 12
    levels from ``1e-3`` to ``sigma(T)``). ``references`` (name -> closed-form score on the
    model's schedule, e.g. Tikhonov and threshold at a few strengths) are compared the same
    way, ``E |D_model - D_ref|^2 / E |D_ref - x|^2``, and ``closest`` names, per level, the
    closed form (the empirical one included) nearest to the model in absolute terms, by
    ``E |D_model - D_ref|^2`` (the ratios have different denominators: a model that barely
    denoises is at ratio about 1 from every closed form, yet nearest to the one that barely
    denoises too)."""
    from diffmem.scores import EmpiricalScore

    sch = model.schedule
    centres = as_centres(train)
    if sigmas is None:
        top = float(sch.sigma(sch.T))
        sigmas = [float(v) for v in np.logspace(-3, math.log10(top), 12)]
    forms = {"empirical": EmpiricalScore(centres, sch), **(references or {})}
    gen = torch.Generator().manual_seed(seed)
    sets: dict[str, Rows] = {"train": Rows(centres, "train")}
    if held is not None:
        sets["held"] = Rows(held, "held")
    out: dict[str, Any] = {"sigma": list(sigmas), "units": "dimensionless (squared-distance "
                           "ratio)", "closest": {}}
    for label, points in sets.items():
        pick = torch.randint(0, points.n, (positive_int("n_points", n_points),),
                             generator=gen)
        y = points.take(pick.tolist()).to(torch.float64)
        gaps: dict[str, list[float]] = {name: [] for name in forms}
        distances: dict[str, list[float]] = {name: [] for name in forms}
        for sigma in sigmas:
            t = sch.t_of_s(torch.tensor(-math.log(sigma), dtype=torch.float64))
            tt = t.expand(y.shape[0]).contiguous()
            m = float(sch.m(t))
            x = m * y + float(sch.sigma(t)) * torch.randn(y.shape, generator=gen,
                                                          dtype=torch.float64)
            d_model = _model_denoiser(model, x, tt).to(torch.float64)
            for name, form in forms.items():
                d_ref = form.denoiser(x, tt)
                scale = float((d_ref - x).flatten(1).pow(2).sum(1).mean())
                gap = float((d_model - d_ref).flatten(1).pow(2).sum(1).mean())
                distances[name].append(gap)
                gaps[name].append(gap / scale if scale > 0 else float("inf"))
        out[label] = gaps
        out["closest"][label] = [min(forms, key=lambda n, i=i: distances[n][i])
                                 for i in range(len(sigmas))]
    return out


def follows_down_to(gap: dict[str, Any], threshold: float = 0.1, form: str = "empirical",
                    where: str = "train") -> float | None:
    """The smallest noise level down to which the model's denoiser stays within
    ``threshold`` of ``form``'s on ``where`` points at every level from the top of the grid
    (``None``: not even at the largest level). At large noise every sensible denoiser agrees
    with the empirical one; the lower this level, the further down the model follows the
    memorizing score."""
    level = None
    for sigma, g in sorted(zip(gap["sigma"], gap[where][form], strict=True), reverse=True):
        if g > threshold:
            break
        level = sigma
    return level
