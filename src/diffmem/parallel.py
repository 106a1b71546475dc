"""The model work of one command split over the processes of a ``torch.distributed`` group
(``torchrun``), with the outputs of one process.

Work is cut into **units** whose contents never depend on the number of processes (a batch of
draws, a chunk of conditions, a noise level): unit ``i`` is computed from its own seeded
generators (:func:`generator`), so it gives the same numbers in any process. A
:class:`Team` deals the units out round-robin, ``P`` at a time (one *round*: unit ``k P + r``
to process ``r``), and collects each round's results on process 0 (or on every process),
in unit order, before the next; process 0 records them as they come, so a run killed between
rounds keeps what was finished, whatever the number of processes of the rerun.

Results travel by point-to-point messages (``send``/``recv`` of pickled bytes), so when a
process dies the others stop with :class:`LostProcess`, naming it, instead of waiting
forever in a collective. Process 0 first checks that every process runs the same command
(:meth:`Team.agree`): a different ``--seed`` or model is an error before any work.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

U = TypeVar("U")
R = TypeVar("R")


class LostProcess(RuntimeError):
    """Another process of the group stopped (it failed or was killed) while this one waited
    for it: the message names it and says how to go on."""


class Disagreement(ValueError):
    """The processes of one launch were given different options."""


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, *keys)`` (through numpy's ``SeedSequence``):
    independent streams for the units of one run, the same in every process."""
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), *(int(k) for k in keys)])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))


@dataclass(frozen=True)
class Team:
    """The processes sharing a command's work (``group``: a torch.distributed group, or
    ``None`` for one process) and this one's ``rank`` among ``size``."""

    group: Any = None
    rank: int = 0
    size: int = 1

    @classmethod
    def of(cls, group: Any) -> Team:
        """The team of ``group`` (``None``: this process alone)."""
        if group is None:
            return cls()
        import torch.distributed as dist

        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def leader(self) -> bool:
        """Whether this process collects, prints and writes (process 0)."""
        return self.rank == 0

    # --- messages --------------------------------------------------------------------------
    def _device(self) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _lost(self, rank: int, err: BaseException) -> LostProcess:
        return LostProcess(
            f"process {rank} of {self.size} stopped while process {self.rank} waited for it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); see process {rank}'s "
            "own output for why. Finished work is kept: run the same command again (with "
            "any number of processes) to go on from it")

    def _send(self, obj: Any, dst: int) -> None:
        import torch.distributed as dist

        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        dev = self._device()
        try:
            dist.send(torch.tensor([data.numel()], dtype=torch.int64, device=dev), dst,
                      group=self.group)
            dist.send(data.to(dev), dst, group=self.group)
        except RuntimeError as err:
            raise self._lost(dst, err) from err

    def _recv(self, src: int) -> Any:
        import torch.distributed as dist

        dev = self._device()
        size = torch.zeros(1, dtype=torch.int64, device=dev)
        try:
            dist.recv(size, src, group=self.group)
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
            dist.recv(data, src, group=self.group)
        except RuntimeError as err:
            raise self._lost(src, err) from err
        return pickle.loads(data.cpu().numpy().tobytes())

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj``, in rank order, on process 0 (``None`` elsewhere)."""
        if self.size == 1:
            return [obj]
        if not self.leader:
            self._send(obj, 0)
            return None
        return [obj, *(self._recv(r) for r in range(1, self.size))]

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj``, on every process."""
        if self.size == 1:
            return obj
        if self.leader:
            for r in range(1, self.size):
                self._send(obj, r)
            return obj
        return self._recv(0)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        return self.broadcast(self.gather(obj))

    def barrier(self) -> None:
        """Wait for every process (an error naming the process that stopped, not a hang)."""
        self.all_gather(None)

    def agree(self, options: dict[str, Any]) -> None:
        """Raise :class:`Disagreement` on every process, before any work, when another
        process was given different ``options`` than process 0 (the message names the
        option, the process and both values)."""
        if self.size == 1:
            return
        seen = self.gather(options)
        problem = None
        if seen is not None:
            for rank, theirs in enumerate(seen[1:], start=1):
                diff = sorted(k for k in set(options) | set(theirs)
                              if options.get(k) != theirs.get(k))
                if diff:
                    k = diff[0]
                    problem = (f"{k}: expected the same value in every process (process 0 has "
                               f"{options.get(k)!r}), received {theirs.get(k)!r} in process "
                               f"{rank}; launch every process with the same options")
                    break
        problem = self.broadcast(problem)
        if problem is not None:
            raise Disagreement(problem)

    # --- work ------------------------------------------------------------------------------
    def map(self, fn: Callable[[U], R], units: Sequence[U], *, to_all: bool = True,
            on_round: Callable[[list[tuple[U, R]]], None] | None = None,
            weight: Callable[[U], int] | None = None, progress: bool = False,
            desc: str = "") -> tuple[list[R] | None, list[int]]:
        """``[fn(u) for u in units]`` with the units dealt round-robin: in round ``k``
        process ``r`` computes ``units[k P + r]``; the round's results are gathered on
        process 0 (on every process when ``to_all``), which calls ``on_round`` with them
        (``(unit, result)`` in unit order) before the next round. Returns the results in
        unit order (``None`` on the other processes without ``to_all``) and the weight of
        the units each process computed (``weight``: default 1 a unit; without ``to_all``
        only process 0 knows the others'). One progress bar, on process 0, counts the
        units' weights."""
        weigh = weight or (lambda _u: 1)
        bar = tqdm(total=sum(weigh(u) for u in units), disable=not (progress and self.leader),
                   desc=desc)
        results: list[R] = []
        per_process = [0] * self.size
        for lo in range(0, len(units), self.size):
            batch = list(units[lo:lo + self.size])
            busy = self.rank < len(batch)  # the last round may leave processes idle
            value = fn(batch[self.rank]) if busy else None
            got = self.all_gather(value) if to_all else self.gather(value)
            if got is not None:
                pairs = list(zip(batch, got[:len(batch)], strict=True))
                if on_round is not None and self.leader:
                    on_round(pairs)
                results += [r for _, r in pairs]
                for r, u in enumerate(batch):
                    per_process[r] += weigh(u)
                    bar.update(weigh(u))
            elif busy:
                per_process[self.rank] += weigh(batch[self.rank])
        bar.close()
        if not to_all and not self.leader:
            return None, per_process
        return results, per_process


#: This process alone (no group): :meth:`Team.map` is a plain loop.
SOLO = Team()

__all__ = ["SOLO", "Disagreement", "LostProcess", "Team", "generator"]
