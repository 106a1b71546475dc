"""Latent text-to-image pipelines: prompts read and encoded by the pipeline's own tokenizer
and text encoder, sampling equal to the pipeline's own call, audit/detect/compare with
--prompts, and bad input refused before anything is written. Every pipeline is a tiny one
built in the test (tests/tiny_pipelines.py); nothing is downloaded."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmem.cli import app
from diffmem.prompts import read_prompts

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_pipelines import sd_pipeline  # noqa: E402

PROMPTS = ["a red square", "a blue circle", "two green lines"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def test_prompts_files_lines_and_json_lines(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(plain).texts == ["a cat", "a dog"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a cat", "label": 1}\n{"prompt": "a dog"}\n')
    got = read_prompts(lines)
    assert got.texts == ["a cat", "a dog"] and got.labels == ["1", None]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="--prompts: expected at least one prompt"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("prediction, scheduler", [("epsilon", "DDIMScheduler"),
                                                   ("v_prediction", "EulerDiscreteScheduler")])
def test_pipeline_sampler_equals_the_pipelines_own_call(tmp_path, prediction, scheduler):
    from diffmem.models import sample_model
    from diffmem.text import Prompts, load_text_model

    folder = sd_pipeline(tmp_path / "pipe", prediction=prediction, scheduler=scheduler)
    tm = load_text_model(folder, Prompts(PROMPTS[:2]))
    model = tm.model
    assert model.data_shape == (4, 8, 8) and model.network["image_shape"] == (3, 16, 16)
    assert tm.default_guidance == 7.5
    model.guided(tm.default_guidance, torch.tensor(2))
    cond = torch.tensor([0, 1, 1])
    out = sample_model(model, 3, tmp_path / "s.npy", sampler="pipeline", steps=6, batch=3,
                       progress=False, cond=cond)
    z = torch.from_numpy(np.load(tmp_path / "s_initial_noise.npy"))
    ref = tm.pipe(prompt=[PROMPTS[i] for i in cond], latents=z, num_inference_steps=6,
                  guidance_scale=7.5, output_type="pt").images
    assert out.shape == (3, 3, 16, 16)
    assert np.abs(out - ref.numpy()).max() <= 1e-5
    # the score agrees with the network: epsilon / v to score on the scheduler's schedule
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    model.guided(None, None)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        raw = tm.pipe.unet(x, model.schedule.timestep(t),
                           encoder_hidden_states=tm.pipe.encode_prompt(
                               [PROMPTS[0], PROMPTS[1]], "cpu", 1, False)[0]).sample
    m, s = model.schedule.m(t.double()).float(), model.schedule.sigma(t.double()).float()
    want = -raw / s[:, None, None, None] if prediction == "epsilon" else \
        -(m[:, None, None, None] * raw + s[:, None, None, None] * x) / s[:, None, None, None]
    assert torch.allclose(model(x, t, y), want, rtol=1e-4, atol=1e-4)


def _images(folder, n, size, seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
            folder / f"{i}.png")
    return folder


def test_audit_detect_and_compare_take_prompts(sd, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "label": i % 2}) for i, p in
                                 enumerate(PROMPTS)) + "\n" + json.dumps(
        {"prompt": "long " * 20}) + "\n")
    train = _images(tmp_path / "train", 5, 24)  # resized to the pipeline's 16 x 16
    res = CliRunner().invoke(app, [
        "audit", "--model", str(sd), "--prompts", str(prompts), "--train", str(train),
        "--sampler", "pipeline", "--steps", "3", "--per-condition", "2", "--no-progress",
        "--out", str(tmp_path / "audit")])
    assert res.exit_code == 0, res.output
    assert "1 prompt(s) longer than the tokenizer's 24 tokens are truncated" in res.output
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert sorted(e["condition"] for e in report["conditions"]) == sorted(PROMPTS +
                                                                          ["long " * 20])
    assert report["inputs"]["truncated_prompts"] == [3]
    assert {e["condition"]: e.get("prompt_label") for e in report["conditions"]}[
        PROMPTS[1]] == "1"
    assert report["inputs"]["train_resized_to"] == [16, 16]
    assert np.load(tmp_path / "audit" / "initial_noise.npy").shape == (8, 4, 8, 8)
    assert np.load(tmp_path / "audit" / "samples.npy").shape == (8, 3, 16, 16)
    assert np.load(tmp_path / "audit" / "sample_conditions.npy").tolist() == [0, 0, 1, 1, 2,
                                                                              2, 3, 3]
    page = (tmp_path / "audit" / "index.html").read_text()
    assert "a blue circle" in page
    assert all(e["same_condition"] is None for e in report["conditions"])
    np.save(tmp_path / "tcond.npy", np.array([0, 1, 2, 3, 0]))  # each image's prompt line
    res = CliRunner().invoke(app, [
        "audit", "--model", str(sd), "--prompts", str(prompts), "--train", str(train),
        "--train-cond", str(tmp_path / "tcond.npy"), "--sampler", "pipeline", "--steps", "3",
        "--per-condition", "2", "--no-progress", "--out", str(tmp_path / "audit_tc")])
    assert res.exit_code == 0, res.output
    with_cond = json.loads((tmp_path / "audit_tc" / "audit.json").read_text())
    import csv

    with open(tmp_path / "audit_tc" / "per_sample.csv", newline="") as f:
        nearest = np.array([int(row["nearest"]) for row in csv.DictReader(f)])
    same = np.array([0, 1, 2, 3, 0])[nearest] == np.repeat(np.arange(4), 2)
    got = {e["prompt_index"]: e["same_condition"] for e in with_cond["conditions"]}
    for j in range(4):  # the fraction of the prompt's samples nearest an image of its own
        assert got[j] == pytest.approx(same[2 * j: 2 * j + 2].mean())

    res = CliRunner().invoke(app, [
        "detect", "--model", str(sd), "--prompts", str(prompts), "--steps", "4",
        "--n-noise", "2", "--no-progress", "--out", str(tmp_path / "detect")])
    assert res.exit_code == 0, res.output
    found = json.loads((tmp_path / "detect" / "detect.json").read_text())["conditions"]
    assert {e["condition"] for e in found} >= set(PROMPTS)
    assert {e.get("prompt_label") for e in found if e["condition"] in PROMPTS} == {"0", "1"}
    # the file's labels are detect's --labels: the ROC over the labelled prompts
    assert {e["condition"]: e.get("label") for e in found}[PROMPTS[1]] == 1
    assert json.loads((tmp_path / "detect" / "detect.json").read_text())["roc"]
    # a reference of prompts is generated as the tested ones are (same noise, same guidance):
    # a tested prompt given again as reference gets the same consistency ratio, to the float32
    # network's rounding in other batches (without the guidance it would differ by O(1))
    (tmp_path / "ref.txt").write_text(f"{PROMPTS[2]}\na green circle\n")
    res = CliRunner().invoke(app, [
        "detect", "--model", str(sd), "--prompts", str(prompts), "--steps", "4",
        "--n-noise", "2", "--generations", "8", "--confirm-steps", "3",
        "--reference", str(tmp_path / "ref.txt"),
        "--no-progress", "--out", str(tmp_path / "detect_ref")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "detect_ref" / "detect.json").read_text())
    assert doc["verdict"]["kind"] == "reference" and doc["verdict"]["n_reference"] == 2
    assert doc["verdict"]["measure"] == "consistency_ratio"
    note = "2 reference entries bound the false-positive rate at 0.333, not --fpr 0.05: 19 " \
        "or more reach it"
    assert f"note: {note}" in res.output
    assert note in (tmp_path / "detect_ref" / "index.html").read_text()
    tested = {e["condition"]: e for e in doc["conditions"]}[PROMPTS[2]]
    assert [e["condition"] for e in doc["reference"]] == [PROMPTS[2], "a green circle"]
    assert doc["reference"][0]["consistency_ratio"] == pytest.approx(
        tested["consistency_ratio"], rel=1e-5)

    half = _images(tmp_path / "half", 5, 16, seed=1)
    res = CliRunner().invoke(app, [
        "compare", "--model-a", str(sd), "--model-b", str(sd), "--train-a", str(train),
        "--train-b", str(half), "--prompts", str(prompts), "--sampler", "pipeline",
        "--steps", "3", "--n-samples", "4", "--bootstrap", "50", "--no-progress",
        "--out", str(tmp_path / "compare")])
    assert res.exit_code == 0, res.output
    pairs = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert pairs["agreement"] == 1.0  # one model against itself: every pair coincides


def _refused(args, out, *needles):
    res = CliRunner().invoke(app, args + ["--out", str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    for needle in needles:
        assert needle in res.output, res.output
    assert "Traceback" not in res.output
    assert not (out / "audit.json").exists() and not (out / "samples.npy").exists()


def test_bad_pipelines_and_prompts_are_refused_before_anything_is_written(sd, tmp_path):
    import shutil

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    train = _images(tmp_path / "train", 3, 16)
    base = ["audit", "--model", str(sd), "--train", str(train), "--prompts", str(prompts)]
    (tmp_path / "empty.txt").write_text("")
    _refused(base[:-1] + [str(tmp_path / "empty.txt")], tmp_path / "o1",
             "--prompts: expected at least one prompt")
    broken = tmp_path / "broken"
    shutil.copytree(sd, broken)
    shutil.rmtree(broken / "vae")
    _refused(["audit", "--model", str(broken), "--train", str(train), "--prompts",
              str(prompts)], tmp_path / "o2", "--model", "missing vae")
    mismatched = sd_pipeline(tmp_path / "mismatch", vocab_extra=10)
    _refused(["audit", "--model", str(mismatched), "--train", str(train), "--prompts",
              str(prompts)], tmp_path / "o3", "a tokenizer that matches its text encoder")
    np.save(tmp_path / "small.npy", np.zeros((3, 3, 8, 8), np.float32))
    _refused(["audit", "--model", str(sd), "--train", str(tmp_path / "small.npy"),
              "--prompts", str(prompts)], tmp_path / "o4",
             "--train: expected images of the model's size (3, 16, 16)")
    _refused(base + ["--conditions", str(tmp_path / "small.npy")], tmp_path / "o5",
             "--conditions: expected no value with --prompts")
    _refused(base + ["--dtype", "float8"], tmp_path / "o6", "--dtype: expected one of")
    np.save(tmp_path / "tc.npy", np.array([0, 1, 1]))  # one prompt: line 1 does not exist
    _refused(base + ["--train-cond", str(tmp_path / "tc.npy")], tmp_path / "o7",
             "--train-cond: expected with --prompts, one prompt index per training item",
             "values 0 to 1")
    detect = ["detect", "--model", str(sd), "--prompts", str(prompts)]
    _refused(detect + ["--reference", str(tmp_path / "empty.txt")], tmp_path / "o8",
             "--reference: expected at least one prompt")  # named as the option given
    _refused(detect + ["--reference", str(tmp_path / "none.txt")], tmp_path / "o9",
             "--reference: expected a readable UTF-8 text file")
    _refused(detect + ["--fpr", "nan"], tmp_path / "o10",  # before any generation
             "--fpr: expected a false-positive rate in [0, 1), received nan")


@pytest.mark.parametrize("layout", ["sdxl", "sd3"])
def test_sdxl_and_sd3_pipelines_sample_as_their_own_call(tmp_path, layout):
    """SDXL (two encoders, pooled embeddings and size conditioning, zeros as the null
    condition) and SD3 (a diffusion transformer with pooled projections on flow matching)."""
    from tiny_pipelines import sd3_pipeline, sdxl_pipeline

    from diffmem.models import DiscreteFlow, sample_model
    from diffmem.text import Prompts, load_text_model

    folder = (sdxl_pipeline if layout == "sdxl" else sd3_pipeline)(tmp_path / layout)
    tm = load_text_model(folder, Prompts(PROMPTS[:2]))
    model = tm.model
    assert isinstance(model.schedule, DiscreteFlow) == (layout == "sd3")
    model.guided(tm.default_guidance, torch.tensor(2))
    out = sample_model(model, 2, tmp_path / "s.npy", sampler="pipeline", steps=4, batch=2,
                       progress=False, cond=torch.tensor([0, 1]))
    z = torch.from_numpy(np.load(tmp_path / "s_initial_noise.npy"))
    ref = tm.pipe(prompt=PROMPTS[:2], latents=z, num_inference_steps=4,
                  guidance_scale=tm.default_guidance, output_type="pt").images
    assert np.abs(out - ref.numpy()).max() <= 1e-5


def test_dit_transformer_loads_like_a_class_conditional_unet(tmp_path):
    """A DiT pipeline folder (transformer, VAE, scheduler): class labels, the learned
    variance dropped, samples decoded; equal to DiTPipeline's own call."""
    import diffusers
    from tiny_pipelines import dit_pipeline

    from diffmem.models import load_diffusers, sample_model

    folder = dit_pipeline(tmp_path / "dit")
    model = load_diffusers(folder)
    assert model.conditional and model.network["image_shape"] == (3, 16, 16)
    model.guided(4.0, torch.tensor(1000))  # DiT's null class
    labels = torch.tensor([3, 7])
    out = sample_model(model, 2, tmp_path / "s.npy", sampler="pipeline", steps=4, batch=2,
                       progress=False, cond=labels, seed=5)
    pipe = diffusers.DiTPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=labels.tolist(), guidance_scale=4.0, num_inference_steps=4,
               generator=torch.Generator().manual_seed(5), output_type="np").images
    assert np.abs(out.transpose(0, 2, 3, 1) - ref).max() <= 1e-5


def test_killed_prompt_audit_reruns_to_identical_samples(sd, tmp_path):
    from test_faults import CLI, _kill_when, _run

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    train = _images(tmp_path / "train", 3, 16)
    args = ["audit", "--model", str(sd), "--prompts", str(prompts), "--train", str(train),
            "--sampler", "pipeline", "--steps", "3", "--per-condition", "4", "--batch-size",
            "2", "--bootstrap", "20", "--no-progress"]
    whole = CliRunner().invoke(app, args + ["--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "cut"
    mark = out / "samples.npy.progress.json"
    code = _kill_when(CLI + args + ["--out", str(out)], mark.exists, 0.05)
    assert code == -9 and 0 < json.loads(mark.read_text())["done"] < 12  # while sampling
    again = _run(args + ["--out", str(out)])
    assert again.returncode == 0, again.stderr
    for name in ("samples.npy", "initial_noise.npy", "sample_conditions.npy"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize("part", ["text_encoder/model.safetensors", "tokenizer/tokenizer.json",
                                  "unet/config.json"])
def test_corrupt_pipeline_files_are_clear_errors(sd, tmp_path, part):
    import shutil

    broken = tmp_path / "pipe"
    shutil.copytree(sd, broken)
    target = broken / part
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    _refused(["audit", "--model", str(broken), "--train", str(_images(tmp_path / "t", 2, 16)),
              "--prompts", str(prompts)], tmp_path / "out", "--model")


def test_a_clip_vision_folder_is_a_feature_space(tmp_path):
    """--features FOLDER: a CLIP vision model built here; identical images have identical
    unit-length features, and the audit runs in that space."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffmem.audit.features import load_features

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=16)).save_pretrained(str(tmp_path / "clip"))
    f = load_features(tmp_path / "clip")
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    v = f(torch.cat([images, images[:1]]))
    assert v.shape == (5, 16) and torch.allclose(v.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(v[0], v[4], atol=1e-6) and not torch.allclose(v[0], v[1], atol=1e-3)
    np.save(tmp_path / "train.npy", images.numpy())
    np.save(tmp_path / "samples.npy", images[:2].numpy())
    res = CliRunner().invoke(app, ["audit", str(tmp_path / "samples.npy"), "--train",
                                   str(tmp_path / "train.npy"), "--features",
                                   str(tmp_path / "clip"), "--bootstrap", "20",
                                   "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["nn_ratio"]["fraction"] == 1.0  # each sample is a training image
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--features: expected a CLIP model folder"):
        load_features(tmp_path / "bad")


def test_a_clip_model_folder_gives_image_and_text_features_in_one_space(tmp_path):
    """A two-tower CLIP folder (as CLIP checkpoints are published) is a feature space: the
    image features are its projected image embeddings and the text features its projected
    text embeddings, both unit length, so their dot product is the CLIP cosine computed by
    the model's own towers; a vision-only folder has no text features."""
    from transformers import CLIPModel, CLIPTokenizer

    from diffmem.audit.features import load_clip_text, load_features
    from diffmem.tiny import clip_model

    folder = clip_model(tmp_path / "clip")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    v = load_features(folder)(images)
    t = load_clip_text(folder)(["a red square", "a blue circle", "a red square"])
    assert v.shape == (3, 16) and t.shape == (3, 16)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t[0], t[2]) and not torch.allclose(t[0], t[1], atol=1e-3)
    model = CLIPModel.from_pretrained(str(folder)).eval()
    tok = CLIPTokenizer.from_pretrained(str(folder))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():  # the towers by hand: images already at the model's size
        img = model.visual_projection(model.vision_model(
            pixel_values=(images - mean) / std).pooler_output)
        ids = tok(["a blue circle"], padding="max_length", max_length=24, return_tensors="pt")
        txt = model.text_projection(model.text_model(**ids).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert torch.allclose(v @ t[1], cos, atol=1e-5)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=16)).save_pretrained(str(tmp_path / "vision"))
    assert load_clip_text(tmp_path / "vision") is None


def test_pixart_transformer_takes_precomputed_embeddings(tmp_path):
    """PixArt's transformer (learned variance, no added conditions) as a score from its
    network's output, conditioned on precomputed (seq, dim) embeddings."""
    import diffusers

    from diffmem.models import load_diffusers, network_output_to_score

    torch.manual_seed(0)
    net = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=16,
        norm_type="ada_norm_single", use_additional_conditions=False)
    net.save_pretrained(str(tmp_path / "transformer"))
    diffusers.DDIMScheduler(num_train_timesteps=100).save_pretrained(str(tmp_path / "sched"))
    model = load_diffusers(tmp_path / "transformer", tmp_path / "sched")
    assert model.conditional and model.data_shape == (4, 8, 8)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    y = torch.randn(2, 5, 32)
    with torch.no_grad():
        raw = net(x, encoder_hidden_states=y, timestep=model.schedule.timestep(t),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
    want = network_output_to_score(raw, x, model.schedule.m(t.double()).float(),
                                   model.schedule.sigma(t.double()).float(), "epsilon")
    assert torch.allclose(model(x, t, y), want, rtol=1e-4, atol=1e-4)


def test_text_to_image_example_fine_tunes_a_pipeline_that_audits(sd, tmp_path, monkeypatch):
    """examples/train_text2image.py: a few steps on captioned images (one duplicated), the
    saved pipeline loads with its prompts and its reconstructions are the training images'
    size."""
    import subprocess
    import sys
    from pathlib import Path

    from diffmem.text import Prompts, load_text_model

    _images(tmp_path / "imgs", 3, 20)
    lines = [{"image": f"imgs/{i}.png", "caption": c} for i, c in
             [(0, PROMPTS[0])] * 3 + [(1, PROMPTS[1]), (2, PROMPTS[2])]]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    example = Path(__file__).resolve().parent.parent / "examples" / "train_text2image.py"
    res = subprocess.run([sys.executable, str(example), "--pipeline", str(sd), "--data",
                          str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "run"),
                          "--steps", "5", "--batch-size", "2"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "step 5: loss" in res.stdout  # steps counted from 1
    assert np.load(tmp_path / "run" / "reconstructions.npy").shape == (3, 3, 16, 16)
    tuned = load_text_model(tmp_path / "run" / "pipeline", Prompts(PROMPTS))
    before = load_text_model(sd, Prompts(PROMPTS))
    a = dict(tuned.pipe.unet.named_parameters())["conv_in.weight"]
    b = dict(before.pipe.unet.named_parameters())["conv_in.weight"]
    assert not torch.equal(a, b)  # trained
    res = subprocess.run([sys.executable, str(example), "--pipeline", str(sd), "--data",
                          str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "dedup"),
                          "--steps", "2", "--batch-size", "2", "--dedupe",
                          "--embedding-noise", "0.1", "--loss-filter", "1e-6",
                          "--caption-randomization", "0.5"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "dedupe: 3 distinct images of 5 items (2 exact duplicates removed)" in res.stdout
    assert "step 2: loss 0.0000 (4 items filtered so far)" in res.stdout  # every item: > 1e-6
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_text2image", example)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for flag, value in (("--loss-filter", "0"), ("--embedding-noise", "-1"),
                        ("--caption-randomization", "1.5")):  # refused before any work
        monkeypatch.setattr(sys, "argv", [str(example), "--pipeline", str(sd), "--data",
                                          str(tmp_path / "data.jsonl"), "--out",
                                          str(tmp_path / "bad"), flag, value])
        with pytest.raises(SystemExit, match=f"{flag}: expected"):
            mod.main()
        assert not (tmp_path / "bad").exists()
    captions = ["a red square", "a blue circle on the left"]
    drawn = mod.random_captions(captions, 50, seed=1)
    vocab = {"a", "red", "square", "blue", "circle", "on", "the", "left"}
    assert len(drawn) == 50 and all(set(c.split()) <= vocab for c in drawn)
    assert {len(c.split()) for c in drawn} == {3, 6} and len(set(drawn)) > 40
    assert drawn == mod.random_captions(captions, 50, seed=1)


@pytest.mark.parametrize("layout", ["flux", "pixart-alpha", "pixart-sigma"])
def test_flux_and_pixart_pipelines_sample_as_their_own_call(tmp_path, layout):
    """FLUX (CLIP pooled + T5 embeddings, packed latents with positions, distilled guidance
    as a network input, true classifier-free guidance, FLUX's sigmas with dynamic
    shifting) at a resolution of our choosing, and PixArt (T5 embeddings with their
    attention mask, a learned variance): diffmem's pipeline sampler equals the pipelines'
    own call from the same initial latents."""
    from tiny_pipelines import flux_pipeline, pixart_pipeline

    from diffmem.models import DiscreteFlow, pack_latents, sample_model, unpack_latents
    from diffmem.text import Prompts, TextOptions, load_text_model

    flux = layout == "flux"
    folder = flux_pipeline(tmp_path / "p") if flux else \
        pixart_pipeline(tmp_path / "p", sigma=layout.endswith("sigma"))
    tm = load_text_model(folder, Prompts(PROMPTS[:2]),
                         TextOptions(resolution=(24, 16) if flux else None))
    model = tm.model
    assert isinstance(model.schedule, DiscreteFlow) == flux
    assert model.data_shape == ((4, 12, 8) if flux else (4, 8, 8))
    assert tm.default_guidance == (1.0 if flux else 4.5)  # FLUX: true_cfg_scale's default
    x = torch.randn(2, 4, 12, 8)
    assert torch.equal(unpack_latents(pack_latents(x), 12, 8), x)
    for w in ([None, 2.5] if flux else [tm.default_guidance]):
        model.guided(w, None if w is None else torch.tensor(2))
        out = sample_model(model, 2, tmp_path / f"s{w}.npy", sampler="pipeline", steps=4,
                           batch=2, progress=False, cond=torch.tensor([1, 0]))
        z = torch.from_numpy(np.load(tmp_path / f"s{w}_initial_noise.npy"))
        if flux:
            ref = tm.pipe(prompt=PROMPTS[1::-1], latents=pack_latents(z), height=24, width=16,
                          num_inference_steps=4, output_type="pt",
                          **({} if w is None else {"true_cfg_scale": w,
                                                   "negative_prompt": ""})).images
        else:
            ref = tm.pipe(prompt=PROMPTS[1::-1], latents=z, num_inference_steps=4,
                          guidance_scale=w, use_resolution_binning=False,
                          output_type="pt").images
        assert np.abs(out - ref.numpy()).max() <= 1e-5
    if not flux:
        return
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    train = _images(tmp_path / "train", 3, 20)  # resized to --resolution
    common = ["--model", str(folder), "--prompts", str(prompts), "--resolution", "16,16",
              "--steps", "3", "--no-progress"]
    res = CliRunner().invoke(app, ["audit", *common, "--train", str(train), "--sampler",
                                   "pipeline", "--per-condition", "1", "--bootstrap", "20",
                                   "--out", str(tmp_path / "audit")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "audit" / "samples.npy").shape == (3, 3, 16, 16)
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["inputs"]["train_resized_to"] == [16, 16]
    res = CliRunner().invoke(app, ["detect", *common, "--n-noise", "2",
                                   "--out", str(tmp_path / "detect")])
    assert res.exit_code == 0, res.output
    found = json.loads((tmp_path / "detect" / "detect.json").read_text())["conditions"]
    assert {e["condition"] for e in found} == set(PROMPTS)
    _refused(["audit", *common, "--train", str(train), "--attention-slicing"],
             tmp_path / "o", "--attention-slicing: expected a network with sliceable")


def test_resolution_and_attention_slicing(sd, tmp_path):
    """--resolution: the pipeline generates (and the audit compares) at another size, as
    its own call with that height and width; sizes the network cannot take and the options
    without --prompts are refused. Attention slicing changes memory, not samples."""
    from diffmem.models import sample_model
    from diffmem.text import Prompts, TextOptions, load_text_model

    prompts = Prompts(PROMPTS[:2])
    outs = []
    for slicing in (False, True):
        tm = load_text_model(sd, prompts, TextOptions(resolution=(24, 32),
                                                      attention_slicing=slicing))
        assert tm.model.data_shape == (4, 12, 16)
        tm.model.guided(7.5, torch.tensor(2))
        outs.append(sample_model(tm.model, 2, tmp_path / f"{slicing}.npy", sampler="pipeline",
                                 steps=3, batch=2, progress=False, cond=torch.tensor([0, 1])))
    z = torch.from_numpy(np.load(tmp_path / "True_initial_noise.npy"))
    ref = tm.pipe(prompt=PROMPTS[:2], latents=z, height=24, width=32, num_inference_steps=3,
                  output_type="pt").images
    assert outs[0].shape == (2, 3, 24, 32)
    assert np.abs(outs[0] - ref.numpy()).max() <= 1e-5
    assert np.abs(outs[1] - outs[0]).max() <= 1e-5
    with pytest.raises(ValueError, match="--resolution: expected H,W positive multiples of 4"):
        load_text_model(sd, prompts, TextOptions(resolution=(18, 16)))
    p = tmp_path / "p.txt"
    p.write_text("a cat\n")
    train = _images(tmp_path / "train", 2, 16)
    _refused(["audit", "--model", str(sd), "--train", str(train), "--resolution", "24,24"],
             tmp_path / "o1", "--resolution: expected --prompts")
    _refused(["audit", "--model", str(sd), "--train", str(train), "--prompts", str(p),
              "--resolution", "24"], tmp_path / "o2", "--resolution: expected H,W")


def test_memorization_example_writes_its_data_and_summarizes(tmp_path, capsys):
    """examples/memorize_captions.py (its full run is measured by hand: minutes): 24 shape
    captions of distinct variants and three captions of one duplicated picture each, the
    labelled prompts; and its summary's AUC."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "memorize_captions.py"
    spec = importlib.util.spec_from_file_location("memorize_captions", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    data, prompts, labels, train = demo.write_data(tmp_path, copies=5, variants=3)
    rows = demo._rows(data)
    # 24 shape captions of 3 pictures each, then 3 captions of one picture held 5 times
    assert len(rows) == 24 * 3 + 3 * 5 and np.load(train).shape == (87, 3, 16, 16)
    assert np.load(labels).tolist() == [0] * 24 + [1] * 3
    assert sorted(set(rows)) == list(range(24 * 3 + 3))
    texts = read_prompts(prompts)
    assert len(set(texts.texts)) == 27 and texts.labels.count("1") == 3
    assert texts.texts[-3:] == ["the flag of zorbia", "the emblem of quell", "the crest of vardo"]
    pics = np.load(train)
    assert rows[-5:] == [74] * 5 and all(np.array_equal(pics[-1], p) for p in pics[-5:])
    conds = np.load(tmp_path / "train_cond.npy")
    assert len(conds) == len(rows) and conds[:3].tolist() == [0] * 3
    counts = np.bincount(conds, minlength=27)  # rows per prompt: 5 for a duplicated one
    assert (counts == np.where(np.load(labels) == 1, 5, 3)).all()
    variants = pics[0:3]  # the red square on the left: three different pictures
    assert all(not np.array_equal(variants[i], variants[j]) for i, j in [(0, 1), (0, 2), (1, 2)])
    assert (np.abs(variants - variants[0]).max() > 0.1)
    emblems = pics[[72, 77, 82]]  # unlike any shape picture
    assert min(np.abs(e - p).max() for e in emblems for p in pics[:72]) > 0.5
    assert demo.auc(np.array([3.0, 2.0, 1.0, 0.5]), np.array([True, False, True, False])) \
        == 0.75
    (tmp_path / "audit").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text(prompts.read_text())
    np.save(tmp_path / "audit" / "samples.npy", np.zeros((6, 3, 16, 16), np.float32))
    np.save(tmp_path / "audit" / "sample_conditions.npy", np.repeat(np.arange(3), 2))
    np.save(tmp_path / "run" / "reconstructions.npy", np.ones((66, 3, 16, 16), np.float32))
    from PIL import Image

    grid = np.asarray(Image.open(demo.draw_grid(tmp_path)))
    assert grid.shape == (3 * 48, 3 * 48, 3)  # 3 prompts: picture + 2 samples, 3x3 pixels
    assert (grid[:, :48] == 255).all() and (grid[:, 48:] == 0).all()


def test_every_tokenizer_is_checked_against_its_encoder():
    """FLUX's and SD3's second and third tokenizers too: ids beyond the encoder's table."""
    from types import SimpleNamespace

    from diffmem.text import _check_tokenizer

    def enc(v):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=v))

    pipe = SimpleNamespace(tokenizer=[0] * 10, text_encoder=enc(10),
                           tokenizer_2=[0] * 80, text_encoder_2=enc(76))
    with pytest.raises(ValueError, match="tokenizer_2 below text_encoder_2's vocab_size 76"):
        _check_tokenizer(pipe)
    pipe.text_encoder_2 = enc(80)
    _check_tokenizer(pipe)
