"""Faults users meet, injected in subprocesses: a full disk (``RLIMIT_FSIZE``: every write
past the limit fails with EFBIG, as on a full disk) while outputs, samples and monitor records
are written. The command ends with a clear error naming the file (exit 1, no traceback), no
half-written file is left, and the outputs of the previous good run stay intact."""

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
