import numpy as np
import pytest
import torch
from constructed import line_with_copies

from diffmem.metrics import fraction_within, hit_counts, nearest, nn_ratio


def constructed(seed=0):
    """10 training points on a wide grid; 30 copies at distance 1e-3 of points 0..2 and 20
    novel points at the midpoints of neighbours (distance 0.5 from two training points)."""
    train, copies = line_with_copies(10, 2, seed=seed)
    novel = (train[:-1] + train[1:]).repeat(3, 1)[:20] / 2
    return train, copies, novel


def test_fraction_within_known_answer():
    train, copies, novel = constructed()
    samples = torch.cat([copies, novel])
    frac = fraction_within(samples, train, [1e-4, 1e-2, 0.6])
    assert frac == {1e-4: 0.0, 1e-2: 0.6, 0.6: 1.0}


def test_hit_counts_known_answer():
    train, copies, novel = constructed()
    counts = hit_counts(torch.cat([copies, novel]), train, 1e-2)
    assert counts.tolist() == [10, 10, 10] + [0] * 7


def test_nn_ratio_known_answer():
    train, copies, novel = constructed()
    res = nn_ratio(torch.cat([copies, novel]), train, bootstrap=500)
    assert res.fraction == pytest.approx(0.6)
    assert torch.allclose(res.ratios[30:], torch.ones(20, dtype=torch.float64))
    assert float(res.ratios[:30].max()) < 2e-3
    assert res.ci_low < 0.6 < res.ci_high
    assert res.ci_high - res.ci_low < 0.4
    all_copies = nn_ratio(copies, train, bootstrap=100)
    assert (all_copies.fraction, all_copies.ci_low, all_copies.ci_high) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("n_train", [50, 3000])
def test_nearest_is_exact(n_train):
    """Both the small (exact differences) and large (matrix products + exact refinement)
    paths agree with brute force, including near-ties far from the origin."""
    gen = torch.Generator().manual_seed(n_train)
    train = 50 + torch.randn(n_train, 16, generator=gen, dtype=torch.float64)
    samples = torch.cat([train[:100] + 1e-7, 50 + torch.randn(300, 16, generator=gen,
                                                               dtype=torch.float64)])
    idx, dist = nearest(samples.float(), train.float())
    ref = ((samples.float().double()[:, None] - train.float().double()[None]) ** 2).sum(-1)
    assert torch.equal(idx, ref.argmin(1))
    assert torch.allclose(dist.double(), ref.min(1).values.sqrt(), rtol=1e-5)


def test_metrics_bad_input():
    train, copies, _ = constructed()
    with pytest.raises(ValueError, match="deltas: expected a finite number > 0"):
        fraction_within(copies, train, [-1.0])
    with pytest.raises(ValueError, match="samples: expected shape"):
        fraction_within(torch.zeros(3, 3), train, 0.1)
    with pytest.raises(ValueError, match="train: expected at least one"):
        nearest(copies, torch.empty(0, 2))
    with pytest.raises(ValueError, match="train: expected at least 2"):
        nn_ratio(copies, train[:1])
    with pytest.raises(ValueError, match="samples: expected finite"):
        nearest(torch.full((2, 2), float("nan")), train)


def test_energy_distance_and_mmd_known_values():
    import math

    from diffmem.metrics import energy_distance, frechet_distance, mmd

    gen = torch.Generator().manual_seed(1)
    n = 6000  # sampling error of the statistics about 0.015 (energy) and 0.005 (MMD)
    a = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    b = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    shift = 1.5
    c = torch.randn(n, 1, generator=gen, dtype=torch.float64) + shift
    assert abs(energy_distance(a, b)) < 0.01
    # X - Y ~ N(shift, 2): E|X - Y| = s sqrt(2/pi) exp(-mu^2 / 2s^2) + mu (1 - 2 Phi(-mu/s))
    s = math.sqrt(2)
    phi = 0.5 * (1 + math.erf(-shift / s / math.sqrt(2)))
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-shift**2 / (2 * s * s)) + shift * (1 - 2 * phi)
    expected = 2 * e_xy - 4 / math.sqrt(math.pi)
    assert energy_distance(a, c) == pytest.approx(expected, abs=0.05)
    bw = 1.0
    k_same = math.sqrt(bw**2 / (bw**2 + 2))
    expected_mmd = 2 * k_same * (1 - math.exp(-shift**2 / (2 * (bw**2 + 2))))
    assert mmd(a, c, bandwidth=bw) == pytest.approx(expected_mmd, abs=0.02)
    assert abs(mmd(a, b, bandwidth=bw)) < 0.005
    # random within-set pairs (incomplete U-statistics) agree with the exact means
    assert energy_distance(a, c, pairs=200_000) == pytest.approx(energy_distance(a, c),
                                                                 abs=0.01)
    # Frechet distance of Gaussians N(0, I) and N(m, 4 I) in 2-D: |m|^2 + 2 (1 + 4 - 2 * 2)
    x = torch.randn(20000, 2, generator=gen, dtype=torch.float64)
    y = 2 * torch.randn(20000, 2, generator=gen, dtype=torch.float64) + torch.tensor([1.0, 2.0])
    assert frechet_distance(x, y) == pytest.approx(5 + 2 * (1 + 4 - 4), abs=0.15)
    with pytest.raises(ValueError, match="y: expected points of dimension 1"):
        energy_distance(a, torch.zeros(3, 2))


def test_distinct_rows_finds_exact_duplicates_in_order():
    from diffmem.metrics import distinct_rows

    a, b, c = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 1 + 1e-7)
    data = torch.stack([b, a, b, c, a, b])  # c differs from b in every value, by 1e-7
    assert distinct_rows(data).tolist() == [0, 1, 3]
    assert distinct_rows(data[:1]).tolist() == [0]


def test_training_example_dedupes_before_training(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("diffusers")
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, (3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "data.npy", base[[0, 1, 0, 2, 0, 1, 2]])
    example = Path(__file__).resolve().parents[1] / "examples" / "train_diffusers.py"
    res = subprocess.run([sys.executable, str(example), "--data", str(tmp_path / "data.npy"),
                          "--out", str(tmp_path / "run"), "--steps", "1", "--width", "8",
                          "--batch-size", "2", "--dedupe"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "dedupe: 3 distinct images of 7 (4 exact duplicates removed)" in res.stdout
