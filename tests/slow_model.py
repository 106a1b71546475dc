"""A callable model for the multi-process tests: the VP score of standard normal data,
``s(x, t) = -x`` (``m^2 + sigma^2 = 1``), taking 20 ms a call, so that a run of a few
batches lasts long enough to kill one of its processes midway."""

import time

import torch


def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    time.sleep(0.02)
    return -x
