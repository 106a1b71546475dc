"""Training sets streamed from disk (a memory-map, a .npy path, a list of shards) give the
in-memory results bit for bit; half-precision storage stays within its stated error."""

import numpy as np
import pytest
import torch

from diffmem import metrics
from diffmem.centres import Centres, shard_rows
from diffmem.schedules import VE, VP
from diffmem.scores import (
    ConditionalEmpiricalScore,
    EmpiricalScore,
    ThresholdScore,
    TikhonovScore,
)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("npy")
    gen = torch.Generator().manual_seed(0)
    train = 3 + torch.randn(500, 12, generator=gen, dtype=torch.float64)
    np.save(folder / "all.npy", train.numpy())
    for k in range(3):
        lo, hi = shard_rows(500, 3, k)
        np.save(folder / f"part{k}.npy", train[lo:hi].numpy())
    sources = {"memmap": np.load(folder / "all.npy", mmap_mode="r"),
               "path": str(folder / "all.npy"),
               "shards": [folder / f"part{k}.npy" for k in range(3)]}
    x = torch.cat([train[:20] + 1e-4 * torch.randn(20, 12, generator=gen, dtype=torch.float64),
                   3 + 2 * torch.randn(20, 12, generator=gen, dtype=torch.float64)])
    return train, x, sources


@pytest.mark.parametrize("kind", ["memmap", "path", "shards"])
@pytest.mark.parametrize("force_small_chunks", [False, True])
def test_streamed_training_sets_equal_in_memory(stored, kind, force_small_chunks):
    train, x, sources = stored
    chunk = 37 if force_small_chunks else 4096
    for sch in (VE(), VP()):
        mem, disk = EmpiricalScore(train, sch, chunk), EmpiricalScore(sources[kind], sch, chunk)
        for t in (1e-5, 1e-2, 0.6):
            assert torch.equal(mem(x, t), disk(x, t))
            assert torch.equal(mem.weights(x, t), disk.weights(x, t))
        assert torch.equal(mem.denoiser(x, 0.0), disk.denoiser(x, 0.0))
        for make in (lambda s, sch=sch: TikhonovScore(s, sch, 0.05, chunk_size=chunk),
                     lambda s, sch=sch: ThresholdScore(s, sch, 1e-3, chunk_size=chunk)):
            assert torch.equal(make(train).sigma2_score(x, 0.01),
                               make(sources[kind]).sigma2_score(x, 0.01))
    a = metrics.knn(x, train, 4)
    b = metrics.knn(x, sources[kind], 4)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], rtol=1e-12)
    assert metrics.fraction_within(x, sources[kind], [1e-3]) == metrics.fraction_within(
        x, train, [1e-3])
    inverse = {"mode": "inverse", "operator": torch.eye(12)[:5], "noise_std": 0.3}
    obs = x[:, :5]
    assert torch.equal(ConditionalEmpiricalScore(train, None, VE(), **inverse)(x, 0.1, obs),
                       ConditionalEmpiricalScore(sources[kind], None, VE(), **inverse)(x, 0.1,
                                                                                        obs))
    cov = TikhonovScore.covariance_weighted(sources[kind], VE(), 0.05)
    assert torch.allclose(cov(x, 0.1), TikhonovScore.covariance_weighted(train, VE(), 0.05)(
        x, 0.1), rtol=1e-10)


@pytest.mark.parametrize(("storage", "bound"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_precision_storage_stays_within_its_stated_error(stored, storage, bound):
    """Stored in half precision, every coordinate of a training point is rounded to a relative
    ``2^-11`` (float16) or ``2^-8`` (bfloat16): ``y' = y + delta``. The denoiser
    ``D = m sum_n w_n y_n`` then moves by at most ``m |delta|_max`` (the points) plus
    ``2 |dl|_max m max_n |y_n - mean|`` (the weights), with the logit change
    ``|dl| <= (|x - m y| m |delta| + (m |delta|)^2 / 2) / sigma^2``; computed in the query's
    dtype whatever the storage."""
    train, x, _ = stored
    exact = EmpiricalScore(train, VE())
    half = EmpiricalScore(train, VE(), storage=storage)
    delta = half.centres.to_tensor() - train
    assert float((delta.abs() / train.abs()).max()) <= bound
    dmax = float(delta.norm(dim=1).max())
    spread = float((train - train.mean(0)).norm(dim=1).max())
    sch = VE()
    for t in (1e-2, 0.3, 1.0):
        m, s2 = float(sch.m(t)), float(sch.sigma2(t))
        far = torch.cdist(x, m * train).max(1).values
        dl = (far * m * dmax + (m * dmax) ** 2 / 2) / s2
        allowed = m * dmax + 2 * dl.clamp(max=1) * m * spread
        moved = (half.denoiser(x, t) - exact.denoiser(x, t)).norm(dim=1)
        assert bool((moved <= allowed).all()), (t, float((moved / allowed).max()))
        assert half.denoiser(x, t).dtype == torch.float64
    with pytest.raises(ValueError, match="storage: expected one of"):
        EmpiricalScore(train, VE(), storage="int8")


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "memmap float32"])
def test_converted_chunks_equal_the_converted_set_in_memory(stored, tmp_path, storage):
    """Chunks converted into one reused buffer (half-precision storage; a float32 memory-map
    read by float64 queries) give, on the matrix-product path with its shortlist, second
    pass and ``t = 0`` limit, bit for bit what the converted set held in memory gives."""
    from diffmem.mixture import gaussian_mixture

    train, x, _ = stored
    if storage == "memmap float32":
        np.save(tmp_path / "f32.npy", train.float().numpy())
        mapped = np.load(tmp_path / "f32.npy", mmap_mode="r")
        source = Centres(mapped)
        same = Centres(train.float())  # the same float32 scan; converted once, cached
        assert np.shares_memory(source.float32_rows(), mapped)  # faiss reads the map itself
    else:
        source = Centres(train, storage=storage)
        same = Centres(train.to(getattr(torch, storage)).double())
        assert source.float32_rows() is None
    assert source.streamed and not same.streamed
    sch = VE()
    for t in (0.0, 1e-6, 1e-3, 0.5):
        m = torch.full((x.shape[0],), float(sch.m(t)), dtype=torch.float64)
        s2 = torch.full((x.shape[0],), float(sch.sigma2(t)), dtype=torch.float64)
        a, b = (gaussian_mixture(x, c, m, s2, chunk_size=37, force_matmul=True,
                                 return_weights=True) for c in (source, same))
        assert torch.equal(a.mean, b.mean) and torch.equal(a.log_norm, b.log_norm)
        assert torch.equal(a.weights, b.weights)
    assert torch.equal(metrics.knn(x, source, 4)[1], metrics.knn(x, same, 4)[1])


def test_source_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="train: expected an existing .npy file"):
        Centres(str(tmp_path / "missing.npy"))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="train: expected a readable .npy file"):
        Centres(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    np.save(tmp_path / "b.npy", np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"train: expected shards of shape \(n, \*\(2,\)\)"):
        Centres([tmp_path / "a.npy", tmp_path / "b.npy"])
    np.save(tmp_path / "nan.npy", np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="train: expected finite values"):
        Centres(str(tmp_path / "nan.npy"))
    np.save(tmp_path / "int.npy", np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="train: expected floating-point values"):
        Centres(str(tmp_path / "int.npy"))
    with pytest.raises(ValueError, match="process_group: expected a group of an initialised"):
        Centres(torch.zeros(3, 2), process_group=object())
