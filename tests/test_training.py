import math
import pickle

import pytest
import torch

from diffmem import nn as dnn
from diffmem.schedules import VE, VP
from diffmem.training import (
    EMA,
    Checkpoints,
    decay_from_half_life,
    half_life_from_decay,
    load_checkpoint,
)

TWO = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99, 0.999, 0.9999])
def test_half_life_and_decay_invert_exactly(decay):
    h = half_life_from_decay(decay)
    assert decay_from_half_life(h) == decay
    assert 0.5 ** (1 / h) == pytest.approx(decay, rel=1e-15)
    # after h steps the average has forgotten half of a step change
    assert decay ** h == pytest.approx(0.5, rel=1e-12)
    assert decay_from_half_life(0.0) == 0.0
    with pytest.raises(ValueError, match="ema_half_life: expected a number of steps >= 0"):
        decay_from_half_life(-1.0)


def test_ema_is_the_geometric_average():
    model = torch.nn.Linear(3, 1)
    ema = EMA(model, half_life=1.0, steps=100)  # decay 1/2
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.model.weight, w0 + 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.model.weight, w0 + 0.5 * 0.5 + 0.5 * 2.0)
    assert not ema.model.weight.requires_grad


def test_checkpoints_are_atomic_fingerprinted_and_weights_only(tmp_path):
    store = Checkpoints(tmp_path, "abc", keep=2)
    for step in (10, 20, 30):
        store.save(step, {"model": {"w": torch.ones(2) * step}})
    assert [p.name for p in store.all()] == ["step_000000020.pt", "step_000000030.pt"]
    assert store.load_latest()["model"]["w"].tolist() == [30.0, 30.0]
    with pytest.raises(ValueError, match="checkpoint: expected a checkpoint of this "
                                         "configuration"):
        Checkpoints(tmp_path, "other").load_latest()
    # a file that needs arbitrary unpickling is refused, not executed
    evil = tmp_path / "step_000000040.pt"
    evil.write_bytes(pickle.dumps({"step": 40, "payload": object()}, protocol=2))
    with pytest.raises(ValueError, match="checkpoint: expected a readable diffmem checkpoint"):
        load_checkpoint(evil)
    (tmp_path / "step_000000050.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="checkpoint: expected a readable"):
        store.load_latest()
    # leftovers of a killed write are removed when the folder is opened again
    (tmp_path / ".step_000000060.pt.abcd.tmp").write_bytes(b"partial")
    Checkpoints(tmp_path, "abc")
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_without_checkpoint_says_so(tmp_path):
    cfg = dnn.TrainConfig(lambdas=[0.0], parameterizations=["score"], steps=5,
                          ema_half_life=1.0, mlp={"width": 8})
    with pytest.warns(UserWarning, match="--resume: no checkpoint in"):
        dnn.train_dsm(TWO, VP(), cfg, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_diverging_training_stops_with_step_and_learning_rate(tmp_path):
    cfg = dnn.TrainConfig(lambdas=[0.0], parameterizations=["noise"], steps=200, lr=1e6,
                          ema_half_life=1.0, batch_size=8, mlp={"width": 16})
    with pytest.raises(ValueError, match=r"lr: expected a learning rate at which training "
                                         r"stays finite, received 1000000.0 \(the loss became "
                                         r"non-finite at step \d+"):
        dnn.train_dsm(TWO, VP(), cfg, checkpoint_dir=tmp_path, checkpoints=[1],
                      progress=False)
    kept = Checkpoints(tmp_path, "").all()
    assert [p.name for p in kept] == ["step_000000001.pt"]  # the good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in load_checkpoint(kept[0])["model"].values())


def test_fingerprint_includes_the_schedule_parameters(tmp_path):
    cfg = dnn.TrainConfig(lambdas=[0.0], parameterizations=["score"], steps=4,
                          ema_half_life=1.0, mlp={"width": 8})
    dnn.train_dsm(TWO, VP(), cfg, checkpoint_dir=tmp_path, progress=False)
    longer = dnn.TrainConfig(lambdas=[0.0], parameterizations=["score"], steps=8,
                             ema_half_life=1.0, mlp={"width": 8})
    with pytest.raises(ValueError, match="checkpoint: expected a checkpoint of this"):
        dnn.train_dsm(TWO, VP(beta_max=20.0), longer, checkpoint_dir=tmp_path, resume=True,
                      progress=False)
    with pytest.raises(ValueError, match=r"schedule: expected the configuration's schedule "
                                         r"'VP', received VE\(a=10.0\)"):
        dnn.train_dsm(TWO, VE(), longer, checkpoint_dir=tmp_path, resume=True,
                      progress=False)
    dnn.train_dsm(TWO, VP(), longer, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_parameterizations_convert_outputs_to_scores():
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = torch.tensor([[1.0, -2.0], [3.0, 4.0]], dtype=torch.float64)
    score, noise = dnn.parameterization("score"), dnn.parameterization("noise")
    assert torch.equal(score.to_score(out, sigma), out)
    assert torch.allclose(noise.to_score(out, sigma), out / sigma[:, None])
    for p in (score, noise):  # sigma^2 s is sigma^2 times the score, finite at sigma = 0
        assert torch.allclose(p.to_sigma2_score(out, sigma),
                              sigma[:, None] ** 2 * p.to_score(out, sigma))
        assert torch.isfinite(p.to_sigma2_score(out, torch.zeros(2, dtype=torch.float64))).all()
    # the loss is |a net + z|^2 + lambda |s|^2 with a = sigma (score) or 1 (noise)
    z = torch.tensor([[0.1, 0.2], [0.3, -0.4]], dtype=torch.float64)
    lam = 0.3
    for p, a in ((score, sigma), (noise, torch.ones(2, dtype=torch.float64))):
        s = p.to_score(out, sigma)
        expected = ((a[:, None] * out + z) ** 2).sum(1).mean() + lam * (s * s).sum(1).mean()
        assert math.isclose(float(p.loss(out, z, sigma, lam)), float(expected), rel_tol=1e-12)
    with pytest.raises(ValueError, match="parameterization: expected one of"):
        dnn.parameterization("eps")


def test_resume_never_takes_a_network_trained_longer_or_differently(tmp_path):
    """A shorter run resumed from a longer one's folder starts from a checkpoint at most its
    own length and ends with the weights of an uninterrupted short run; another width,
    learning rate, seed or data set is refused."""
    def cfg(steps: int, **kw) -> dnn.TrainConfig:
        return dnn.TrainConfig(**{"lambdas": [0.0], "parameterizations": ["score"],
                                  "steps": steps, "ema_half_life": 1.0,
                                  "mlp": {"width": 8}, **kw})
    dnn.train_dsm(TWO, VP(), cfg(8), checkpoint_dir=tmp_path, checkpoints=[4],
                  progress=False)
    short = dnn.train_dsm(TWO, VP(), cfg(6), checkpoint_dir=tmp_path, resume=True,
                          progress=False)
    fresh = dnn.train_dsm(TWO, VP(), cfg(6), progress=False)
    for a, b in zip(short.model.state_dict().values(), fresh.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    for other, data in [(cfg(8, mlp={"width": 16}), TWO), (cfg(8, lr=1e-2), TWO),
                        (cfg(8, seed=1), TWO), (cfg(8), TWO + 1)]:
        with pytest.raises(ValueError, match="checkpoint: expected a checkpoint of this"):
            dnn.train_dsm(data, VP(), other, checkpoint_dir=tmp_path, resume=True,
                          progress=False)
