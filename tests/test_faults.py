"""Faults users meet, injected in subprocesses.

* A full disk (``RLIMIT_FSIZE``: every write past the limit fails with EFBIG, as on a full
  disk) while outputs, samples and monitor records are written: the command ends with a clear
  error naming the file (exit 1, no traceback), no half-written file is left, and the outputs
  of the previous good run stay intact.
* SIGKILL at seeded points of every long command (``run`` training, ``audit --model``,
  ``detect``, ``compare``, a parallel ``reproduce`` and ``examples/train_diffusers.py`` with
  the monitor): the rerun (``--resume`` where training is involved) finishes, no stale lock
  blocks it, and its outputs equal an uninterrupted run's, byte for byte where the
  computation is deterministic (samples, weights, arrays) and in every non-timing field of
  the JSON records.
* Truncated or corrupt inputs: see ``test_hardening.py``."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CLI = [sys.executable, "-m", "diffmem"]


def _limited(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _run(args, limit=None):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300,
                          preexec_fn=None if limit is None else _limited(limit))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _whole(path: Path) -> bool:
    """A file that is complete by its own format."""
    data = path.read_bytes()
    if path.suffix == ".json":
        json.loads(data)
    elif path.suffix == ".html":
        return data.rstrip().endswith(b"</html>")
    elif path.suffix == ".npy":
        np.load(path)
    elif path.suffix == ".png":
        return data.endswith(b"IEND\xaeB`\x82")
    return True


def test_full_disk_during_audit_keeps_previous_outputs(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((40, 16)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "a.npy", train[:10] + 1e-4)
    np.save(tmp_path / "b.npy", rng.standard_normal((30, 16)).astype(np.float32))
    out = tmp_path / "audit"
    base = ["audit", "--train", str(tmp_path / "train.npy"), "--out", str(out),
            "--bootstrap", "20", "--no-progress"]
    good = _run([base[0], str(tmp_path / "a.npy"), *base[1:]])
    assert good.returncode == 0, good.stderr
    before = _snapshot(out)
    assert {"audit.json", "index.html"} <= set(before)
    full = _run([base[0], str(tmp_path / "b.npy"), *base[1:]], limit=8_000)
    assert full.returncode == 1, (full.returncode, full.stderr)
    assert "the disk is full" in full.stderr and str(out) in full.stderr
    assert "Traceback" not in full.stderr
    after = _snapshot(out)
    assert not [n for n in after if n.endswith(".tmp")]  # no partial file left
    for name, data in after.items():  # each file: the previous one, or a whole new one
        assert data == before.get(name) or _whole(out / name), name
    assert after["index.html"] == before["index.html"]  # the large page could not be written


def test_full_disk_while_sampling_a_model_is_an_error_not_a_crash(tmp_path):
    """Samples are memory-mapped: their space is reserved first, so a full disk is an error
    before any sampling (not SIGBUS later), and no samples file is left behind."""
    model = tmp_path / "model.py"
    model.write_text("def fn(x, t):\n    return -x\n")
    out = tmp_path / "audit"
    train = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    res = _run(["audit", "--model", f"{model}:fn", "--schedule", "VE",
                "--n-samples", "200", "--train", str(tmp_path / "train.npy"), "--out", str(out),
                "--no-progress"], limit=30_000)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "the disk is full" in res.stderr and "samples.npy" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "samples.npy").exists()


def test_full_disk_while_the_monitor_appends_keeps_its_log_whole(tmp_path):
    from diffmem.io import DiskFullError, append_line

    log = tmp_path / "monitor.jsonl"
    append_line(log, json.dumps({"step": 1}))
    script = (f"import json\nfrom diffmem.io import append_line\n"
              f"append_line({str(log)!r}, json.dumps({{'step': 2, 'pad': 'x' * 5000}}))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         preexec_fn=_limited(2_000), timeout=60)
    assert res.returncode != 0 and "DiskFullError" in res.stderr
    assert "the disk is full" in res.stderr
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 1}]
    assert issubclass(DiskFullError, OSError)
    with pytest.raises(FileNotFoundError):
        append_line(tmp_path / "missing" / "m.jsonl", "{}")


# --- SIGKILL at seeded points, then a rerun: the outputs of an uninterrupted run ------------
TIMING_KEYS = ("seconds", "elapsed", "_s", "time", "versions")


def _stable(obj):
    """A JSON value without its timings (which differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items()
                if not any(k.endswith(t) or k.startswith(t.strip("_")) for t in TIMING_KEYS)}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _kill_when(cmd, ready, delay: float, cwd=None, parent_only: bool = False) -> int:
    """Start ``cmd``; SIGKILL it ``delay`` seconds after ``ready()`` first holds (or let it
    end, if it ends first); return its exit code (-9 when killed)."""
    import os
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is None:
        if parent_only:
            proc.send_signal(signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=60)


def _delay(seed: int, high: float) -> float:
    return float(np.random.default_rng(seed).uniform(0, high))


def _same_npz(a: Path, b: Path) -> None:
    x, y = np.load(a), np.load(b)
    assert x.files == y.files
    for k in x.files:
        assert np.array_equal(x[k], y[k]), k


TRAINING = ["run", "nn-tikhonov", "--quick", "--set", "steps=1200", "--set",
            "checkpoint_every=300", "--set", "values=0.0,0.1", "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted_training(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    res = _run(TRAINING + ["--out", str(out)])
    assert res.returncode == 0, res.stderr
    return out / "nn-tikhonov"


@pytest.mark.parametrize(("checkpoint", "seed"), [(300, 1), (900, 2)])
def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted_training,
                                                             checkpoint, seed):
    folder = tmp_path / "nn-tikhonov"
    mark = folder / "checkpoints" / f"step_{checkpoint:09d}.pt"
    code = _kill_when(CLI + TRAINING + ["--out", str(tmp_path)], mark.exists, _delay(seed, 0.4))
    assert code == -9 and not (folder / "metrics.json").exists()  # killed while training
    again = _run(TRAINING + ["--out", str(tmp_path), "--resume"])
    assert again.returncode == 0, again.stderr
    _same_npz(uninterrupted_training / "arrays.npz", folder / "arrays.npz")
    whole = json.loads((uninterrupted_training / "metrics.json").read_text())
    assert _stable(json.loads((folder / "metrics.json").read_text())) == _stable(whole)
    assert not (folder / ".lock").exists()


SLOW_MODEL = "import time\n\ndef fn(x, t):\n    time.sleep(0.002)\n    return -x\n"


def _audit_inputs(tmp_path: Path) -> list[str]:
    (tmp_path / "model.py").write_text(SLOW_MODEL)
    train = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    return ["audit", "--model", f"{tmp_path / 'model.py'}:fn", "--schedule", "VE",
            "--n-samples", "320", "--train", str(tmp_path / "train.npy"), "--bootstrap", "20",
            "--no-progress"]


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit")
    args = _audit_inputs(folder)
    whole = _run(args + ["--out", str(folder / "whole")])
    assert whole.returncode == 0, whole.stderr
    return args, folder / "whole"


@pytest.mark.parametrize("seed", [3, 4])
def test_killed_model_audit_reruns_to_identical_samples(tmp_path, audit_run, seed):
    args, whole = audit_run
    out = tmp_path / "cut"
    mark = out / "samples.npy.progress.json"
    code = _kill_when(CLI + args + ["--out", str(out)], mark.exists, _delay(seed, 0.5))
    assert code == -9 and 0 < json.loads(mark.read_text())["done"] < 320  # while sampling
    again = _run(args + ["--out", str(out)])
    assert again.returncode == 0, again.stderr
    for name in ("samples.npy", "initial_noise.npy"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert _stable(json.loads((out / "audit.json").read_text())["nn_ratio"]) == _stable(
        json.loads((whole / "audit.json").read_text())["nn_ratio"])


def test_killed_detect_reruns_to_the_same_ranking(tmp_path):
    (tmp_path / "model.py").write_text(SLOW_MODEL)
    args = ["detect", "--model", f"{tmp_path / 'model.py'}:fn", "--schedule", "VP",
            "--data-shape", "4", "--n-samples", "48", "--steps", "20", "--no-progress"]
    whole = _run(args + ["--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut"
    for seed in (5, 6):  # killed at two seeded points, the second into the first's leftovers
        _kill_when(CLI + args + ["--out", str(out)], lambda: True, _delay(seed, 4.0))
    again = _run(args + ["--out", str(out)])
    assert again.returncode == 0, again.stderr
    got, ref = (json.loads((d / "detect.json").read_text()) for d in (out, tmp_path / "whole"))
    assert _stable(got) == _stable(ref)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == ".lock"]


COND_MODEL = ("import time\n\ndef fn(x, t, y):\n    time.sleep(0.002)\n"
              "    return -x / (1 + (y[:, None] % 3).double())\n")


def test_killed_detect_of_conditions_keeps_its_confirmations_and_ends_the_same(tmp_path):
    """``detect --conditions``, killed during the confirmation: the batches it finished are
    kept (``OUT/confirmations``), the rerun draws the rest and writes the detect.json of an
    uninterrupted run (timings aside)."""
    (tmp_path / "model.py").write_text(COND_MODEL)
    np.save(tmp_path / "conds.npy", np.arange(12))
    args = ["detect", "--model", f"{tmp_path / 'model.py'}:fn", "--schedule", "VP",
            "--data-shape", "4", "--conditions", str(tmp_path / "conds.npy"), "--null-cond",
            "12", "--batch-size", "16", "--confirm-steps", "6", "--no-progress"]
    whole = _run(args + ["--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    kept = tmp_path / "whole" / "confirmations"
    assert len(list(kept.glob("batch_*.json"))) == 6  # 12 conditions, 2 a batch
    out = tmp_path / "cut"
    first = out / "confirmations" / "batch_0000000.json"
    assert _kill_when(CLI + args + ["--out", str(out)], first.exists, _delay(3, 0.3)) == -9
    done = {p.name: p.read_bytes() for p in (out / "confirmations").glob("batch_*.json")}
    assert 1 <= len(done) < 6
    again = _run(args + ["--out", str(out)])
    assert again.returncode == 0, again.stderr
    for name, data in done.items():  # kept, not drawn again
        assert (out / "confirmations" / name).read_bytes() == data
    got, ref = (json.loads((d / "detect.json").read_text()) for d in (out, tmp_path / "whole"))
    assert _stable(got) == _stable(ref)
    assert all(e["stopped"] in ("below", "above", "cap") for e in got["conditions"])


def test_killed_compare_reruns_to_identical_samples(tmp_path):
    (tmp_path / "model.py").write_text(SLOW_MODEL)
    rng = np.random.default_rng(1)
    for half in "ab":
        np.save(tmp_path / f"train_{half}.npy", rng.standard_normal((10, 4)).astype(np.float32))
    model = f"{tmp_path / 'model.py'}:fn"
    args = ["compare", "--model-a", model, "--model-b", model, "--train-a",
            str(tmp_path / "train_a.npy"), "--train-b", str(tmp_path / "train_b.npy"),
            "--schedule", "VE", "--n-samples", "256", "--bootstrap", "20", "--no-progress"]
    whole = _run(args + ["--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut"
    mark = out / "a" / "samples.npy.progress.json"
    assert _kill_when(CLI + args + ["--out", str(out)], mark.exists, _delay(7, 0.5)) == -9
    again = _run(args + ["--out", str(out)])
    assert again.returncode == 0, again.stderr
    for half in "ab":
        assert (out / half / "samples.npy").read_bytes() == \
            (tmp_path / "whole" / half / "samples.npy").read_bytes()
    got, ref = (json.loads((d / "compare.json").read_text()) for d in (out, tmp_path / "whole"))
    assert _stable(got) == _stable(ref)


def test_killed_parallel_reproduce_leaves_no_worker_and_reruns(tmp_path):
    """``kill -9`` of reproduce's own process: its workers die with it (no lock held by an
    orphan), and the rerun writes what an uninterrupted run writes (each experiment run
    here in-process: an experiment fixes its threads, so its bits do not depend on the
    worker that ran it)."""
    import os
    import time

    from diffmem.experiments import REGISTRY
    from diffmem.experiments.base import resolve_params, run_experiment

    names = ("tikhonov-sweep", "threshold-sweep", "trajectories")
    args = ["reproduce", "--quick", "--only", ",".join(names), "--jobs", "2", "--no-progress"]
    for name in names:
        run_experiment(REGISTRY[name], tmp_path / "whole",
                       resolve_params(REGISTRY[name], quick=True), progress=False)
    out = tmp_path / "cut"

    def one_done() -> bool:
        return any((out / n / "metrics.json").exists() for n in ("tikhonov-sweep",
                                                                  "threshold-sweep"))
    code = _kill_when(CLI + args + ["--out", str(out)], one_done, _delay(8, 0.2),
                      parent_only=True)
    assert code == -9
    locks = list(out.glob("*/.lock"))
    for lock in locks:  # a worker still writing when its parent died dies too
        pid = int(lock.read_text())
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"worker {pid} outlived the killed reproduce")
    again = _run(args + ["--out", str(out)])
    assert again.returncode == 0, again.stderr
    for name in names:
        _same_npz(tmp_path / "whole" / name / "arrays.npz", out / name / "arrays.npz")
    assert not list(out.glob("*/.lock"))


def test_killed_example_training_resumes_to_identical_weights(tmp_path):
    pytest.importorskip("diffusers")
    example = Path(__file__).resolve().parents[1] / "examples" / "train_diffusers.py"
    np.save(tmp_path / "imgs.npy", np.random.default_rng(0).random((8, 8, 8)).astype(
        np.float32))
    args = [sys.executable, str(example), "--data", str(tmp_path / "imgs.npy"), "--steps",
            "80", "--checkpoint-every", "20", "--monitor", "--monitor-every", "20",
            "--width", "8", "--batch-size", "8"]
    whole = subprocess.run(args + ["--out", str(tmp_path / "whole")], capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut"
    mark = out / "checkpoints" / "step_000000040.pt"
    assert _kill_when(args + ["--out", str(out)], mark.exists, _delay(9, 0.3)) == -9
    again = subprocess.run(args + ["--out", str(out), "--resume"], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed at step" in again.stdout
    for name in ("unet/diffusion_pytorch_model.safetensors", "monitor/monitor.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_or_corrupt_inputs_are_clear_errors(tmp_path):
    """A .npy cut in half (samples or training set), a PNG cut, a .safetensors cut, a broken
    UNet config, a broken scheduler config and a TorchScript file cut: exit 2, an error
    naming the option and the file, no traceback, no output."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler, UNet2DModel
    from PIL import Image
    from typer.testing import CliRunner

    from diffmem.cli import app

    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.random((10, 1, 8, 8)).astype(np.float32))
    np.save(tmp_path / "cut.npy", rng.random((10, 1, 8, 8)).astype(np.float32))
    _cut(tmp_path / "cut.npy")
    (tmp_path / "pngs").mkdir()
    for i in range(3):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(
            tmp_path / "pngs" / f"{i}.png")
    _cut(tmp_path / "pngs" / "1.png")
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    for name in ("weights", "config", "sched"):
        unet.save_pretrained(tmp_path / name / "unet")
        DDPMScheduler().save_pretrained(tmp_path / name / "scheduler")
    _cut(tmp_path / "weights" / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config" / "unet" / "config.json").write_text('{"sample_size": ')
    (tmp_path / "sched" / "scheduler" / "scheduler_config.json").write_text('{"a": ')
    import torch

    torch.jit.script(torch.nn.Flatten()).save(str(tmp_path / "feat.pt"))
    _cut(tmp_path / "feat.pt")
    train = ["--train", str(tmp_path / "train.npy")]

    def model(name: str) -> list[str]:
        return ["--model", str(tmp_path / name / "unet"), "--scheduler",
                str(tmp_path / name / "scheduler"), "--n-samples", "4", *train]

    cases = [
        ([str(tmp_path / "cut.npy"), *train], "samples: expected a readable .npy", "cut.npy"),
        ([str(tmp_path / "train.npy"), "--train", str(tmp_path / "cut.npy")],
         "train: expected a readable .npy", "cut.npy"),
        ([str(tmp_path / "pngs"), *train], "expected readable PNG/JPEG", "1.png"),
        (model("weights"), "--model: expected a loadable UNet2DModel", "weights"),
        (model("config"), "--model: expected a readable network config.json", "config"),
        (model("sched"), "--scheduler: expected a readable JSON scheduler config",
         "scheduler_config.json"),
        ([str(tmp_path / "train.npy"), *train, "--features", str(tmp_path / "feat.pt")],
         "--features: expected a TorchScript module file", "feat.pt"),
    ]
    for i, (args, message, named) in enumerate(cases):
        out = tmp_path / f"out{i}"
        res = CliRunner().invoke(app, ["audit", *args, "--out", str(out), "--no-progress"])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and named in res.output, res.output
        assert "Traceback" not in res.output
        assert not out.exists() or not any(out.iterdir())


def test_full_disk_while_checkpointing_is_an_error_and_leaves_no_partial_checkpoint(tmp_path):
    res = _run(TRAINING + ["--out", str(tmp_path)], limit=60_000)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "the disk is full" in res.stderr and "step_000000300.pt" in res.stderr
    assert "Traceback" not in res.stderr
    folder = tmp_path / "nn-tikhonov" / "checkpoints"
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "nn-tikhonov" / "metrics.json").exists()
