import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem import edm, images
from diffmem.experiments import get_experiment
from diffmem.experiments.base import resolve_params, run_experiment
from diffmem.schedules import EDM
from diffmem.scores import EmpiricalScore, TikhonovScore


def test_two_squares_match_the_paper():
    sq = images.two_squares(64)
    assert sq.shape == (2, 1, 64, 64)
    assert sq[0, 0, 6:18, 6:18].eq(1).all() and sq[0].sum() == 144
    assert sq[1, 0, 40:54, 40:54].eq(1).all() and sq[1].sum() == 196
    assert images.two_squares(32)[0].sum() == 36


def test_karras_sigmas_and_preconditioning_formulas():
    s = edm.karras_sigmas(40, 0.002, 80.0, 7.0)
    assert s.shape == (41,) and s[-1] == 0
    assert math.isclose(float(s[0]), 80.0) and math.isclose(float(s[-2]), 0.002)
    assert bool((s[:-1] > s[1:]).all())
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(float(edm.karras_sigmas(3)[1]), mid, rel_tol=1e-12)
    pre = edm.Precond(0.5)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    assert torch.allclose(c_skip, 0.25 / (sigma**2 + 0.25))
    assert torch.allclose(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    assert torch.allclose(c_in, 1 / (sigma**2 + 0.25).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)
    # the weight makes the effective target variance one: weight * c_out^2 = 1
    assert torch.allclose(pre.weight(sigma) * c_out**2, torch.ones(3, dtype=torch.float64))
    draws = edm.training_sigmas(20000, generator=torch.Generator().manual_seed(0))
    assert abs(float(draws.log().mean()) + 1.2) < 0.05
    assert abs(float(draws.log().std()) - 1.2) < 0.05


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_edm_sampler_with_empirical_denoiser_returns_training_images(churn):
    sq = images.two_squares(16)
    sch = EDM()
    x_T = 80 * torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    out = edm.edm_sample(edm.closed_form_denoiser(EmpiricalScore(sq, sch)), x_T, s_churn=churn,
                         generator=torch.Generator().manual_seed(1))
    assert images.exact_match_fraction(out, sq) == 1.0
    gap = torch.stack([(out - s).abs().amax((1, 2, 3)) for s in sq]).min(0).values
    assert float(gap.max()) < 1e-9  # every sample is a training image, to round-off
    tik = edm.edm_sample(edm.closed_form_denoiser(TikhonovScore(sq, sch, 0.05)), x_T)
    resid = min((tik - s).flatten(1).norm(dim=1).min() for s in sq)
    assert float(resid) > 0.5  # pixel noise, not a copy


def test_exact_match_metric_on_constructed_images():
    sq = images.two_squares(16)
    noisy = sq + 0.3 * torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    flipped = sq.clone()
    flipped[:, 0, 0, 0] = 1 - flipped[:, 0, 0, 0]
    samples = torch.cat([noisy, flipped, torch.zeros(1, 1, 16, 16, dtype=torch.float64)])
    assert images.exact_match_fraction(samples, sq) == pytest.approx(2 / 5)
    expected = torch.tensor([True, True, False, False, False])
    assert torch.equal(images.exact_matches(samples, sq), expected)
    # batches given one by one (the audit's way) give the same answer in one scan of train
    assert torch.equal(images.exact_matches(iter(samples.split(2)), sq), expected)
    with pytest.raises(ValueError, match="samples: expected images of shape"):
        images.exact_matches(iter([samples[:2], samples[:2, :, :8]]), sq)


def test_loader_reads_npy_npz_and_png(tmp_path):
    arr = np.random.default_rng(0).random((3, 5, 6))
    np.save(tmp_path / "a.npy", arr)
    assert torch.allclose(images.load_images(tmp_path / "a.npy")[:, 0], torch.tensor(arr))
    np.savez(tmp_path / "b.npz", imgs=arr)
    assert images.load_images(tmp_path / "b.npz").shape == (3, 1, 5, 6)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((arr[i] * 255).astype(np.uint8)).save(folder / f"{i}.png")
    loaded = images.load_images(folder)
    assert loaded.shape == (2, 1, 5, 6)
    assert torch.allclose(loaded[0, 0], torch.tensor(arr[0]), atol=1 / 255)


def test_loader_error_paths(tmp_path):
    with pytest.raises(ValueError, match="path: expected an existing"):
        images.load_images(tmp_path / "missing.npy")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no PNG/JPEG files"):
        images.load_images(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="images of one size"):
        images.load_images(mixed)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="readable PNG/JPEG images"):
        images.load_images(broken)
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 2, 2)), b=np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="key: expected one of the arrays"):
        images.load_images(tmp_path / "two.npz")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="path: expected a readable"):
        images.load_images(tmp_path / "bad.npy")
    np.save(tmp_path / "nan.npy", np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="images: expected finite"):
        images.load_images(tmp_path / "nan.npy")


def test_image_experiments_quick(tmp_path):
    for name in ["squares-closed-form", "digits"]:
        exp = get_experiment(name)
        overrides = ["network_steps=50"] if name == "digits" else []
        run_experiment(exp, tmp_path, resolve_params(exp, quick=True, overrides=overrides),
                       progress=False)
    import json

    sq = json.loads((tmp_path / "squares-closed-form" / "metrics.json").read_text())
    assert sq["methods"]["empirical"]["exact_match_fraction"] == 1.0
    tik = sq["methods"]["Tikhonov c = 0.05"]
    assert abs(tik["rms_pixel_residual_mean"] / math.sqrt(0.05) - 1) < 0.2
    dg = json.loads((tmp_path / "digits" / "metrics.json").read_text())["methods"]
    assert dg["empirical"]["copy_fraction_nn_ratio"] == 1.0
    assert dg["Tikhonov c = 0.05"]["copy_fraction_nn_ratio"] < 0.5


def test_unet_shapes_and_edm_preconditioning():
    from diffmem.unet import EDMDenoiser, UNet, edm_loss

    net = UNet(4)
    x = torch.randn(3, 1, 16, 16)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    assert net(x, sigma.log() / 4).shape == x.shape
    den = EDMDenoiser(net)
    c_skip, c_out, c_in, c_noise = den.precond.coefficients(sigma)
    expected = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * net(
        c_in[:, None, None, None] * x, c_noise)
    assert torch.allclose(den(x, sigma), expected)
    # the output layer starts at zero, so D starts as c_skip x
    assert torch.allclose(den(x, sigma), c_skip[:, None, None, None] * x)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, 10, 10), torch.zeros(1))
    loss = edm_loss(den, x, sigma, torch.randn_like(x))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert UNet(8).n_parameters() > UNet(4).n_parameters()


def test_unet_training_reduces_loss_and_experiment_quick(tmp_path):
    import json

    from diffmem.unet import EDMDenoiser, UNet, train_edm

    sq = images.two_squares(16)
    losses = train_edm(EDMDenoiser(UNet(4)), sq, 200, progress=False).losses
    assert sum(losses[-50:]) < sum(losses[:50])
    exp = get_experiment("squares-unet")
    params = resolve_params(exp, quick=True, overrides=["steps=300", "every=150"])
    run_experiment(exp, tmp_path, params, progress=False)
    m = json.loads((tmp_path / "squares-unet" / "metrics.json").read_text())
    assert m["values"] == [150, 300] and set(m["sizes"]) == {"4", "8"}
    for size in m["sizes"].values():
        assert len(size["exact_match"]) == 2 and size["train_steps_per_s"] > 0


@pytest.mark.filterwarnings("ignore:EMA decay")
def test_edm_training_ema_is_the_running_average_of_the_raw_weights():
    from diffmem.unet import EDMDenoiser, UNet, train_edm

    sq = images.two_squares(8)

    def weights(steps, ema_half_life=None):
        den = EDMDenoiser(UNet(2))
        if steps:
            train_edm(den, sq, steps, progress=False, ema_half_life=ema_half_life)
        return torch.cat([p.detach().flatten() for p in den.parameters()])

    w0, w1, w2 = weights(0), weights(1), weights(2)
    assert not torch.allclose(w1, w2)
    # half-life 1 step: decay 0.5
    assert torch.allclose(weights(2, ema_half_life=1.0), 0.25 * w0 + 0.25 * w1 + 0.5 * w2,
                          atol=1e-7)
    assert torch.equal(weights(2, ema_half_life=0.0), w2)
    with pytest.raises(ValueError, match="ema_half_life"):
        train_edm(EDMDenoiser(UNet(2)), sq, 2, progress=False, ema_half_life=-1.0)


def test_unet_seeds_its_weights_and_leaves_the_global_rng_alone():
    from diffmem.unet import UNet

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = UNet(4, seed=5), UNet(4, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = UNet(4, generator=torch.Generator().manual_seed(1))
    d = UNet(4, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters(), strict=True))
    assert not torch.equal(a.stem.weight, c.stem.weight)
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_scales_by_bit_depth_not_by_the_image(tmp_path):
    """A dark 8-bit PNG (maximum 1) is 1/255, a 16-bit PNG is divided by 65535, bilevel and
    palette images map to [0, 1], JPEG reads as 8-bit, and --resize makes sizes agree."""
    folder = tmp_path / "mixed_depths"
    folder.mkdir()
    dark = np.ones((4, 4), np.uint8)
    Image.fromarray(dark).save(folder / "a_dark.png")
    deep = np.full((4, 4), 60000, np.uint16)
    Image.fromarray(deep).save(folder / "b_16bit.png")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).convert("1").save(folder / "c_bilevel.png")
    loaded = images.load_images(folder)
    assert loaded.shape == (3, 1, 4, 4)
    assert torch.allclose(loaded[0], torch.full((1, 4, 4), 1 / 255, dtype=torch.float64))
    assert torch.allclose(loaded[1], torch.full((1, 4, 4), 60000 / 65535, dtype=torch.float64))
    assert torch.equal(loaded[2], torch.ones(1, 4, 4, dtype=torch.float64))
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(np.full((6, 6, 3), 200, np.uint8)).save(rgb / "a.jpg", quality=100)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([200, 200, 200] * 256)
    palette.save(rgb / "b.png")
    with pytest.raises(ValueError, match=r"images of one size \(3, 6, 6\).*b.png of size "
                                         r"\(3, 8, 8\)"):
        images.load_images(rgb)
    both = images.load_images(rgb, resize=(4, 4))
    assert both.shape == (2, 3, 4, 4)
    assert torch.allclose(both, torch.full_like(both, 200 / 255), atol=2 / 255)
    with pytest.raises(ValueError, match="resize: expected a size"):
        images.load_images(rgb, resize=(0, 4))
