"""Scale benchmarks, measured side by side in one run (CI does not run this).

    python benchmarks/bench_scale.py            # all parts (about 15 minutes on 2 cores)
    python benchmarks/bench_scale.py --quick    # smaller sizes, for a smoke test
    python benchmarks/bench_scale.py --parts b  # one part

A. Cost against N (d = 64, 256 queries, a memory-mapped float32 training set): time per score
   evaluation and its ratio to the smallest N per point (linear in N means a flat ratio), and
   peak resident memory above the inputs, measured in a fresh process (VmHWM, which counts
   resident pages of the mapped file, and the anonymous memory alone, RssAnon; Linux).
B. CIFAR-10-sized closed-form sampling: N = 20,000 and 50,000 images of d = 3,072, 64
   samples, EDM Heun with 18 levels (35 denoiser calls): the time, and the fraction of the
   rate of the two matrix products each denoiser call needs at minimum (distances ``x Y^T``
   and the weighted mean ``W Y``, timed on the same shapes in the same process): fraction =
   35 t(products) / t(sampling). Training set in memory (float32, float64 against float64
   products), memory-mapped from a .npy file, stored in float16/bfloat16 (with the error it
   adds to the samples), and split over 2 processes (torchrun, gloo, 1 thread each) against
   1 process with 2 threads.
C. Model sampling across processes: the wall time of ``diffmem audit --model --prompts`` on
   the tiny Stable Diffusion layout of the tests (16x16x4 latents, 8 prompts x 24 draws,
   DDIM 50 steps with guidance, batches of 2; ``--draws``: the sampling is most of the time,
   as in a real audit, next to the ~10 s of imports and loading each process pays), one
   process of 1 thread against
   ``--processes`` processes of 1 thread each (torchrun, gloo; one GPU each with
   ``--device cuda``, NCCL), best of ``--repeat`` interleaved runs: the wall time and the
   sampling's (its progress record), and whether the samples are the same bytes. The
   target on 2 CPU processes: at least 1.7x.
On a GPU (``--device cuda``) part B runs on it, float32 and with TF32 matrix products.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.edm import closed_form_denoiser, edm_sample, karras_sigmas
from diffmem.schedules import EDM, VE
from diffmem.scores import EmpiricalScore

HERE = Path(__file__).resolve()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return -1


def _poll_anon_peak(stop: list[bool], peak: list[int]) -> None:
    """Poll the process's anonymous resident memory (heap, tensors) every millisecond."""
    while not stop[0]:
        peak[0] = max(peak[0], _status("RssAnon:"))
        time.sleep(0.001)


def peak_extra(path: str, queries: int, t: float) -> tuple[int, int]:
    """Peak resident memory of one score evaluation above what the process held before it,
    with the training set memory-mapped from ``path`` (a fresh process): all of it (VmHWM,
    which counts the pages of the mapped file that are resident, memory the kernel can drop),
    and the anonymous part alone (RssAnon, polled: what the computation allocates)."""
    code = (
        f"import sys, torch, pathlib, threading; sys.path.insert(0, {str(HERE.parent)!r});"
        "from bench_scale import _status, _poll_anon_peak;"
        "from diffmem.scores import EmpiricalScore;"
        f"from diffmem.schedules import VE; sc = EmpiricalScore({path!r}, VE());"
        f"x = torch.rand({queries}, 64); sc(x, {t!r});"  # warm-up: allocator
        "pathlib.Path('/proc/self/clear_refs').write_text('5'); before = _status('VmRSS:');"
        "anon = _status('RssAnon:'); stop, peak = [False], [anon];"
        "th = threading.Thread(target=_poll_anon_peak, args=(stop, peak)); th.start();"
        f"sc(x, {t!r}); stop[0] = True; th.join();"
        "print(_status('VmHWM:') - before, peak[0] - anon)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    fields = out.stdout.split()
    return (int(fields[0]), int(fields[1])) if len(fields) == 2 else (-1, -1)


def part_a(quick: bool, folder: Path) -> None:
    sizes = [1_000, 10_000, 100_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    print("\nA. score evaluation against N (d = 64, 256 queries, memory-mapped float32, t = 0.3)")
    print(f"{'N':>9} {'ms/eval':>9} {'ns per point':>13} {'ratio to smallest':>18} "
          f"{'peak extra MB':>14} {'of it anonymous':>16} {'file MB':>8}")
    gen = np.random.default_rng(0)
    first = None
    for n in sizes:
        path = folder / f"a_{n}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 64))
        for lo in range(0, n, 100_000):
            hi = min(n, lo + 100_000)
            arr[lo:hi] = gen.random((hi - lo, 64), dtype=np.float32)
        arr.flush()
        del arr
        score = EmpiricalScore(str(path), VE())
        x = torch.rand(256, 64, generator=torch.Generator().manual_seed(1))
        score(x, 0.3)
        reps = 5 if n <= 100_000 else 2
        start = time.perf_counter()
        for _ in range(reps):
            score(x, 0.3)
        per = (time.perf_counter() - start) / reps
        per_point = per / n * 1e9
        first = first or per_point
        peak, anon = peak_extra(str(path), 256, 0.3)
        print(f"{n:>9} {1e3 * per:>9.1f} {per_point:>13.1f} {per_point / first:>18.2f} "
              f"{peak / 2**20:>14.1f} {anon / 2**20:>16.1f} "
              f"{path.stat().st_size / 2**20:>8.0f}")


def two_products(x: torch.Tensor, y: torch.Tensor, repeat: int = 3) -> float:
    """Median time of ``w = x y^T`` and ``w y``: what a denoiser call needs at minimum."""
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        w = x @ y.T
        _ = w @ y
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def sample(train: object, x_T: torch.Tensor, **kw: object) -> tuple[torch.Tensor, float, int]:
    """EDM Heun, 18 levels, with the empirical denoiser: samples, seconds, denoiser calls."""
    score = EmpiricalScore(train, EDM(), **kw)
    den = closed_form_denoiser(score)
    calls = [0]

    def counted(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return den(x, s)

    sigmas = karras_sigmas(18).to(x_T.device)
    edm_sample(counted, x_T[:2], karras_sigmas(2))  # warm-up (centring, r_max, allocator)
    calls[0] = 0
    start = time.perf_counter()
    out = edm_sample(counted, x_T, sigmas)
    if x_T.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, calls[0]


def worker(path: str, n: int, result: str) -> None:
    """One process of the sharded run (started by torchrun): its block of the memory-map."""
    import torch.distributed as dist

    from diffmem.centres import shard_rows

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = shard_rows(n, world, rank)
    block = np.load(path, mmap_mode="r")[lo:hi]
    x_T = 80 * torch.randn(64, 3072, generator=torch.Generator().manual_seed(2))
    out, sec, calls = sample(block, x_T, process_group=dist.group.WORLD)
    if rank == 0:
        torch.save({"samples": out, "seconds": sec, "calls": calls}, result)
    dist.destroy_process_group()


def part_b(quick: bool, folder: Path, device: str) -> None:
    sizes = [2_000, 5_000] if quick else [20_000, 50_000]
    d, B = 3072, 64
    print(f"\nB. CIFAR-10-sized closed-form sampling (d = {d}, {B} samples, EDM Heun, "
          f"18 levels), {torch.get_num_threads()} threads, device {device}")
    print(f"{'N':>7} {'path':<32} {'seconds':>8} {'calls':>6} {'products s':>11} "
          f"{'fraction':>9} {'max |x - x_mem|':>16}")
    dev = torch.device(device)
    for n in sizes:
        gen = torch.Generator().manual_seed(0)
        train = torch.rand(n, d, generator=gen)
        path = folder / f"b_{n}.npy"
        np.save(path, train.numpy())
        x_T = (80 * torch.randn(B, d, generator=torch.Generator().manual_seed(2))).to(dev)
        y32 = train.to(dev)
        probe = x_T / 80 + 0.5
        t32 = two_products(probe, y32)
        runs = [("in memory, float32", train.to(dev), x_T, t32, {})]
        if dev.type == "cuda":
            runs.append(("in memory, TF32 products", train.to(dev), x_T, None, {}))
        else:
            runs.append(("memory-mapped .npy, float32", str(path), x_T, t32, {}))
        runs += [("in memory, float16 storage", train.to(dev), x_T, t32, {"storage": "float16"}),
                 ("in memory, bfloat16 storage", train.to(dev), x_T, t32,
                  {"storage": "bfloat16"})]
        t64 = two_products(probe.double(), y32.double())
        runs.append(("in memory, float64", train.double().to(dev), x_T.double(), t64, {}))
        reference = None
        seconds: dict[str, float] = {}
        for label, data, x0, t_prod, kw in runs:
            torch.backends.cuda.matmul.allow_tf32 = "TF32" in label
            if "TF32" in label:
                t_prod = two_products(probe, y32)
            out, sec, calls = sample(data, x0, **kw)
            seconds[label] = sec
            reference = out if reference is None else reference
            err = float((out.double() - reference.double()).abs().max())
            print(f"{n:>7} {label:<32} {sec:>8.2f} {calls:>6} {calls * t_prod:>11.2f} "
                  f"{calls * t_prod / sec:>9.2f} {err:>16.2e}", flush=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        if dev.type == "cpu":
            result = folder / f"sharded_{n}.pt"
            env = dict(os.environ, OMP_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node=2", str(HERE), "--worker", str(path), str(n),
                   str(result)]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            got = torch.load(result, weights_only=True)
            err = float((got["samples"].double() - reference.double()).abs().max())
            sec = got["seconds"]
            print(f"{n:>7} {'2 processes x 1 thread (gloo)':<32} {sec:>8.2f} "
                  f"{got['calls']:>6} {got['calls'] * t32:>11.2f} "
                  f"{got['calls'] * t32 / sec:>9.2f} {err:>16.2e}   (speed-up of 2 "
                  f"processes over 1: {seconds['in memory, float32'] / sec:.2f}x)", flush=True)


def _audit_model(args: list[str], out: Path, processes: int) -> tuple[float, float]:
    """Wall time of ``diffmem audit ARGS --out OUT`` in ``processes`` processes, and of its
    sampling (the seconds its progress record holds)."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "diffmem"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "-m", "diffmem"]
    start = time.perf_counter()
    done = subprocess.run([*launch, "audit", *args, "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    wall = time.perf_counter() - start
    return wall, json.loads((out / "samples.npy.progress.json").read_text())["seconds"]


def part_c(quick: bool, folder: Path, device: str, processes: int, draws: int,
           repeat: int) -> None:
    sys.path.insert(0, str(HERE.parent.parent / "tests"))
    from tiny_pipelines import sd_pipeline

    latent, steps = (8, 10) if quick else (16, 50)
    per = max(1, (16 if quick else draws) // 8)
    sd = sd_pipeline(folder / "sd", latent_size=latent, channels=(32, 64))
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"a photo of thing {i}\n" for i in range(8)))
    gen = np.random.default_rng(0)
    np.save(folder / "c_train.npy",
            gen.uniform(-1, 1, (16, 3, 2 * latent, 2 * latent)).astype(np.float32))
    args = ["--model", str(sd), "--prompts", str(prompts), "--train",
            str(folder / "c_train.npy"), "--sampler", "pipeline", "--steps", str(steps),
            "--per-condition", str(per), "--batch-size", "2", "--bootstrap", "100",
            "--device", device]
    print(f"\nC. audit --model --prompts, tiny SD layout ({latent}x{latent}x4 latents, "
          f"{8 * per} draws, {steps} steps, batches of 2), device {device}")
    one, many = [], []
    for r in range(repeat):  # interleaved: both see the same machine
        one.append(_audit_model(args, folder / f"c1_{r}", 1))
        many.append(_audit_model(args, folder / f"c{processes}_{r}", processes))
    same = all((folder / "c1_0" / name).read_bytes()
               == (folder / f"c{processes}_{r}" / name).read_bytes()
               for r in range(repeat) for name in ("samples.npy", "initial_noise.npy"))
    (w1, s1), (wp, sp) = min(one), min(many)
    print(f"1 process x 1 thread: {w1:.2f} s (sampling {s1:.2f} s); {processes} processes x "
          f"1 thread: {wp:.2f} s (sampling {sp:.2f} s); speed-up {w1 / wp:.2f}x (sampling "
          f"{s1 / sp:.2f}x); samples and noise {'the same bytes' if same else 'DIFFERENT'}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="abc")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=2, help="of part C")
    parser.add_argument("--draws", type=int, default=192, help="of part C (8 prompts)")
    parser.add_argument("--repeat", type=int, default=1, help="of part C, interleaved")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(dir=os.environ.get("DIFFMEM_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        if "a" in args.parts:
            part_a(args.quick, folder)
        if "b" in args.parts:
            part_b(args.quick, folder, args.device)
        if "c" in args.parts:
            part_c(args.quick, folder, args.device, args.processes, args.draws, args.repeat)


if __name__ == "__main__":
    main()
