"""The memorization monitor: it stops a model that follows the memorizing denoiser, not one
that generalizes; records, figure, loss gap and copies; diffusers models in training."""

import json

import pytest
import torch

from diffmem.monitor import MemorizationMonitor, nearest_neighbour_median
from diffmem.schedules import VE, VP
from diffmem.scores import EmpiricalScore, GaussianScore, KDEScore

GEN = torch.Generator().manual_seed(0)
TRAIN = torch.randn(30, 2, generator=GEN, dtype=torch.float64)
HELD = torch.randn(30, 2, generator=GEN, dtype=torch.float64)


def test_nearest_neighbour_median_on_a_grid():
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(3.0), indexing="ij"),
                       -1).reshape(-1, 2)
    assert nearest_neighbour_median(0.5 * grid) == pytest.approx(0.5)


def test_monitor_stops_the_memorizing_score_only(tmp_path):
    sch = VE()
    mon = MemorizationMonitor(TRAIN, sch, held_out=HELD, out=tmp_path, patience=2,
                              n_samples=20)
    # VE: m = 1; d = 2 and threshold 0.1: D / 2 is the smaller level
    assert mon.stop_sigma == pytest.approx(0.5 * nearest_neighbour_median(TRAIN))
    a = 0.5 * nearest_neighbour_median(TRAIN)
    assert MemorizationMonitor(TRAIN, VP()).stop_sigma == pytest.approx(a / (1 + a * a) ** 0.5,
                                                                        rel=1e-6)
    first = mon.update(0, GaussianScore(TRAIN, sch))  # generalizes: not following D_e
    assert first["follows_down_to"] is None or first["follows_down_to"] > mon.stop_sigma
    assert not mon.should_stop and first["copied"] < 0.2
    assert len(first["loss_gap"]) == len(mon.sigmas)
    mem = EmpiricalScore(TRAIN, sch)
    r1 = mon.update(100, mem)
    assert r1["follows_down_to"] == min(mon.sigmas) and max(r1["gap"].values()) < 1e-12
    assert not mon.should_stop  # patience 2
    r2 = mon.update(200, mem)
    assert mon.should_stop and mon.stopped_at == 200 and r2["copied"] > 0.9
    low = str(min(mon.sigmas))  # fits its training points better than held-out ones
    assert r2["loss_gap"][low] > 0.1 and abs(first["loss_gap"][low]) < r2["loss_gap"][low]
    lines = (tmp_path / "monitor.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 100, 200]
    assert (tmp_path / "monitor.png").stat().st_size > 1000
    # a little smoothing follows D_e further down than the Gaussian, not to the bottom
    kde = MemorizationMonitor(TRAIN, sch).update(0, KDEScore(TRAIN, sch, 0.3))
    assert kde["follows_down_to"] is not None and kde["follows_down_to"] > min(mon.sigmas)


def test_default_stop_level_in_high_dimension():
    """d = 64, threshold 0.1: sigma / m = D / (2 sqrt(6.4)), below D / 2."""
    train = torch.randn(20, 64, generator=GEN, dtype=torch.float64)
    level = 0.5 * nearest_neighbour_median(train) / 6.4 ** 0.5
    assert MemorizationMonitor(train, VE()).stop_sigma == pytest.approx(level)


def test_monitor_refuses_a_model_on_another_schedule():
    mon = MemorizationMonitor(TRAIN, VE())
    with pytest.raises(ValueError, match="model: expected the score's own schedule"):
        mon.update(0, EmpiricalScore(TRAIN, VP()))
    with pytest.raises(ValueError, match="threshold: expected"):
        MemorizationMonitor(TRAIN, VE(), threshold=-1)
    with pytest.raises(ValueError, match="schedule: expected a diffmem schedule or a diffusers"):
        MemorizationMonitor(TRAIN, "VP")


def test_monitor_takes_a_diffusers_unet_and_scheduler_in_training():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                 block_out_channels=(8, 16), layers_per_block=1,
                                 norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    sched = diffusers.DDPMScheduler(num_train_timesteps=100)
    train = torch.rand(6, 1, 8, 8, generator=GEN) * 2 - 1
    mon = MemorizationMonitor(train, sched, n_points=8, every=10)
    unet.train()
    assert mon.maybe_update(3, (unet, sched)) is None
    rec = mon.maybe_update(10, (unet, sched))
    assert rec is not None and len(rec["gap"]) == 8 and unet.training  # mode restored


def test_restored_records_replay_the_stop_state():
    sch = VE()
    mon = MemorizationMonitor(TRAIN, sch, patience=2)
    mem = EmpiricalScore(TRAIN, sch)
    records = [mon.update(s, mem) for s in (10, 20, 30)]
    assert mon.stopped_at == 20
    again = MemorizationMonitor(TRAIN, sch, patience=2)
    again.restore(json_roundtrip(records))
    assert again.should_stop and again.stopped_at == 20 and len(again.records) == 3
    fresh = MemorizationMonitor(TRAIN, sch, patience=2)
    fresh.restore(json_roundtrip(records[:1]))
    assert not fresh.should_stop
    fresh.update(40, mem)
    assert fresh.should_stop and fresh.stopped_at == 40


def json_roundtrip(records):
    return json.loads(json.dumps(records))


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = MemorizationMonitor(TRAIN, VE(), out=tmp_path, tensorboard=True, held_out=HELD)
    mon.update(7, EmpiricalScore(TRAIN, VE()))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "memorization/follows_down_to" in tags and "memorization/loss_gap_lowest_sigma" in tags
    assert events.Scalars("memorization/follows_down_to")[0].step == 7


def test_lightning_callback_stops_the_trainer():
    lightning = pytest.importorskip("lightning")
    from diffmem.monitor import lightning_callback

    sch = VE()
    mon = MemorizationMonitor(TRAIN, sch, every=2)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, _):
            return (self.w - batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(40, 1)),
                                       batch_size=2)
    trainer = lightning.Trainer(max_steps=20, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[lightning_callback(mon, lambda m: EmpiricalScore(
                                    TRAIN, sch))])
    trainer.fit(Module(), data)
    assert mon.should_stop and trainer.global_step < 20 and mon.stopped_at == 2
