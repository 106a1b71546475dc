"""Detection cost against the cheapest detector, measured side by side in one run (CI does not
run this).

    python benchmarks/bench_detect.py                    # both cases, 3 alternations
    python benchmarks/bench_detect.py --case repeats --repeat 1
    python benchmarks/bench_detect.py --agreement        # confirmation steps against 50

Two conditional diffusers UNets on 8x8 digits are trained here (cached in
``--cache``; ``--train-steps``, default 3000 as ``detect-digits``' full settings), label dropout
to a null class:

* ``repeats``: 10 digit classes of 40 images and 20 labels that each name one image repeated
  5, 15 or 50 times (30 labels); the conditions tested are the 30 labels, each given 10
  times (300 conditions);
* ``distinct``: a cross-attention UNet conditioned on a 16-dimensional embedding, 1,000
  distinct conditions: 950 embeddings near one of 10 class prototypes (each a digit class)
  and 50 far ones, each naming one image (:func:`distinct_case`); each tested once.

Alternated ``--repeat`` times on each case:

* the minimal first-step screen: Wen et al.'s ``|eps(c) - eps(null)|`` alone (``detect
  --measures wen``), every condition its own (no deduplication), 4 noise draws, batches of
  256 conditions: 2 network evaluations per condition and draw;
* ``diffmem detect`` at its defaults, with verdicts (the screen, the sequential confirmation,
  the verdicts of the consistency rule).

Prints each time, the ratio default / minimal (target <= 5), the conditions called memorized
by kind (single-image labels, class labels: the single images are the memorized ones where
the model copies them) and the generations drawn. ``--agreement``: on the ``repeats`` model,
each distinct label's consistency ratio from 32 generations at 5, 10, 20 and 50 DDIM steps,
against 50 steps (largest absolute difference, verdicts at the line that differ).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from diffmem.detect import detect
from diffmem.verdicts import judge


def _train(cache: Path, name: str, train: torch.Tensor, labels: torch.Tensor,
           steps: int) -> Any:
    """A class-conditional UNet trained on ``train`` with ``labels`` (resumed from
    ``cache``), wrapped as a diffmem model; and its null label."""
    from diffmem.experiments.base import Context
    from diffmem.experiments.regularize import train_run
    from diffmem.models import wrap_diffusers

    params = {"width": 16, "lr": 2e-3, "batch_size": 32, "steps": steps, "every": steps}
    ctx = Context(name=name, params=params, out=cache / name, device=torch.device("cpu"),
                  seed=0, progress=True, resume=True)
    run = train_run(ctx, name, train, 0.0, labels=labels, p_uncond=0.1)
    return wrap_diffusers(run["model"], run["scheduler"], name=name), torch.tensor(run["null"])


def repeats_case(cache: Path, steps: int) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """The 30-label model; its 300 conditions (each label 10 times); the first single-image
    label."""
    from diffmem.experiments.detection import _conditional_data

    train, labels, _ = _conditional_data({"n_classes": 10, "per_class": 40, "n_single": 20})
    model, null = _train(cache, "repeats", train, labels, steps)
    return model, torch.arange(30).repeat(10), null, 10


def distinct_case(cache: Path, steps: int) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """The 1,000-condition model: a cross-attention ``UNet2DConditionModel`` conditioned on
    one 16-dimensional embedding; conditions 0-949 lie near one of 10 class prototypes (a
    digit class each; every class image trained under a fresh draw near its prototype),
    950-999 are far, each naming one image (drawn with probability 0.3 a step). Returns the
    model, the 1,000 conditions ``(1000, 1, 16)``, the null (zeros) and 950."""
    import diffusers

    from diffmem import images
    from diffmem.models import wrap_diffusers

    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 16, generator=gen)
    (flat, _), (digit, _) = images.digit_split(1500, labels=True)
    classes = [torch.nonzero(digit == c).squeeze(1)[:40] for c in range(10)]
    used = set(torch.cat(classes).tolist())
    singles = torch.tensor([i for i in range(flat.shape[0]) if i not in used][:50])
    near = protos.repeat(95, 1) + 0.3 * torch.randn(950, 16, generator=gen)
    far = 3 * torch.randn(50, 16, generator=gen)
    conds = torch.cat([near, far])[:, None, :]
    data = (flat.reshape(-1, 1, 8, 8) * 2 - 1).float()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    path = cache / "distinct" / f"unet_{steps}.pt"
    if path.is_file():
        unet.load_state_dict(torch.load(path))
    else:
        opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
        for _ in range(steps):
            single = torch.rand(32, generator=gen) < 0.3
            c = torch.randint(0, 10, (32,), generator=gen)
            j = torch.randint(0, 40, (32,), generator=gen)
            s = torch.randint(0, 50, (32,), generator=gen)
            rows = torch.where(single, singles[s], torch.stack([classes[a][b] for a, b in
                                                                zip(c, j, strict=True)]))
            y = torch.where(single[:, None], far[s], protos[c] + 0.3 * torch.randn(
                32, 16, generator=gen))
            y = torch.where((torch.rand(32, generator=gen) < 0.1)[:, None], 0.0, y)
            x0 = data[rows]
            noise = torch.randn(x0.shape, generator=gen)
            k = torch.randint(0, 1000, (32,), generator=gen)
            loss = ((unet(sched.add_noise(x0, noise, k), k, encoder_hidden_states=y[:, None])
                     .sample - noise) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(unet.state_dict(), path)
    model = wrap_diffusers(unet.eval(), sched, name="distinct")
    return model, conds, torch.zeros(1, 16), 950


def timed(case: str, model: Any, conds: torch.Tensor, null: torch.Tensor, single: int,
          repeat: int) -> float:
    """Alternate the minimal screen and the default run; print and return the median
    ratio."""
    n = conds.shape[0]
    distinct = torch.unique(conds.reshape(n, -1), dim=0).shape[0]
    print(f"\n{case}: {n} conditions ({distinct} distinct); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'minimal s':>10} {'default s':>10} {'ratio':>7} {'memorized single':>17} "
          f"{'memorized class':>16} {'confirmed':>10} {'generations':>12}")
    ratios = []
    for _ in range(repeat):
        start = time.perf_counter()
        detect(model, conds, null, measures=["wen"], chunk=256, keys=list(range(n)))
        minimal = time.perf_counter() - start
        start = time.perf_counter()
        res = detect(model, conds, null)
        judge(res)
        full = time.perf_counter() - start
        firsts = [e for e in res.entries if e.get("same_as") is None]
        mem_single = sum(bool(e["memorized"]) for e in firsts if e["index"] >= single)
        mem_class = sum(bool(e["memorized"]) for e in firsts if e["index"] < single)
        n_single = sum(e["index"] >= single for e in firsts)
        ratios.append(full / minimal)
        print(f"{minimal:>10.2f} {full:>10.2f} {full / minimal:>7.2f} "
              f"{mem_single:>9} of {n_single:<5} {mem_class:>8} of {len(firsts) - n_single:<5}"
              f" {res.settings['confirm']:>10} {res.settings['generations_drawn']:>12}")
    print(f"{case}: median ratio {statistics.median(ratios):.2f} (target <= 5)")
    return statistics.median(ratios)


def agreement(model: Any, null: torch.Tensor) -> None:
    """Each distinct label's ratio from one round of 32 generations at 5, 10, 20 and 50 DDIM
    steps, against 50."""
    import diffmem.confirm as cf

    first = cf.FIRST
    cf.FIRST = 32  # one round of the cap: the ratio of 32 generations, no early stop
    try:
        found = {s: detect(model, torch.arange(30), null, measures=["consistency"],
                           confirm_steps=s) for s in (5, 10, 20, 50)}
    finally:
        cf.FIRST = first
    ref = [e["consistency_ratio"] for e in found[50].entries]
    print("\nconfirmation steps against 50 (30 labels, 32 generations each):")
    for s, res in found.items():
        got = [e["consistency_ratio"] for e in res.entries]
        diff = max(abs(a - b) for a, b in zip(got, ref, strict=True))
        flips = sum((a < cf.LINE) != (b < cf.LINE) for a, b in zip(got, ref, strict=True))
        print(f"  {s:>2} steps: largest |ratio - ratio(50)| {diff:.3f}; verdicts at the line "
              f"that differ: {flips} of 30; {res.settings['seconds']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["repeats", "distinct", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--cache", type=Path, default=Path(".bench_cache") / "detect")
    parser.add_argument("--agreement", action="store_true")
    args = parser.parse_args()
    if args.agreement:
        model, _, null, _ = repeats_case(args.cache, args.train_steps)
        agreement(model, null)
        return
    cases = {"repeats": repeats_case, "distinct": distinct_case}
    for name in (cases if args.case == "both" else [args.case]):
        model, conds, null, single = cases[name](args.cache, args.train_steps)
        timed(name, model, conds, null, single, args.repeat)


if __name__ == "__main__":
    main()
