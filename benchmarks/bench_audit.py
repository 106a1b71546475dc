"""Audit benchmarks, measured side by side in one run (CI does not run this).

    python benchmarks/bench_audit.py            # 5,000 x 50,000 (d = 768) and
                                                # 10,000 x 100,000 (d = 3,072)
    python benchmarks/bench_audit.py --quick    # smaller sizes
    python benchmarks/bench_audit.py --size 5000,50000,768   # one size

For each size the training set is a memory-mapped float32 .npy file and the samples a
float32 array. It times, one after the other in this process:

* the matrix product the search needs at minimum (samples x training set^T, in chunks of
  4,096 training rows), the machine's rate for these shapes;
* ``diffmem.audit.audit`` (exact search of the 50 nearest, re-ranked exactly, and every
  figure): fraction of the product rate = t(product) / t(audit); with faiss installed its
  candidates come from faiss's matrix products, and it is timed with torch's too;
* ``torch.cdist`` + ``topk`` in sample batches of 1,000 (what published checkers do), on the
  training set loaded in memory;
* faiss ``IndexFlatL2`` (if installed) searching the 50 nearest, then the audit and the
  flat search alternately ``--repeat`` times (their ratio, robust to a machine that slows
  down or speeds up during the run);
and the peak anonymous memory (RssAnon, sampled every 2 ms) above the process's before.

``--device cuda`` (the device script ``benchmarks/gpu.sh``): the audit and the product on the
GPU, against faiss's GPU flat index where faiss has GPU support (else its CPU index, said so).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import diffmem.audit.search as search
from diffmem.audit import audit


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return -1


def measured(fn: Callable[[], object]) -> tuple[float, int]:
    """Wall time of ``fn`` and its peak anonymous memory above the starting level."""
    base = _rss_anon()
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    done.set()
    thread.join()
    return elapsed, max(0, peak[0] - base)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(n_samples: int, n_train: int, d: int, folder: Path, repeat: int,
        device: str = "cpu") -> None:
    gen = np.random.default_rng(0)
    path = folder / f"train_{n_train}_{d}.npy"
    train = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_train, d))
    for lo in range(0, n_train, 10_000):
        hi = min(n_train, lo + 10_000)
        train[lo:hi] = gen.random((hi - lo, d), dtype=np.float32)
    train.flush()
    del train
    mm = np.load(path, mmap_mode="r")
    copies = np.array(mm[: n_samples // 2]) + 1e-3 * gen.standard_normal(
        (n_samples // 2, d), dtype=np.float32)
    samples = np.concatenate([copies, gen.random((n_samples - n_samples // 2, d),
                                                 dtype=np.float32)])
    x = torch.from_numpy(samples)
    print(f"\n{n_samples} samples against {n_train} training vectors of d = {d} "
          f"({path.stat().st_size / 2**20:.0f} MB memory-mapped), "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"{'method':<44} {'seconds':>8} {'fraction of product rate':>25} {'peak MB':>8}")

    xd = x.to(device)

    def product() -> None:
        with warnings.catch_warnings():  # read only, never written through
            warnings.simplefilter("ignore", UserWarning)
            y = torch.from_numpy(np.asarray(mm))
        for lo in range(0, n_train, 4096):
            _ = xd @ y[lo:lo + 4096].to(device).T
        _sync(device)

    product()  # page the file in
    t_prod, m_prod = measured(product)
    print(f"{'matrix product x Y^T (the minimum)':<44} {t_prod:>8.2f} {1.0:>25.2f} "
          f"{m_prod / 2**20:>8.0f}")
    result: dict[str, object] = {}
    t_audit, m_audit = measured(lambda: result.setdefault("r", audit(
        samples, str(path), bootstrap=200, batch_size=1024, device=device)))
    r = result["r"]
    print(f"{'diffmem audit (exact, k = 50, all figures)':<44} {t_audit:>8.2f} "
          f"{t_prod / t_audit:>25.2f} {m_audit / 2**20:>8.0f}   "
          f"({r.search.get('matrix_products')} products)")
    if r.search.get("matrix_products") == "faiss":
        kernel = search.shortlist_kernel
        search.shortlist_kernel = lambda: "torch"
        try:
            t_torch, m_torch = measured(lambda: audit(samples, str(path), bootstrap=200,
                                                      batch_size=1024, device=device))
        finally:
            search.shortlist_kernel = kernel
        print(f"{'diffmem audit, torch products':<44} {t_torch:>8.2f} "
              f"{t_prod / t_torch:>25.2f} {m_torch / 2**20:>8.0f}")
    y = torch.from_numpy(np.array(mm))
    yd = y.to(device)

    def cdist_topk() -> None:
        for lo in range(0, n_samples, 1000):
            torch.cdist(xd[lo:lo + 1000], yd).topk(50, largest=False)
        _sync(device)

    t_cd, m_cd = measured(cdist_topk)
    print(f"{'torch.cdist + topk (batches of 1000)':<44} {t_cd:>8.2f} {t_prod / t_cd:>25.2f} "
          f"{m_cd / 2**20:>8.0f}")
    try:
        import faiss
    except ImportError:
        print("faiss not installed")
    else:
        gpu = device.startswith("cuda") and hasattr(faiss, "StandardGpuResources")
        if device.startswith("cuda") and not gpu:
            print("faiss has no GPU support here: its CPU index is timed")
        resources = faiss.StandardGpuResources() if gpu else None

        def flat() -> None:
            index = faiss.GpuIndexFlatL2(resources, d) if gpu else faiss.IndexFlatL2(d)
            index.add(np.asarray(y.numpy()))
            index.search(samples, 50)

        t_f, m_f = measured(flat)
        label = f"faiss {'GPU' if gpu else ''}IndexFlatL2 (k = 50)"
        print(f"{label:<44} {t_f:>8.2f} {t_prod / t_f:>25.2f} "
              f"{m_f / 2**20:>8.0f}")
        print(f"exact audit / faiss flat search time: {t_audit / t_f:.2f}")
        ratios = []
        for _ in range(repeat):  # alternated, so that both see the same machine
            t_a = measured(lambda: audit(samples, str(path), bootstrap=200,
                                         batch_size=1024, device=device))[0]
            t_f = measured(flat)[0]
            ratios.append(t_a / t_f)
        if ratios:
            print(f"alternated {repeat} times, audit / faiss flat: "
                  + ", ".join(f"{v:.2f}" for v in ratios)
                  + f" (median {float(np.median(ratios)):.2f})")
    print(f"audit: nn-ratio copies {r.nn_ratio['fraction']:.3f} (half the samples are "
          f"copies), calibrated-l2 copies {r.calibrated_l2['fraction']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", help="one size, SAMPLES,TRAIN,D (e.g. 5000,50000,768)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="audit and faiss flat search timed alternately this many times")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sizes = [(1000, 10_000, 256), (2000, 20_000, 768)] if args.quick else [
        (5000, 50_000, 768), (10_000, 100_000, 3072)]
    if args.size:
        n_s, n_t, d = (int(v) for v in args.size.split(","))
        sizes = [(n_s, n_t, d)]
    print(f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("DIFFMEM_BENCH_DIR")) as tmp:
        for n_samples, n_train, d in sizes:
            run(n_samples, n_train, d, Path(tmp), args.repeat, args.device)


if __name__ == "__main__":
    main()
