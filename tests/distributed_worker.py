"""Run by ``torchrun`` from ``tests/test_distributed.py``: every process holds its block of
the training set and evaluates scores, weights, nearest neighbours and ODE samples through
a gloo process group; each rank saves what it got to ``OUT/rank_R.pt``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from diffmem import metrics
from diffmem.centres import shard_rows
from diffmem.samplers import sample_ode
from diffmem.schedules import VE, VP
from diffmem.scores import (
    ConditionalEmpiricalScore,
    EmpiricalScore,
    ThresholdScore,
    TikhonovScore,
)


def data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training set, labels, queries and initial noise (the same on every process)."""
    gen = torch.Generator().manual_seed(n)
    train = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    labels = torch.arange(n) % 3
    x = torch.cat([train[:4] + 1e-3, 3 * torch.randn(6, 3, generator=gen, dtype=torch.float64),
                   train[:1]])
    x_T = VE().prior_sample(12, 3, gen, dtype=torch.float64)
    return train, labels, x, x_T


def evaluate(train: torch.Tensor, labels: torch.Tensor, x: torch.Tensor, x_T: torch.Tensor,
             group: object = None) -> dict[str, torch.Tensor]:
    """Everything compared between one process and a group (``train`` is the block)."""
    kw = {} if group is None else {"process_group": group}
    out = {}
    for sch in (VE(), VP()):
        emp = EmpiricalScore(train, sch, chunk_size=4, **kw)
        for t in (1e-4, 0.05, 0.7):
            # the denoiser D = x + sigma^2 s: the score's cancellation-free part
            out[f"{sch.name}_denoiser_{t}"] = emp.denoiser(x, t)
            out[f"{sch.name}_weights_{t}"] = emp.weights(x, t)
        out[f"{sch.name}_limit"] = emp.denoiser(x, 0.0)
        out[f"{sch.name}_tikhonov"] = TikhonovScore(train, sch, 0.05, **kw)(x, 0.0)
        out[f"{sch.name}_threshold"] = ThresholdScore(train, sch, 0.1, **kw).sigma2_score(x, 0.01)
    cond = ConditionalEmpiricalScore(train, labels, VE(), mode="labels", **kw)
    out["labels"] = cond(x, 0.05, torch.tensor([0]))
    kernel = ConditionalEmpiricalScore(train, labels.double()[:, None], VE(), mode="kernel",
                                       bandwidth=0.5, **kw)
    out["kernel"] = kernel(x, 0.05, torch.full((x.shape[0], 1), 0.7, dtype=torch.float64))
    d, i = metrics.knn(x, train, 3, **kw)
    out["knn_d"], out["knn_i"] = d, i
    out["ode"] = sample_ode(VE(), EmpiricalScore(train, VE(), **kw), x_T, t_end=1e-4).samples
    return out


def main() -> None:
    out_dir, n = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train, labels, x, x_T = data(n)
    lo, hi = shard_rows(n, world, rank)
    results = evaluate(train[lo:hi], labels[lo:hi], x, x_T, dist.group.WORLD)
    torch.save(results, out_dir / f"rank_{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
