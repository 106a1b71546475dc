"""The experiments regularize-digits, detect-digits, size-transition, mitigate-digits and
mitigate-captions: tiny runs record what their metrics promise, verdicts take their three
states on constructed metrics, and experiments that need diffusers are skipped by reproduce
without it, saying so."""

import json

import pytest
import torch
from typer.testing import CliRunner

from diffmem.cli import app
from diffmem.experiments import get_experiment
from diffmem.experiments.base import resolve_params, run_experiment
from diffmem.experiments.transition import crossing


def _run(tmp_path, name, overrides):
    exp = get_experiment(name)
    params = resolve_params(exp, quick=True, overrides=overrides)
    rec = run_experiment(exp, tmp_path, params, progress=False)
    return rec, json.loads((tmp_path / name / "metrics.json").read_text())


def test_regularize_digits_tiny_run(tmp_path):
    pytest.importorskip("diffusers")
    rec, m = _run(tmp_path, "regularize-digits", [
        "steps=20", "every=10", "n_samples=6", "sample_steps=3", "width=8", "n_train=6",
        "monitor_points=4", "show=2"])
    assert set(m["runs"]) == {"plain", "penalty", "early_stop"}
    for r in m["runs"].values():
        assert set(r) >= {"memorized", "distance", "stopped_at", "steps"}
        assert 0 <= r["memorized"] <= 1 and r["distance"] > 0
    assert m["runs"]["plain"]["steps"] == 20 and m["monitor"]["updates"] >= 1
    assert rec.verdict.status in ("confirmed", "not_reproduced", "inconclusive")
    assert (tmp_path / "regularize-digits" / "tradeoff.png").is_file()


def test_regularize_digits_verdicts():
    judge = get_experiment("regularize-digits").judge
    runs = lambda p, q, e: {"runs": {  # noqa: E731
        "plain": {"memorized": p, "distance": 1.0, "stopped_at": None},
        "penalty": {"memorized": q, "distance": 1.0, "stopped_at": None},
        "early_stop": {"memorized": e, "distance": 1.0, "stopped_at": 500}}}
    assert judge(runs(0.8, 0.1, 0.2), {}).status == "confirmed"
    assert judge(runs(0.8, 0.9, 0.2), {}).status == "not_reproduced"
    assert judge(runs(0.2, 0.1, 0.0), {}).status == "inconclusive"


def test_detect_digits_tiny_run_and_verdicts(tmp_path):
    pytest.importorskip("diffusers")
    rec, m = _run(tmp_path, "detect-digits", [
        "steps=10", "every=10", "n_classes=2", "per_class=4", "n_single=3", "width=8",
        "per_condition=2", "sample_steps=3", "n_noise=2", "uncond_train=6", "uncond_dup=1",
        "uncond_times=3", "uncond_samples=4", "show=2"])
    assert set(m["models"]) == {"linear-eps", "scaled-linear-v", "cosine-sample"}
    for res in m["models"].values():
        assert len(res["conditions"]) == 5
        assert [c["repeats"] for c in res["conditions"]] == [1, 1, 5, 15, 50]
        assert {c["kind"] for c in res["conditions"]} == {"digit class", "single image"}
        assert all(0 <= c["copied"] <= 1 for c in res["conditions"])
        assert set(res["measures"]) >= {"wen", "gap", "collapse", "consistency"}
    assert len(m["unconditional"]["samples"]) == 4
    u = m["unconditional"]
    assert all(e["copy"] >= e["copy_nn_ratio"] for e in u["samples"])  # nn-ratio or calibrated
    assert u["n_copies"] == sum(e["copy"] for e in u["samples"]) >= u["n_copies_nn_ratio"]
    assert set(u["verdict"]["against_nn_ratio_alone"]) >= {"tpr", "fpr"}
    assert set(m["unconditional"]["measures"]) == {"jacobian", "flipd", "reconstruction",
                                                 "spectral"}
    judge = get_experiment("detect-digits").judge

    for res in m["models"].values():
        assert res["verdict"]["kind"] == "consistency"
        assert all(isinstance(c["memorized"], bool) for c in res["conditions"])
    assert m["unconditional"]["verdict"]["kind"] == "point"

    def metrics(auc, u_auc, tpr=1.0, fpr=0.0, clean=20):
        verdict = {"tpr": tpr, "fpr": fpr, "n_positive": 6, "n_negative": clean}
        model = {"primary": "gap", "measures": {"gap": {"auc": auc}}, "verdict": verdict}
        return {"models": {"a": model, "b": model},
                "unconditional": {"primary": "flipd", "measures": {"flipd": {"auc": u_auc}},
                                  "n_copies": 3, "samples": [{}] * 10, "verdict": verdict}}
    assert judge(metrics(0.97, 0.96), {}).status == "confirmed"
    assert judge(metrics(0.97, 0.90), {}).status == "not_reproduced"
    assert judge(metrics(0.80, 0.99), {}).status == "not_reproduced"
    assert judge(metrics(None, 0.99), {}).status == "inconclusive"
    verdicts = [c.status for c in judge(metrics(0.97, 0.96, 0.95, 0.04), {}).claims]
    assert verdicts == ["confirmed", "confirmed"]
    assert judge(metrics(0.97, 0.96, 0.85, 0.0), {}).claims[1].status == "not_reproduced"
    assert judge(metrics(0.97, 0.96, 1.0, 0.09), {}).claims[1].status == "not_reproduced"
    assert judge(metrics(0.97, 0.96, None, 0.0), {}).claims[1].status == "inconclusive"
    # too few clean cases to tell an FPR of 0.05 from 0: 2 x 9 conditions, 9 samples
    few = judge(metrics(0.97, 0.96, 1.0, 0.0, clean=9), {}).claims[1]
    assert few.status == "inconclusive" and "18 clean conditions" in few.finding


def test_mitigate_digits_tiny_run_and_verdicts(tmp_path):
    pytest.importorskip("diffusers")
    rec, m = _run(tmp_path, "mitigate-digits", [
        "steps=10", "every=10", "n_classes=2", "per_class=4", "n_single=3", "width=8",
        "per_condition=2", "sample_steps=3", "combine=guidance-schedule=0.6+nn-guidance",
        "per_cure=1", "retrain=dedupe=1,label-randomization=0.5,loss-filter=0.01",
        "exhaustive=true"])
    names = {r["cure"] for r in m["runs"] if r["when"] == "sampling"}
    assert names == {"tikhonov", "guidance", "guidance-schedule", "nn-guidance", "amg",
                     "guidance-schedule=0.6+nn-guidance"}
    again = [(r["cure"], r["strength"]) for r in m["runs"] if r["when"] == "training"]
    assert again == [("dedupe", 1), ("label-randomization", 0.5), ("loss-filter", 0.01)]
    info = m["retraining"]
    assert info["dedupe=1"]["items"] == 2 * 4 + 3 < info["loss-filter=0.01"]["items"]
    assert info["loss-filter=0.01"]["filtered"] > 0 and info["dedupe=1"]["filtered"] == 0
    from diffmem.experiments.mitigation import _retrain_specs

    for bad in ("magic=1", "dedupe=abc", "loss-filter=nan", "label-randomization=-1"):
        with pytest.raises(ValueError, match="retrain: expected NAME=VALUE"):
            _retrain_specs([bad])
    assert m["baseline"]["cost"] == 0 and all(r["cost"] >= 0 for r in m["runs"])
    assert (tmp_path / "mitigate-digits" / "plane.png").is_file()
    assert rec.verdict.status in ("confirmed", "not_reproduced", "inconclusive")
    judge = get_experiment("mitigate-digits").judge
    run = {"cure": "tikhonov", "strength": 0.1, "copy_fraction": 0.05, "cost": 0.3,
           "distance_ratio": 1.1, "condition_kept": 0.9, "noise_ratio": 1.2,
           "keeps_samples": True}
    base = {"copy_fraction": 1.0, "condition_kept": 0.95}
    done = {"baseline": base, "recommended": run, "runs": [run], "frontier": ["tikhonov=0.1"],
            "memorized": 8, "target": 0.1}
    assert judge(done, {}).status == "confirmed"
    kept_none = {**run, "keeps_samples": False}
    assert judge({**done, "runs": [kept_none]}, {}).status == "not_reproduced"
    retrained = {**run, "when": "training", "cure": "dedupe", "strength": 1}
    verdict = judge({**done, "runs": [kept_none, retrained]}, {})
    assert verdict.status == "not_reproduced" and "retrained: dedupe=1 copies 0.05" in \
        verdict.text  # a training-time cure is reported, not counted for the claim
    noisy = {**run, "noise_ratio": 2.0, "keeps_samples": False}
    verdict = judge({**done, "recommended": None, "runs": [noisy]}, {})
    assert verdict.status == "not_reproduced" and "noise" in verdict.text
    assert judge({**done, "memorized": 0}, {}).status == "inconclusive"


def test_size_transition_tiny_run_and_verdicts(tmp_path):
    rec, m = _run(tmp_path, "size-transition", ["sizes=2,4", "steps=30", "n_samples=10",
                                                "gap_points=4", "width=16"])
    assert m["sizes"] == [2, 4] and len(m["memorized"]) == len(m["agreement"]) == 2
    assert set(m["references"]) == {"empirical", "gaussian", "kde"}
    assert m["references"]["empirical"]["agreement"] == [0.0, 0.0]  # never agree
    assert all(v > 0.9 for v in m["references"]["empirical"]["memorized"])
    assert set(m["emm"]) == {"0.9", "0.5"}
    judge = get_experiment("size-transition").judge
    metrics = lambda mem, agr: {"memorized": mem, "agreement": agr, "sizes": [2, 64],  # noqa: E731
                                "emm": {"0.9": None, "0.5": 10.0}}
    # at the largest N: copies below 0.1 and the halves agree at least 0.5
    assert judge(metrics([0.9, 0.05], [0.0, 0.8]), {}).status == "confirmed"
    assert judge(metrics([0.9, 0.05], [0.0, 0.45]), {}).status == "not_reproduced"
    assert judge(metrics([0.9, 0.12], [0.0, 0.8]), {}).status == "not_reproduced"
    assert judge(metrics([0.3, 0.1], [0.0, 0.8]), {}).status == "inconclusive"


def test_crossing_interpolates_in_log_n():
    assert crossing([2, 8], [1.0, 0.0], 0.5) == pytest.approx(4.0)
    assert crossing([2, 8, 32], [0.95, 0.92, 0.1], 0.9) == pytest.approx(
        8 * 4 ** (0.02 / 0.82))
    assert crossing([2, 8], [0.4, 0.1], 0.5) is None and crossing([2, 8], [1, 1], 0.5) is None


def test_reproduce_skips_what_is_not_installed(tmp_path, monkeypatch):
    from diffmem.experiments.base import Experiment

    monkeypatch.setattr(Experiment, "missing",
                        lambda self: ["diffusers"] if "digits" in self.name and
                        self.requires else [])
    from diffmem.experiments import REGISTRY

    only = [n for n in REGISTRY if n not in ("regularize-digits", "detect-digits",
                                             "mitigate-digits")]
    monkeypatch.setattr("diffmem.cli.experiments.REGISTRY", {n: REGISTRY[n] for n in
                                                 ["structured-points", "regularize-digits"]})
    res = CliRunner().invoke(app, ["reproduce", "--quick", "--out", str(tmp_path),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "[skipped] regularize-digits: needs diffusers" in res.output and only
    res = CliRunner().invoke(app, ["run", "regularize-digits", "--quick", "--out",
                                   str(tmp_path)])
    assert res.exit_code == 2 and "regularize-digits: expected diffusers installed" in \
        res.output


def test_caption_data_duplicates_three_pictures_and_varies_the_others():
    """24 shape captions with 4 colours (30 with a fifth; 6 colours: the named error), each
    with `variants` distinct pictures held once, then the three captions of DUPLICATED, each
    one picture unlike the shapes held `copies` times."""
    import numpy as np

    from diffmem.experiments.captions import DUPLICATED, caption_data, emblem

    d = caption_data(copies=4, variants=3, seed=1, colours=4)
    assert len(d.prompts) == len(set(d.prompts)) == 27 and d.labels.sum() == 3
    assert d.prompts[24:] == list(DUPLICATED) and d.labels[24:].all()
    assert d.pictures.shape == (24 * 3 + 3, 3, 16, 16) and len(d.rows) == 24 * 3 + 3 * 4
    per_prompt = np.bincount(d.row_prompt, minlength=27)
    assert (per_prompt == np.where(d.labels == 1, 4, 3)).all()
    for p in range(27):  # distinct rows per prompt: 1 when duplicated, else `variants`
        pics = d.pictures[d.rows[d.row_prompt == p]].reshape(-1, 3 * 16 * 16)
        assert len(np.unique(pics, axis=0)) == (1 if d.labels[p] else 3)
    for name in DUPLICATED:  # its picture, far from every shape picture
        own = d.pictures[d.prompts.index(name) - 24 + 72]
        assert np.allclose(own, np.round(emblem(name) * 255) / 255)
        gaps = np.abs(d.pictures[:72] - own).reshape(72, -1).mean(1)
        assert gaps.min() > 0.1
    assert np.array_equal(np.round(d.pictures * 255) / 255, d.pictures)  # 8 bits, as a PNG
    five = caption_data(copies=4, variants=3, seed=1)  # the experiment's 30 + 3
    assert len(set(five.prompts)) == 33 and five.labels.sum() == 3
    assert set(d.prompts) < set(five.prompts) and "a white cross on the right" in five.prompts
    with pytest.raises(ValueError, match=r"colours: expected a number of colours from 3 to 5"
                                         r", received 6"):
        caption_data(copies=4, variants=3, colours=6)
    with pytest.raises(ValueError, match=r"name: expected one of"):
        emblem("a red square on the left")


def test_text_unet_training_resumes_to_the_same_weights(tmp_path):
    """train_text_unet checkpointed every 2 steps: 3 steps, then resumed to 5, ends with the
    weights of 5 steps in one go (the batches, noise and optimizer state restored)."""
    pytest.importorskip("transformers")
    import diffusers
    import torch

    from diffmem.finetune import train_text_unet
    from diffmem.tiny import sd_pipeline
    from diffmem.training import Checkpoints

    sd = sd_pipeline(tmp_path / "sd", timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=gen)
    table = torch.randn(7, 32, 32, generator=gen)

    def run(steps, folder, resume):
        unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd / "unet"))
        scheduler = diffusers.DDPMScheduler.from_pretrained(str(sd / "scheduler"))
        out = train_text_unet(unet, scheduler, latents, table, steps=steps,
                              batch_size=3, lr=1e-3, seed=1, loss_filter=5.0,
                              checkpoints=Checkpoints(folder, "same"), every=2, resume=resume)
        return unet.state_dict(), out

    whole, out = run(5, tmp_path / "a", False)
    run(3, tmp_path / "b", False)
    again, out_b = run(5, tmp_path / "b", True)
    assert out["steps"] == out_b["steps"] == 5 and out["losses"] == out_b["losses"]
    assert out["filtered"] == out_b["filtered"]
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_mitigate_captions_tiny_run_and_verdicts(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    rec, m = _run(tmp_path, "mitigate-captions", [
        "steps=4", "vae_steps=2", "every=2", "variants=2", "copies=2", "colours=3", "per_prompt=2",
        "sample_steps=3", "n_noise=2", "cures=nn-guidance=3,random-tokens=2",
        "exhaustive=true"])
    assert [(r["cure"], r["strength"]) for r in m["runs"]] == [("nn-guidance", 3),
                                                              ("random-tokens", 2)]
    assert len(m["copied_by_prompt"]) == 21 and len(m["detect"]["flagged"]) == 21
    assert m["items"] == 18 * 2 + 3 * 2 and m["training_steps"] == 4
    assert len(rec.verdict.claims) == 3
    ref, undup = m["detect"]["reference"], m["detect"]["reference_unduplicated"]
    clean = sum(c <= 0.25 for c in m["copied_by_prompt"])  # the reference: the audit's clean
    assert len(ref["flagged"]) == 21 and ref["n_reference"] == clean - 1
    assert len(undup["flagged"]) == 21 and undup["n_reference"] == 17
    folder = tmp_path / "mitigate-captions"
    assert (folder / "plane.png").is_file() and (folder / "pipeline" / "unet").is_dir()
    judge = get_experiment("mitigate-captions").judge
    run = {"cure": "nn-guidance", "strength": 3.1, "copy_fraction": 0.06, "cost": 0.2,
           "distance_ratio": 1.2, "condition_kept": 0.86, "noise_ratio": 0.9,
           "keeps_samples": True}
    detect = {"primary": "collapse", "measures": {"collapse": {"auc_clear": 0.5},
                                                  "consistency": {"auc_clear": 0.95}},
              "duplicated_ranks": [1, 2, 3], "tpr": 1.0, "fpr": 0.0, "n_copied": 3,
              "n_clean": 21, "rule": "r", "reference": {
                  "tpr": 1.0, "fpr": 0.05, "n_copied": 3, "n_clean": 20, "n_reference": 20,
                  "fpr_target": 0.05}}
    metrics = {"baseline": {"copy_fraction": 0.8, "condition_kept": 0.88}, "runs": [run],
               "recommended": run, "frontier": ["nn-guidance=3.1"], "memorized": 2,
               "target": 0.1, "detect": detect, "prompts": ["p"] * 24,
               "copied_by_prompt": [1.0] * 3 + [0.0] * 21}
    assert [c.status for c in judge(metrics, {}).claims] == ["confirmed"] * 3
    for ref, status in [({"fpr": 0.1}, "not_reproduced"), ({"tpr": 0.8}, "not_reproduced"),
                        ({"tpr": None}, "inconclusive")]:
        bad = {**detect, "reference": {**detect["reference"], **ref}}
        assert judge({**metrics, "detect": bad}, {}).claims[1].status == status
    # 19 clean prompts, each judged against 18: the lowest is flagged whatever the model
    # (bound 1/19 > 0.05), so 1 of 19 says too few prompts; 2 of 19 is over the bound.
    few = {"n_reference": 18, "n_clean": 19}
    for ref, status in [({"fpr": 1 / 19}, "inconclusive"), ({"fpr": 2 / 19}, "not_reproduced"),
                        ({"fpr": 1 / 19, "tpr": 0.5}, "not_reproduced"),
                        ({"fpr": 0.0}, "confirmed")]:
        bad = {**detect, "reference": {**detect["reference"], **few, **ref}}
        claim = judge({**metrics, "detect": bad}, {}).claims[1]
        assert claim.status == status
        assert ("too few clean prompts" in claim.finding) == (status == "inconclusive")
    assert "TPR 1 (3 of 3 copied prompts), FPR 0.05 (1 of 20 clean ones)" in judge(
        metrics, {}).claims[1].finding
    # the detection claim reads consistency on the audit's clear prompts, not collapse
    low = {**detect, "measures": {"collapse": {"auc_clear": 0.95},
                                  "consistency": {"auc_clear": 0.85, "auc": 0.99}}}
    claim = judge({**metrics, "detect": low}, {}).claims[0]
    assert claim.status == "not_reproduced"
    assert "consistency AUC 0.85 on 3 copied and 21 clean prompts" in claim.finding
    assert "collapse 0.95" in claim.finding and "(labels): 0.99" in claim.finding
    none = {**detect, "measures": {}}
    assert judge({**metrics, "detect": none}, {}).claims[0].status == "inconclusive"


def _without_timings(doc):
    if isinstance(doc, dict):
        return {k: _without_timings(v) for k, v in doc.items()
                if not (k.endswith("_s") or "seconds" in k or k == "versions")}
    if isinstance(doc, list):
        return [_without_timings(v) for v in doc]
    return doc


def test_an_experiment_gives_the_same_numbers_whatever_threads_run_it(tmp_path):
    """An experiment fixes its own torch thread count: the tiny text model trained and
    audited in a process running 1 thread and in one running 2 gives the same metrics (every
    number, timings aside) and the same verdicts, as in a worker of reproduce --jobs."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    before = torch.get_num_threads()
    found = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rec, m = _run(tmp_path / f"t{threads}", "mitigate-captions", [
                "steps=6", "vae_steps=3", "every=3", "variants=2", "copies=2", "colours=3",
                "per_prompt=2", "sample_steps=3", "n_noise=2", "cures=tikhonov=0.1"])
            found[threads] = ([c.status for c in rec.verdict.claims], _without_timings(m))
            assert torch.get_num_threads() == threads  # restored after the run
    finally:
        torch.set_num_threads(before)
    assert found[1] == found[2]


def test_a_model_two_experiments_train_alike_is_trained_once(tmp_path):
    """Under reproduce (Context.shared) train_run keeps a finished run under its fingerprint:
    a second experiment with the same configuration, data and seed loads the same weights
    without a step of training; another seed trains its own."""
    pytest.importorskip("diffusers")
    from diffmem.experiments.base import Context
    from diffmem.experiments.regularize import train_run

    params = {"width": 8, "lr": 1e-3, "batch_size": 4, "steps": 3, "every": 2}
    train = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])

    def run(name, seed):
        ctx = Context(name=name, params=params, out=tmp_path / name, device=torch.device("cpu"),
                      seed=0, progress=False, shared=tmp_path / "shared")
        return train_run(ctx, "model", train, 0.0, labels=labels, seed=seed)

    first, second, other = run("a", 1), run("b", 1), run("c", 2)
    assert (first["reused"], second["reused"], other["reused"]) == (False, True, False)
    assert first["steps"] == second["steps"] == 3  # the last step saved, off the grid of 2
    one, two = first["model"].state_dict(), second["model"].state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert 0 < second["train_s"] <= first["train_s"]  # its training time, saving aside
    assert not torch.equal(one["conv_in.weight"], other["model"].state_dict()["conv_in.weight"])


def test_a_waiting_lock_waits_for_a_live_holder(tmp_path):
    """FolderLock(wait=True) waits while the process named in the lock is alive, then takes
    the lock over; without wait the same lock is refused."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from diffmem.experiments.base import ConfigError, FolderLock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    threading.Thread(target=holder.wait).start()  # reaped when it exits (no zombie)
    (tmp_path / ".lock").write_text(str(holder.pid))
    with pytest.raises(ConfigError, match="locked by running process"), FolderLock(tmp_path):
        pass
    began = time.perf_counter()
    with FolderLock(tmp_path, wait=True):
        waited = time.perf_counter() - began
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert waited >= 1.0 and not (tmp_path / ".lock").exists()
