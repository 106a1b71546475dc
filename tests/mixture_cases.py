"""The fixed set of kernel inputs whose outputs ``tests/data/mixture_reference.pt`` records.

``python tests/mixture_cases.py`` regenerates the file from the current kernel; do that only
in a commit that changes the kernel's arithmetic on purpose (and say so)."""

from __future__ import annotations

import math
import platform
from pathlib import Path

import torch

REFERENCE = Path(__file__).with_name("data") / "mixture_reference.pt"


def cases() -> list[dict]:
    """Inputs covering every phase: direct and matrix-product streaming, shortlist refinement,
    the second streamed pass, ``sigma = 0`` rows, priors of both shapes, float32/float64."""
    gen = torch.Generator().manual_seed(123)
    out = []

    def add(name, x, y, m, s2, **kw):
        out.append({"name": name, "x": x, "centres": y, "m": m, "sigma2": s2, **kw})

    for dtype in (torch.float64, torch.float32):
        y = torch.randn(20, 2, generator=gen, dtype=torch.float64).to(dtype)
        x = torch.randn(7, 2, generator=gen, dtype=torch.float64).to(dtype)
        m = torch.full((7,), 0.8, dtype=dtype)
        s2 = torch.tensor([1.0, 0.1, 1e-3, 1e-6, 0.0, 0.5, 0.0], dtype=dtype)
        add(f"direct-2d-{dtype}", x, y, m, s2, return_weights=True)
        add(f"direct-2d-chunked-{dtype}", x, y, m, s2, chunk_size=3, return_weights=True)
        prior = torch.zeros(20, dtype=dtype)
        prior[::3] = -math.inf
        add(f"direct-prior1d-{dtype}", x, y, m, s2, log_prior=prior, return_weights=True)
        prior2 = -torch.rand(7, 20, generator=gen, dtype=torch.float64).to(dtype) * 5
        prior2[:, :10] = -math.inf
        add(f"direct-prior2d-{dtype}", x, y, m, s2, log_prior=prior2)
        yb = 100 + torch.randn(300, 16, generator=gen, dtype=torch.float64)
        xb = yb[:12] + 1e-3 * torch.randn(12, 16, generator=gen, dtype=torch.float64)
        xb[0] = 0.5 * (yb[0] + yb[1])
        mb = torch.ones(12, dtype=torch.float64)
        s2b = torch.tensor([1e-6] * 6 + [1e-2, 1.0, 0.0, 10.0, 1e-4, 0.0], dtype=torch.float64)
        add(f"matmul-shortlist-{dtype}", xb.to(dtype), yb.to(dtype), mb.to(dtype),
            s2b.to(dtype), force_matmul=True, chunk_size=64, return_weights=True)
        # many near-equidistant centres: windows wider than the 16-candidate shortlist
        yc = 50 + 1e-3 * torch.randn(200, 8, generator=gen, dtype=torch.float64)
        xc = 50 + 1e-3 * torch.randn(9, 8, generator=gen, dtype=torch.float64)
        s2c = torch.tensor([1e-4, 1e-5, 1e-6, 0.0, 1e-3, 1e-2, 1e-7, 0.0, 1e-5],
                           dtype=torch.float64)
        add(f"matmul-second-pass-{dtype}", xc.to(dtype), yc.to(dtype),
            torch.ones(9, dtype=dtype), s2c.to(dtype), force_matmul=True, chunk_size=50,
            return_weights=True)
        priorc = torch.zeros(200, dtype=dtype)
        priorc[1::2] = -math.inf
        add(f"matmul-second-pass-prior-{dtype}", xc.to(dtype), yc.to(dtype),
            torch.ones(9, dtype=dtype), s2c.to(dtype), force_matmul=True, chunk_size=50,
            log_prior=priorc)
        priorc2 = -3 * torch.rand(9, 200, generator=gen, dtype=torch.float64).to(dtype)
        priorc2[:, :100] = -math.inf
        add(f"matmul-second-pass-prior2d-{dtype}", xc.to(dtype), yc.to(dtype),
            torch.ones(9, dtype=dtype), s2c.to(dtype), force_matmul=True, chunk_size=50,
            log_prior=priorc2, return_weights=True)
        priorb2 = -torch.rand(12, 300, generator=gen, dtype=torch.float64).to(dtype)
        add(f"matmul-shortlist-prior2d-{dtype}", xb.to(dtype), yb.to(dtype), mb.to(dtype),
            s2b.to(dtype), force_matmul=True, chunk_size=64, log_prior=priorb2)
        yd = torch.rand(400, 256, generator=gen, dtype=torch.float64)
        xd = yd[:16] + 1e-6 * torch.randn(16, 256, generator=gen, dtype=torch.float64)
        add(f"matmul-images-{dtype}", xd.to(dtype), yd.to(dtype),
            torch.ones(16, dtype=dtype), torch.full((16,), 1e-8, dtype=dtype),
            chunk_size=128)
        off = yd.mean(0)
        add(f"matmul-offset-{dtype}", (xd - off).to(dtype), (yd - off).to(dtype),
            torch.full((16,), 0.9, dtype=dtype), torch.logspace(-8, 0, 16).to(dtype),
            offset=off.to(dtype), chunk_size=256)
    return out


def outputs(case: dict) -> dict:
    from diffmem.mixture import gaussian_mixture

    kw = {k: v for k, v in case.items() if k not in {"name", "x", "centres", "m", "sigma2"}}
    mix = gaussian_mixture(case["x"], case["centres"], case["m"], case["sigma2"], **kw)
    res = {"log_norm": mix.log_norm, "mean": mix.mean}
    if mix.weights is not None:
        res["weights"] = mix.weights
    return res


def machine() -> str:
    """What bit-identity of floating-point results depends on here."""
    return (f"torch {torch.__version__}, {platform.machine()}, "
            f"{torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save({"machine": machine(),
                "outputs": {c["name"]: outputs(c) for c in cases()}}, REFERENCE)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes) on {machine()}")
