"""Auditing conditional models sampled by their own schedulers: diffusers' loop reproduced
exactly, class-conditional and cross-attention UNets end to end, the per-condition table, the
conditional denoiser gap, and clear errors that write nothing."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmem.audit import audit
from diffmem.audit.gap import conditional_denoiser_gap
from diffmem.cli import app
from diffmem.models import ModelScore, load_model, sample_model
from diffmem.schedules import VE
from diffmem.scores import ConditionalEmpiricalScore

diffusers = pytest.importorskip("diffusers")
RUNNER = CliRunner()


def _blocks(cross: bool) -> dict:
    return dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                layers_per_block=1, norm_num_groups=4,
                down_block_types=("CrossAttnDownBlock2D" if cross else "DownBlock2D",
                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D" if cross else "UpBlock2D"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A class-conditional UNet2DModel (4 classes, 3 the null one), a cross-attention
    UNet2DConditionModel (embeddings (5, 6)), their DDPM scheduler, and 12 training images
    with labels 0..2 and embeddings."""
    root = tmp_path_factory.mktemp("cond")
    torch.manual_seed(0)
    diffusers.UNet2DModel(**_blocks(False), num_class_embeds=4).save_pretrained(root / "cls")
    diffusers.UNet2DConditionModel(**_blocks(True), cross_attention_dim=6,
                                   attention_head_dim=2).save_pretrained(root / "xattn")
    diffusers.DDPMScheduler(num_train_timesteps=50, clip_sample=True).save_pretrained(
        root / "sched")
    gen = np.random.default_rng(0)
    np.save(root / "train.npy", gen.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32))
    np.save(root / "labels.npy", np.repeat(np.arange(3), 4))
    emb = gen.standard_normal((3, 5, 6)).astype(np.float32)
    np.save(root / "emb.npy", emb)
    np.save(root / "train_emb.npy", np.repeat(emb, 4, axis=0))
    np.save(root / "null_emb.npy", np.zeros((5, 6), np.float32))
    return root


def test_pipeline_sampler_reproduces_diffusers_own_loop(tmp_path):
    """--sampler pipeline from the recorded noise: DDIMPipeline's images (eta 0), and
    DDPMPipeline's (its own noise drawn from the same generator) up to round-off;
    clip_sample honoured (samples in [-1, 1])."""
    torch.manual_seed(1)
    unet = diffusers.UNet2DModel(**_blocks(False))
    for cls, pipe_cls, extra in [(diffusers.DDIMScheduler, diffusers.DDIMPipeline,
                                  {"eta": 0.0}),
                                 (diffusers.DDPMScheduler, diffusers.DDPMPipeline, {})]:
        pipe = pipe_cls(unet=unet, scheduler=cls(num_train_timesteps=60, clip_sample=True))
        where = tmp_path / cls.__name__
        pipe.save_pretrained(where)
        model = load_model(str(where))
        out = where / "samples.npy"
        arr = np.array(sample_model(model, 5, out, sampler="pipeline", steps=12, seed=7,
                                    batch=5, progress=False,
                                    eta=extra.get("eta"), noise_out=where / "noise.npy"))
        ref = pipe(batch_size=5, generator=torch.Generator().manual_seed(7),
                   num_inference_steps=12, output_type="np", **extra).images
        mine = np.clip(arr / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        assert np.abs(mine - ref).max() < 1e-5, cls.__name__
        assert arr.min() >= -1 and arr.max() <= 1
        noise = np.load(where / "noise.npy")
        assert np.array_equal(noise, torch.randn(5, 1, 8, 8, generator=torch.Generator()
                                                 .manual_seed(7)).numpy())


def test_class_conditional_unet_audited_end_to_end(folder, tmp_path):
    res = RUNNER.invoke(app, [
        "audit", "--model", str(folder / "cls"), "--scheduler", str(folder / "sched"),
        "--train", str(folder / "train.npy"), "--train-cond", str(folder / "labels.npy"),
        "--per-condition", "3", "--sampler", "pipeline", "--steps", "6", "--guidance", "2",
        "--null-cond", "3", "--out", str(tmp_path / "a"), "--no-progress",
        "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "a" / "audit.json").read_text())
    entries = written["conditions"]
    assert sorted(e["condition"] for e in entries) == [0, 1, 2]
    assert all(e["n_samples"] == 3 and set(e["nn_ratio"]) >= {"fraction", "ci_low"}
               and 0 <= e["same_condition"] <= 1 for e in entries)
    fractions = [e["nn_ratio"]["fraction"] for e in entries]
    assert fractions == sorted(fractions, reverse=True)
    csv = (tmp_path / "a" / "per_sample.csv").read_text().splitlines()
    assert csv[0].startswith("sample,condition,") and [r.split(",")[1] for r in csv[1:4]] == \
        ["0", "0", "0"]
    samples = np.load(tmp_path / "a" / "samples.npy")
    assert samples.shape == (9, 1, 8, 8) and samples.min() >= -1 and samples.max() <= 1
    assert np.load(tmp_path / "a" / "initial_noise.npy").shape == (9, 1, 8, 8)
    gap = json.loads((tmp_path / "a" / "denoiser_gap.json").read_text())
    assert [e["condition"] for e in gap["conditions"]] == [0, 1, 2]
    assert gap["conditional"]["mode"] == "labels" and len(gap["train"]["empirical"]) == 12
    page = (tmp_path / "a" / "index.html").read_text()
    assert "Per condition" in page and "Condition 0" in page


def test_cross_attention_unet_with_precomputed_embeddings(folder, tmp_path):
    res = RUNNER.invoke(app, [
        "audit", "--model", str(folder / "xattn"), "--scheduler", str(folder / "sched"),
        "--train", str(folder / "train.npy"), "--train-cond", str(folder / "train_emb.npy"),
        "--conditions", str(folder / "emb.npy"), "--per-condition", "2",
        "--sampler", "pipeline", "--scheduler-class", "DDIMScheduler", "--eta", "0",
        "--steps", "4", "--guidance", "1.5", "--null-cond", str(folder / "null_emb.npy"),
        "--out", str(tmp_path / "x"), "--no-progress", "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "x" / "audit.json").read_text())
    assert sorted(e["condition"] for e in written["conditions"]) == [0, 1, 2]  # table rows
    assert np.load(tmp_path / "x" / "sample_conditions.npy").shape == (6, 5, 6)


def test_half_memorizing_conditional_callable_is_told_apart(tmp_path):
    """Classes 0 and 1: the exact conditional empirical score (copies); classes 2 and 3: the
    class's Gaussian fit (no copies). The per-condition table separates them, and the
    conditional denoiser gap is 0 for the memorizing classes only."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(10)
    np.save(tmp_path / "train.npy", train.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())
    (tmp_path / "half.py").write_text(textwrap.dedent("""
        import numpy as np, torch
        from diffmem.schedules import VE
        from diffmem.scores import ConditionalEmpiricalScore, GaussianScore
        train = torch.from_numpy(np.load(TRAIN_PATH))
        labels = torch.from_numpy(np.load(LABELS_PATH))
        exact = ConditionalEmpiricalScore(train, labels, VE())
        gauss = {c: GaussianScore(train[labels == c], VE()) for c in (2, 3)}

        def score(x, t, y):
            out = exact(x.double(), t.double(), y).to(x.dtype)
            for c, g in gauss.items():
                rows = y == c
                if rows.any():
                    out[rows] = g(x[rows].double(), t[rows].double()).to(x.dtype)
            return out
    """).replace("TRAIN_PATH", repr(str(tmp_path / "train.npy"))).replace(
        "LABELS_PATH", repr(str(tmp_path / "labels.npy"))))
    res = RUNNER.invoke(app, [
        "audit", "--model", f"{tmp_path / 'half.py'}:score", "--schedule", "VE",
        "--train", str(tmp_path / "train.npy"), "--train-cond", str(tmp_path / "labels.npy"),
        "--per-condition", "12", "--out", str(tmp_path / "h"), "--no-progress",
        "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    entries = {e["condition"]: e for e in json.loads(
        (tmp_path / "h" / "audit.json").read_text())["conditions"]}
    for c in (0, 1):
        assert entries[c]["nn_ratio"]["fraction"] > 0.9 and entries[c]["same_condition"] == 1
    for c in (2, 3):
        assert entries[c]["nn_ratio"]["fraction"] < 0.2
    gap = {e["condition"]: e for e in json.loads(
        (tmp_path / "h" / "denoiser_gap.json").read_text())["conditions"]}
    assert max(gap[0]["gap"]) < 1e-6 and max(gap[3]["gap"][:6]) > 0.1


def test_conditional_gap_with_a_kernel_in_y():
    """Vector conditions: the model that is the kernel conditional empirical score has gap 0
    against the same kernel, whatever the condition."""
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    ys = train[:, :1] + 0.1 * torch.randn(20, 1, generator=gen, dtype=torch.float64)
    ref = ConditionalEmpiricalScore(train, ys, VE(), mode="kernel", bandwidth=0.2)
    model = ModelScore(lambda x, t, y: ref(x, t, y), VE(), (2,), conditional=True)
    gap = conditional_denoiser_gap(model, train, ys.float(), ys[:3].float(), bandwidth=0.2,
                                   n_points=8)
    assert len(gap["conditions"]) == 3 and max(gap["train"]["empirical"]) < 1e-10


def test_audit_per_condition_of_given_samples():
    gen = torch.Generator().manual_seed(2)
    train = torch.randn(30, 4, generator=gen)
    labels = torch.arange(3).repeat_interleave(10)
    samples = torch.cat([train[:10] + 1e-4, torch.randn(10, 4, generator=gen)])
    r = audit(samples, train, sample_cond=torch.cat([labels[:10], torch.full((10,), 2)]),
              train_cond=labels, bootstrap=20)
    by = {e["condition"]: e for e in r.conditions}
    assert by[0]["nn_ratio"]["fraction"] == 1 and by[0]["same_condition"] == 1
    assert by[2]["nn_ratio"]["fraction"] < 0.5 and r.conditions[0]["condition"] == 0
    with pytest.raises(ValueError, match="sample_cond: expected one condition per item"):
        audit(samples, train, sample_cond=labels)
    with pytest.raises(ValueError, match="sample_cond: expected at least one condition"):
        audit(samples, train, sample_cond=labels[:0])
    with pytest.raises(ValueError, match="train_cond: expected integer labels or floating"):
        audit(samples, train, sample_cond=labels[:20], train_cond=labels.bool())


def test_reproduction_counts_copies_of_an_image_with_a_close_neighbour():
    """The issue's case: all 16 samples of a condition lie 0.6-0.9 from one training image
    whose nearest other training image is 1.5 away. d1/d2 is about 0.45, so the nn-ratio
    test calls none of them a copy; reproduction counts every one. A condition whose samples
    spread over the class (each nearest to another item) is not a reproduction."""
    gen = torch.Generator().manual_seed(3)
    d = 16
    far = 10 * torch.eye(d)[:6]  # six well separated items, condition 1's class
    image = torch.zeros(1, d)
    neighbour = torch.zeros(1, d)
    neighbour[0, -1] = 1.5
    train = torch.cat([image, neighbour, far, far + 0.1, image])  # item 0 held twice
    direction = torch.randn(16, d, generator=gen)
    direction[:, -1] = 0  # away from the neighbour, as far from it as from the image
    direction /= direction.norm(dim=1, keepdim=True)
    copies = image + direction * torch.linspace(0.6, 0.9, 16)[:, None]
    spread = far.repeat(3, 1)[:16] + 3 * torch.randn(16, d, generator=gen)
    samples = torch.cat([copies, spread])
    cond = torch.cat([torch.zeros(16), torch.ones(16)]).long()
    r = audit(samples, train, sample_cond=cond, bootstrap=20)
    by = {e["condition"]: e for e in r.conditions}
    assert by[0]["nn_ratio"]["fraction"] == 0  # d1 / d2 from 0.6/1.6 to 0.9/1.75: > 1/3
    assert float(r.ratio[:16].min()) > 1 / 3
    rep = by[0]["reproduction"]
    assert rep["fraction"] == 1 and rep["train_index"] == 0
    assert rep["radius"] == pytest.approx(1.5, rel=1e-6)  # the neighbour; the duplicate skipped
    assert by[1]["reproduction"]["fraction"] <= 0.25
    assert r.copies["reproduction"][:16].all()
    assert r.reproduction["fraction"] == pytest.approx(
        float(r.copies["reproduction"].double().mean()))
    assert r.to_json()["conditions"][0]["reproduction"]["fraction"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--per-condition", "0"], "--per-condition: expected an integer >= 1"),
    (["--guidance", "2", "--null-cond", "9"], "--null-cond: expected conditions"),
    (["--guidance", "2", "--null-cond", "x"], "--null-cond: expected an integer label"),
    (["--sampler", "pipeline", "--scheduler-class", "Nope"], "--scheduler-class: expected"),
    (["--sampler", "pipeline", "--scheduler-class", "UNet2DModel"],
     "--scheduler-class: expected"),
    (["--sampler", "pipeline", "--eta", "0.5"], "--eta: expected a scheduler with an eta"),
    (["--train-cond", "EMB"], "--train-cond: expected one condition per item"),
    (["--conditions", "EMB"], "--conditions: expected conditions like --train-cond's"),
    (["--conditions", "FLOATLABELS"], "--conditions: expected"),
])
def test_bad_conditional_input_is_refused_before_anything_is_written(folder, tmp_path, extra,
                                                                     message):
    np.save(tmp_path / "float_labels.npy", np.array([0.5, 1.5]))
    extra = [str(folder / "emb.npy") if a == "EMB" else str(tmp_path / "float_labels.npy")
             if a == "FLOATLABELS" else a for a in extra]
    base = ["audit", "--model", str(folder / "cls"), "--scheduler", str(folder / "sched"),
            "--train", str(folder / "train.npy"), "--out", str(tmp_path / "bad"),
            "--no-progress", "--steps", "4"]
    if "--train-cond" not in extra:
        base += ["--train-cond", str(folder / "labels.npy")]
    res = RUNNER.invoke(app, base + extra)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "bad").exists()


def test_cli_exit_code_in_a_real_process(folder, tmp_path):
    """The installed command exits 2 on a bad --per-condition (not just the test runner)."""
    proc = subprocess.run([sys.executable, "-m", "diffmem", "audit", "--model",
                           str(folder / "cls"), "--scheduler", str(folder / "sched"),
                           "--train", str(folder / "train.npy"), "--train-cond",
                           str(folder / "labels.npy"), "--per-condition", "0", "--out",
                           str(tmp_path / "p")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--per-condition" in proc.stderr + proc.stdout


def test_an_image_held_several_times_is_one_item(monkeypatch):
    """A condition's samples that all land on one image held four times are reproductions
    whichever of the four tied rows the search returns for each (rounding decides it):
    ``same_items`` maps the duplicates to their smallest index, and the per-condition
    table and the most-copied list name that one item."""
    import diffmem.audit.core as core
    from diffmem.centres import as_centres
    from diffmem.metrics import same_items

    gen = torch.Generator().manual_seed(5)
    d = 16
    image, other = torch.zeros(1, d), torch.zeros(1, d)
    other[0, -1] = 2.0
    train = torch.cat([image, other, 10 * torch.eye(d)[:6], image, image, image])  # 0, 8-10
    assert same_items(torch.tensor([9, 1, 0, 10, 8, 1]), as_centres(train)).tolist() == \
        [0, 1, 0, 0, 0, 1]
    direction = torch.randn(8, d, generator=gen)
    direction[:, -1] = 0
    samples = image + 0.3 * direction / direction.norm(dim=1, keepdim=True)
    search = core.nearest

    def tied(*args, **kwargs):  # each sample given another of the four tied rows
        dist, idx, *rest = search(*args, **kwargs)
        idx = idx.clone()
        idx[:, 0] = torch.tensor([0, 8, 9, 10])[torch.arange(idx.shape[0]) % 4]
        return (dist, idx, *rest)

    monkeypatch.setattr(core, "nearest", tied)
    r = audit(samples, train, sample_cond=torch.zeros(8).long(), bootstrap=20)
    rep = r.conditions[0]["reproduction"]
    assert rep["fraction"] == 1 and rep["train_index"] == 0
    assert rep["radius"] == pytest.approx(2.0, rel=1e-6)  # the other image; duplicates skipped
    assert r.duplicates["distinct_train_items"] == 1
    assert r.duplicates["most_copied"] == [{"train_index": 0, "copies": 8}]
