"""The audit: constructed cases with known answers, exact search against brute force, every
input kind, a TorchScript feature space, faiss indexes, and the command line's errors."""

import json
import re

import numpy as np
import pytest
import torch
from constructed import line_with_copies
from PIL import Image
from typer.testing import CliRunner

from diffmem import images
from diffmem.audit import CALIBRATED_THRESHOLD, audit
from diffmem.centres import Centres
from diffmem.cli import app


def constructed(seed=0):
    """24 training points on a line, 1 apart; 30 copies within 1e-3 of points 0..2; 10 novel
    points at midpoints of interior neighbours (d1 = d2)."""
    train, copies = line_with_copies(24, 3, seed=seed)
    novel = (train[5:15] + train[6:16]) / 2
    return train, torch.cat([copies, novel])


def test_constructed_cases_give_known_answers():
    train, samples = constructed()
    r = audit(samples, train, deltas=[1e-2, 0.6], calibrated_n=4, bootstrap=200)
    assert r.fraction_within == {"0.01": 0.75, "0.6": 1.0}
    assert r.nn_ratio["fraction"] == 0.75 and r.nn_ratio["ci_low"] < 0.75 < r.nn_ratio["ci_high"]
    assert torch.allclose(r.ratio[30:], torch.ones(10, dtype=torch.float64))
    assert float(r.ratio[:30].max()) < 2e-3
    assert torch.equal(r.nearest[:30], torch.arange(30) % 3)
    assert r.duplicates["distinct_train_items"] == 3
    assert r.duplicates["most_copied"] == [{"train_index": i, "copies": 10} for i in range(3)]
    assert r.duplicates["coverage"] == pytest.approx(3 / 24)
    # calibrated: d1 / (alpha * mean of the 4 nearest); a midpoint's 4 nearest are at
    # 0.5, 0.5, 1.5, 1.5 -> 0.5 / (0.5 * 1) = 1
    assert torch.allclose(r.calibrated[30:], torch.ones(10, dtype=torch.float64))
    assert r.calibrated_l2["fraction"] == 0.75
    assert r.exact_match is None
    assert r.quantiles["ratio"]["1.0"] == pytest.approx(1.0)
    rows = list(r.per_sample())
    assert rows[0]["copy_nn_ratio"] == 1 and rows[35]["copy_nn_ratio"] == 0
    json.dumps(r.to_json())  # plain JSON


def test_exact_search_matches_brute_force_float64():
    gen = torch.Generator().manual_seed(3)
    train = 5 + torch.randn(3000, 20, generator=gen, dtype=torch.float64)
    samples = torch.cat([train[:50] + 1e-6, 5 + torch.randn(150, 20, generator=gen,
                                                              dtype=torch.float64)])
    r = audit(samples.float(), train.float(), calibrated_n=10, chunk_size=512, batch_size=64)
    brute = torch.cdist(samples.float().double(), train.float().double())
    top = brute.topk(10, largest=False)
    assert torch.equal(r.nearest, top.indices[:, 0])
    assert torch.allclose(r.d1.double(), top.values[:, 0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(r.d2.double(), top.values[:, 1], rtol=1e-5)
    expected = top.values[:, 0] / (0.5 * top.values.mean(1))
    assert torch.allclose(r.calibrated.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_faiss_shortlist_gives_the_same_certified_neighbours(dtype):
    """Candidates from faiss's float32 products, certified like torch's: the same exact
    neighbours, bit for bit, including near-ties (copies 1e-6 apart) and uncentred data."""
    pytest.importorskip("faiss")
    from diffmem.metrics import knn

    gen = torch.Generator().manual_seed(4)
    train = 30 + torch.randn(5000, 16, generator=gen, dtype=dtype)
    train[100:110] = train[0] + 1e-6 * torch.arange(10, dtype=dtype)[:, None]
    samples = torch.cat([train[:300] + 1e-5, 30 + torch.randn(300, 16, generator=gen,
                                                               dtype=dtype)])
    a = knn(samples, train, 5, chunk_size=1024, shortlist="torch")
    b = knn(samples, train, 5, chunk_size=1024, shortlist="faiss")
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    if dtype == torch.float64:  # float32 differences cannot resolve 1e-6 at 30
        brute = torch.cdist(samples, train).topk(5, largest=False)
        assert torch.equal(b[1], brute.indices)
    # a Centres (float32: one faiss call on the stored rows; float64: centred chunks), and
    # the audit's mode: the two nearest certified, the rest as the products give them
    centres = Centres(train)
    assert (centres.float32_rows() is not None) == (dtype == torch.float32)
    for exact in (None, 2):
        a = knn(samples, centres, 5, chunk_size=1024, exact=exact, shortlist="torch")
        b = knn(samples, centres, 5, chunk_size=1024, exact=exact, shortlist="faiss")
        cols = slice(None) if exact is None else slice(0, 2)
        assert torch.equal(a[1][:, cols], b[1][:, cols])
        assert torch.equal(a[0][:, cols], b[0][:, cols])


def test_calibrated_threshold_separates_copies_from_novel_digits():
    """The measurement behind the default threshold (see CALIBRATED_THRESHOLD)."""
    train, held = images.digit_split(1500)
    gen = torch.Generator().manual_seed(0)
    light = train[:300] + 0.02 * torch.randn(300, 64, generator=gen, dtype=torch.float64)
    copies = audit(light, train, bootstrap=50)
    novel = audit(held, train, bootstrap=50)
    assert float(copies.calibrated.max()) < CALIBRATED_THRESHOLD < float(novel.calibrated.min())
    assert copies.calibrated_l2["fraction"] == 1.0 and novel.calibrated_l2["fraction"] == 0.0


def test_every_input_kind_and_binary_images(tmp_path):
    squares = images.two_squares(8)
    samples = torch.cat([squares, 1 - squares[:1], squares + 0.3 * (squares == 0)])
    np.save(tmp_path / "train.npy", squares.numpy())
    np.save(tmp_path / "samples.npy", samples.numpy())
    base = audit(samples, squares, bootstrap=50)
    assert base.exact_match == pytest.approx(4 / 5)  # the inverted square matches nothing
    assert base.rms_per_coordinate == {"0.01": 0.01 / 8, "0.1": 0.1 / 8, "1.0": 1 / 8}
    for s, t in [(str(tmp_path / "samples.npy"), str(tmp_path / "train.npy")),
                 (np.load(tmp_path / "samples.npy", mmap_mode="r"),
                  np.load(tmp_path / "train.npy", mmap_mode="r"))]:
        r = audit(s, t, bootstrap=50)
        assert torch.equal(r.nearest, base.nearest) and r.exact_match == base.exact_match
        assert torch.allclose(r.d1, base.d1)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(squares):
        Image.fromarray((img[0].numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    np.savez(tmp_path / "both.npz", samples=samples.numpy(), other=samples.numpy())
    runner = CliRunner()
    res = runner.invoke(app, ["audit", str(tmp_path / "both.npz"), "--key", "samples",
                              "--train", str(folder), "--out", str(tmp_path / "out"),
                              "--no-progress", "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert written["exact_match"] == pytest.approx(4 / 5)
    assert written["n_train"] == 2 and written["units"]["fractions"]
    csv = (tmp_path / "out" / "per_sample.csv").read_text().splitlines()
    assert len(csv) == 6 and csv[0].startswith("sample,nearest,d1,d2,ratio,calibrated")
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 10 and "most copy-like" in page
    counts = re.findall(r"item \d+: (\d+) (copy|copies)</div>", page)
    assert counts and all((n == "1") == (noun == "copy") for n, noun in counts)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_features_with_cache(tmp_path):
    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(x, 2).flatten(1)

    path = tmp_path / "pool.pt"
    torch.jit.script(Pool()).save(str(path))
    gen = torch.Generator().manual_seed(1)
    train = torch.rand(40, 1, 8, 8, generator=gen)
    samples = torch.cat([train[:5], torch.rand(5, 1, 8, 8, generator=gen)])
    cache = tmp_path / "features"
    r = audit(samples, train, features=path, feature_cache=cache, calibrated_n=5)
    assert r.features == str(path) and r.dim == 64
    assert torch.allclose(r.d1[:5], torch.zeros(5), atol=1e-6)
    assert r.cosine is not None and torch.allclose(r.cosine[:5], torch.ones(5))
    cached = cache / "train.npy"
    stamp = cached.stat().st_mtime_ns
    again = audit(samples, train, features=path, feature_cache=cache, calibrated_n=5)
    assert cached.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert torch.equal(again.d1, r.d1)


def test_faiss_indexes_agree_with_exact_search():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(2)
    train = torch.randn(2000, 16, generator=gen)
    samples = torch.cat([train[:100] + 1e-3, torch.randn(100, 16, generator=gen)])
    exact = audit(samples, train, calibrated_n=8, bootstrap=50)
    flat = audit(samples, train, calibrated_n=8, bootstrap=50, index="faiss-flat")
    assert torch.equal(flat.nearest, exact.nearest)
    assert torch.allclose(flat.d1.float(), exact.d1.float(), rtol=1e-3, atol=1e-3)
    ivf = audit(samples, train, calibrated_n=8, bootstrap=50, index="faiss-ivf")
    assert ivf.recall is not None and ivf.recall["samples_checked"] == 200
    assert 0.5 <= ivf.recall["recall_at_1"] <= 1.0
    assert ivf.search["nlist"] == int(4 * 2000 ** 0.5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_command_line_errors_name_the_argument_and_write_nothing(tmp_path):
    runner = CliRunner()
    good = tmp_path / "train.npy"
    np.save(good, np.random.default_rng(0).random((20, 4)))
    np.save(tmp_path / "wide.npy", np.zeros((3, 5)))
    np.save(tmp_path / "nan.npy", np.full((3, 4), np.nan))
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "empty").mkdir()
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(tmp_path / "wrong_shape.pt"))
    (tmp_path / "not_a_module.pt").write_bytes(b"nothing")
    cases = [
        ([str(tmp_path / "wide.npy")], r"samples: expected arrays of shape \(n, \*\(4,\)\)"),
        ([str(tmp_path / "nan.npy")], "samples: expected finite values"),
        ([str(tmp_path / "corrupt.npy")], "samples: expected a readable .npy file"),
        ([str(tmp_path / "empty")], "SAMPLES: expected a folder holding PNG/JPEG files"),
        ([str(tmp_path / "missing.npy")], "SAMPLES: expected an existing"),
        ([str(good), "--delta", "0"], r"--delta: expected a finite number > 0, received 0\.0"),
        ([str(good), "--delta", "-1"], "--delta: expected a finite number > 0"),
        ([str(good), "--index", "annoy"], "index: expected one of"),
        ([str(good), "--features", str(tmp_path / "wrong_shape.pt")],
         "--features: expected a module that maps a batch of (train|samples) of shape"),
        ([str(good), "--features", str(tmp_path / "not_a_module.pt")],
         "--features: expected a TorchScript module file"),
        ([str(good), "--features", str(tmp_path / "missing.pt")],
         "--features: expected an existing TorchScript file"),
        ([str(good), "--resize", "4"], "--resize: expected H,W"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        res = runner.invoke(app, ["audit", *args, "--train", str(good), "--out", str(out),
                                  "--no-progress"])
        assert res.exit_code == 2, (args, res.output)
        assert re.search(f"Error: {message}", res.output), (args, res.output)
        assert "Traceback" not in res.output
        leftovers = [p.name for p in out.rglob("*")] if out.exists() else []
        assert not [n for n in leftovers if n != "features"], (args, leftovers)


def test_duplicated_training_items_count_once_in_the_nn_ratio():
    """A sample next to an image the training set holds three times is a copy (d1 / d2
    near 0): d2 skips the nearest item's exact duplicates. Without them nothing changes."""
    from diffmem.audit import audit

    gen = torch.Generator().manual_seed(0)
    base = torch.rand(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    train = torch.cat([base, base[2:3].repeat(3, 1, 1, 1)])  # item 2 four times in all
    samples = torch.stack([base[2] + 1e-3, base[4] + 1e-3, (base[0] + base[1]) / 2])
    res = audit(samples, train, bootstrap=10)
    d_other = min(float((base[2] - base[j]).norm()) for j in range(6) if j != 2)
    assert abs(float(res.d2[0]) - min(float((samples[0] - base[j]).norm())
                                      for j in range(6) if j != 2)) < 1e-9
    assert float(res.ratio[0]) < 0.05 < d_other
    assert res.copies["nn_ratio"].tolist() == [True, True, False]
    from diffmem.metrics import nn_ratio  # the experiments' test: the same d2

    assert nn_ratio(samples, train, bootstrap=10).fraction == pytest.approx(2 / 3)
    plain = audit(samples, base, bootstrap=10)
    assert torch.equal(plain.d2, res.d2) and res.search["duplicates_beyond_k"] == 0
    # all k found neighbours duplicates of the nearest: the k-th distance, counted
    many = torch.cat([base, base[2:3].repeat(60, 1, 1, 1)])
    bounded = audit(samples[:1], many, bootstrap=10)
    assert bounded.search["duplicates_beyond_k"] == 1
    assert float(bounded.d2[0]) == pytest.approx(float(bounded.d1[0]), rel=1e-9)
