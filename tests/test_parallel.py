"""The model work of ``audit --model``, ``detect``, ``mitigate`` (and ``compare``) split over
gloo processes gives the files of one process byte for byte (but for timings and the
per-process record), for a number of processes that does not divide the work; a killed
process stops the others with an error naming it, and a rerun with another number of
processes ends with the same files."""

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmem.parallel import SOLO, Team, generator

HERE = Path(__file__).parent
#: Keys of the JSON outputs that may differ between runs: timings and who did what.
VARYING = {"seconds", "screen_seconds", "draws_per_process", "conditions_per_process",
           "samples_per_process", "elapsed_s"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], processes: int, *, rank_args: dict[int, list[str]] | None = None
          ) -> list[subprocess.Popen]:
    """``python -m diffmem ARGS`` in ``processes`` processes of one gloo group (1: a plain
    process), one thread each, as torchrun would start them."""
    port = _port()
    procs = []
    for rank in range(processes):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if processes > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                       LOCAL_WORLD_SIZE=str(processes))
        extra = (rank_args or {}).get(rank, [])
        procs.append(subprocess.Popen([sys.executable, "-m", "diffmem", *args, *extra,
                                       "--no-progress"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, text))
    return out


def alone(args: list[str]) -> None:
    """``diffmem ARGS`` in this process, on 1 thread as the processes of :func:`start` (the
    one-process reference, without the start-up of another interpreter)."""
    from typer.testing import CliRunner

    from diffmem.cli import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, [*args, "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output[-3000:]


def in_two(args: list[str]) -> None:
    """``diffmem ARGS`` in 2 processes of one group."""
    for rc, text in finish(start(args, 2)):
        assert rc == 0, text[-3000:]


def _plain(doc):
    if isinstance(doc, dict):
        return {k: _plain(v) for k, v in doc.items() if k not in VARYING}
    if isinstance(doc, list):
        return [_plain(v) for v in doc]
    return doc


def same_files(a: Path, b: Path, names: list[str]) -> None:
    """The arrays byte for byte; the JSON documents and CSV tables but for :data:`VARYING`."""
    for name in names:
        if name.endswith(".json"):
            ja, jb = (json.loads((d / name).read_text().replace(str(d), "OUT"))
                      for d in (a, b))
            assert _plain(ja) == _plain(jb), name
        elif name.endswith(".csv"):
            ta, tb = ([{k: v for k, v in row.items() if k not in VARYING}
                       for row in csv.DictReader(io.StringIO((d / name).read_text()))]
                      for d in (a, b))
            assert ta == tb, name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A class-conditional UNet2DModel (labels 0-2, 3 the null one) with a DDIM scheduler,
    12 training images and their labels, the conditions to detect."""
    pytest.importorskip("diffusers")
    from tiny_pipelines import class_unet

    root = class_unet(tmp_path_factory.mktemp("parallel"))
    np.save(root / "conditions.npy", np.arange(3))
    return root


def _unet_args(unet: Path) -> list[str]:
    return ["--model", str(unet / "net"), "--scheduler", str(unet / "net"), "--train",
            str(unet / "train.npy"), "--train-cond",
            str(unet / "labels.npy"), "--sampler", "pipeline", "--steps", "3",
            "--per-condition", "5", "--batch-size", "4"]


def test_generators_are_independent_and_reproducible():
    a, b = generator(3, 1), generator(3, 2)
    x, y = torch.randn(1000, generator=a), torch.randn(1000, generator=b)
    assert torch.equal(x, torch.randn(1000, generator=generator(3, 1)))
    assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.15  # 4.7 sigma
    assert not torch.equal(torch.randn(5, generator=generator(3)),
                           torch.randn(5, generator=generator(4)))


def test_one_process_team_maps_in_order_and_records_its_share():
    rounds = []
    got, per = SOLO.map(lambda u: u * u, [3, 1, 2], on_round=rounds.append,
                        weight=lambda u: u)
    assert got == [9, 1, 4] and per == [6]
    assert rounds == [[(3, 9)], [(1, 1)], [(2, 4)]]  # one unit a round: written as it comes
    SOLO.agree({"seed": 1})  # nothing to disagree with
    assert Team.of(None) == SOLO and SOLO.leader


def test_unet_audit_detect_and_mitigate_in_two_processes_equal_one(unet, tmp_path):
    """15 draws in batches of 4 (4 batches over 2 processes), the conditional denoiser gap,
    detection of 3 conditions in chunks of 1 (with confirmation) and a 2-run mitigate sweep:
    the same files from 1 and 2 processes."""
    audit = ["audit", *_unet_args(unet), "--bootstrap", "50"]
    detect = ["detect", "--model", str(unet / "net"), "--scheduler", str(unet / "net"),
              "--conditions",
              str(unet / "conditions.npy"), "--null-cond", "3", "--steps", "4", "--n-noise",
              "2", "--confirm", "3", "--batch-size", "2"]
    mitigate = ["mitigate", *_unet_args(unet), "--cures", "tikhonov", "--strengths",
                "tikhonov=0.5", "--exhaustive"]
    for name, args in (("audit", audit), ("detect", detect), ("mitigate", mitigate)):
        alone([*args, "--out", str(tmp_path / f"{name}1")])
        in_two([*args, "--out", str(tmp_path / f"{name}2")])
    one, two = tmp_path / "audit1", tmp_path / "audit2"
    same_files(one, two, ["samples.npy", "initial_noise.npy", "sample_conditions.npy",
                          "audit.json", "denoiser_gap.json"])
    assert json.loads((one / "audit.json").read_text())["draws_per_process"] == [15]
    assert json.loads((two / "audit.json").read_text())["draws_per_process"] == [8, 7]
    same_files(tmp_path / "detect1", tmp_path / "detect2", ["detect.json", "detect.csv"])
    split = json.loads((tmp_path / "detect2" / "detect.json").read_text())
    assert split["conditions_per_process"] == [2, 1]
    assert all(e.get("consistency") is not None for e in split["conditions"])
    same_files(tmp_path / "mitigate1", tmp_path / "mitigate2",
               ["mitigate.json", "baseline/samples.npy", "runs/tikhonov=0.5/samples.npy"])


def test_prompt_audit_of_a_tiny_sd_in_two_processes_equals_one(tmp_path):
    pytest.importorskip("diffusers")
    from tiny_pipelines import sd_pipeline

    sd = sd_pipeline(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green cross\n")
    gen = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", gen.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32))
    args = ["audit", "--model", str(sd), "--prompts", str(tmp_path / "prompts.txt"),
            "--train", str(tmp_path / "train.npy"), "--sampler", "pipeline", "--steps", "3",
            "--per-condition", "2", "--batch-size", "2", "--bootstrap", "50"]
    alone([*args, "--out", str(tmp_path / "p1")])
    in_two([*args, "--out", str(tmp_path / "p2")])
    same_files(tmp_path / "p1", tmp_path / "p2", ["samples.npy", "initial_noise.npy",
                                                  "sample_conditions.npy", "audit.json"])


def test_a_killed_process_is_named_and_the_rerun_with_one_process_ends_the_same(tmp_path):
    """A slow callable model, 2 processes: process 1 killed once a round is written;
    process 0 stops with an error naming it (no hang); one process then finishes the
    draws, and the files equal an uninterrupted one-process run's."""
    gen = np.random.default_rng(1)
    np.save(tmp_path / "train.npy", gen.normal(size=(10, 2)))
    args = ["audit", "--model", f"{HERE / 'slow_model.py'}:score", "--train",
            str(tmp_path / "train.npy"), "--sampler", "edm", "--steps", "3", "--n-samples",
            "24", "--batch-size", "2", "--bootstrap", "20"]
    alone([*args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "killed"
    procs = start([*args, "--out", str(out)], 2)
    record = out / "samples.npy.progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(record.read_text())["batches"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    (rc0, text0), _ = finish(procs, timeout=120)
    assert rc0 != 0
    assert "Error: process 1 of 2 stopped while process 0 waited for it" in text0, \
        text0[-2000:]
    assert "Traceback" not in text0
    kept = json.loads(record.read_text())["batches"]
    assert 0 < len(kept) < 12  # finished rounds kept, not all of them
    alone([*args, "--out", str(out)])
    same_files(tmp_path / "ref", out, ["samples.npy", "initial_noise.npy", "audit.json"])
    assert sum(json.loads((out / "audit.json").read_text())["draws_per_process"]) == \
        24 - 2 * len(kept)  # the rerun drew only what was missing


def test_processes_given_different_options_are_refused_before_any_work(tmp_path):
    gen = np.random.default_rng(1)
    np.save(tmp_path / "train.npy", gen.normal(size=(10, 2)))
    args = ["audit", "--model", f"{HERE / 'slow_model.py'}:score", "--train",
            str(tmp_path / "train.npy"), "--n-samples", "4", "--out", str(tmp_path / "o")]
    done = finish(start(args, 2, rank_args={0: ["--seed", "0"], 1: ["--seed", "1"]}))
    for rc, text in done:
        assert rc == 2, text[-2000:]
    assert "seed: expected the same value in every process (process 0 has '0'), received " \
           "'1' in process 1" in done[0][1]
    assert not (tmp_path / "o" / "samples.npy").exists()


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from typer.testing import CliRunner

    from diffmem.cli import app

    np.save(tmp_path / "train.npy", np.zeros((4, 2)))
    for args in (["audit", "--model", "m.py:f", "--train", str(tmp_path / "train.npy")],
                 ["detect", "--model", "m.py:f", "--data-shape", "2"],
                 ["mitigate", "--model", "m.py:f", "--data-shape", "2"]):
        res = CliRunner().invoke(app, [*args, "--device", "cuda", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert "--device: expected 'cpu' or an available CUDA device" in res.output

