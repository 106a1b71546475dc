"""A text-to-image model that memorizes its duplicated captions, end to end on a CPU: data,
training, audit and detection with prompts, in a few minutes.

    python examples/memorize_captions.py --out memo

1. Data: 16 x 16 pictures of a coloured shape on the left or right, captioned "a red square
   on the left" (3 shapes x 4 colours x 2 sides = 24 captions), each with ``--variants``
   different pictures (the shape shifted by up to 1.5 pixels, scaled by 0.8 to 1.15, its
   colour shaded by 0.75 to 1), so a model that learns the caption need not copy any one of
   them; and three captions in words of their own ("the flag of zorbia", ...), each one
   picture unlike the shapes, duplicated ``--copies`` times in the training set (the usual
   cause of memorization). OUT/data holds the
   images, the captions (data.jsonl), the training set as trained (train.npy, duplicates
   included), each training row's prompt (train_cond.npy: its line in prompts.jsonl), the
   prompts with their labels (prompts.jsonl, 1 = duplicated; ``picture``: the caption's
   first picture) and the labels alone (labels.npy).
2. Model: the tiny Stable Diffusion layout of ``diffmem.tiny`` (a character-level CLIP
   tokenizer and text encoder, a UNet on 8 x 8 x 4 latents, a two-level VAE), its VAE
   fitted to the images and its UNet trained on the captions by
   examples/train_text2image.py. (The experiment ``mitigate-captions`` trains the same
   model in-process and runs detect and the cures on it.)
3. ``diffmem audit --prompts``: samples per prompt, decoded and compared with the training
   set as the VAE renders it (OUT/data/train_vae.npy: each training image encoded and
   decoded). A latent model that copies a training latent can only produce that image's
   reconstruction, and a VAE this small reconstructs a picture to about 1 (L2, pixels in
   [0, 1]) while distinct pictures are 2.4 or more apart: against the images themselves no
   copy passes the nn-ratio test. ``diffmem detect --prompts --labels``: the prompts ranked
   without the training set, with the ROC against the duplicated ones.

OUT/samples_by_prompt.png shows each prompt's picture and its samples. The summary gives
the copies per prompt (duplicated prompts against the others), where the
detector ranks the duplicated prompts, how well each detector's score tells the prompts
the audit found copied (half their samples or more) from the others (AUC), and the TPR and
FPR of detect's verdicts against the audit (clear prompts: copied at >= 0.75 or <= 0.25,
counting a sample copied by the nn-ratio test or as a reproduction).

Needs: pip install 'diffmem[pipelines]'.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from diffmem.experiments.captions import caption_data
from diffmem.tiny import sd_pipeline

ROOT = Path(__file__).resolve().parent.parent
def write_data(folder: Path, copies: int, variants: int = 1, seed: int = 0
               ) -> tuple[Path, Path, Path, Path]:
    """The pictures, captions, training set and labelled prompts (module docstring and
    :func:`diffmem.experiments.captions.caption_data`) written to ``folder``."""
    data = caption_data(copies, variants, seed, colours=4)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, pic in enumerate(data.pictures):
        Image.fromarray((pic.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(
            folder / "images" / f"{i:03d}.png")
    lines = [{"image": f"images/{i:03d}.png", "caption": data.prompts[data.picture_prompt[i]]}
             for i in data.rows]
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    first = data.first_picture
    prompt_file = folder / "prompts.jsonl"
    prompt_file.write_text("\n".join(json.dumps({"prompt": p, "label": int(lab),
                                                  "picture": first[j]})
                                      for j, (p, lab) in enumerate(zip(
                                          data.prompts, data.labels, strict=True))) + "\n")
    labels = folder / "labels.npy"
    np.save(labels, data.labels)
    np.save(folder / "train_cond.npy", data.row_prompt)  # each training row's prompt line
    train = folder / "train.npy"
    np.save(train, data.pictures[data.rows])  # the training set as trained
    return path, prompt_file, labels, train


def run(args: list[str]) -> None:
    """Run a command, its output shown; stop on failure."""
    print("$", " ".join(args), flush=True)
    done = subprocess.run(args)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--copies", type=int, default=20,
                        help="Copies of each duplicated picture in the training set.")
    parser.add_argument("--variants", type=int, default=20,
                        help="Pictures of each caption that is not duplicated.")
    parser.add_argument("--steps", type=int, default=3000, help="UNet training steps.")
    parser.add_argument("--vae-steps", type=int, default=300, help="VAE fitting steps.")
    parser.add_argument("--per-prompt", type=int, default=8, help="Audit samples per prompt.")
    parser.add_argument("--sample-steps", type=int, default=25, help="Sampler steps.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("copies", "variants", "steps", "per_prompt", "sample_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected an integer >= 1, "
                             f"received {getattr(args, name)}")
    data, prompts, labels, _ = write_data(args.out / "data", args.copies, args.variants,
                                          args.seed)
    base = sd_pipeline(args.out / "base", max_length=32, channels=(32, 64), seed=args.seed,
                       timesteps=1000)
    py = sys.executable
    run([py, str(ROOT / "examples" / "train_text2image.py"), "--pipeline", str(base),
         "--data", str(data), "--out", str(args.out / "run"), "--steps", str(args.steps),
         "--batch-size", "16", "--vae-steps", str(args.vae_steps), "--seed", str(args.seed)])
    model = str(args.out / "run" / "pipeline")
    # the training set as the VAE renders it: the example's reconstructions of the distinct
    # pictures (in order of first appearance, here the pictures' numbers) at each row
    rows = _rows(data)
    rendered = args.out / "data" / "train_vae.npy"
    np.save(rendered, np.load(args.out / "run" / "reconstructions.npy")[rows])
    common = ["--model", model, "--prompts", str(prompts), "--no-progress",
              "--seed", str(args.seed)]
    run([py, "-m", "diffmem", "audit", *common, "--train", str(rendered), "--train-cond",
         str(args.out / "data" / "train_cond.npy"), "--sampler",
         "pipeline", "--steps", str(args.sample_steps), "--per-condition",
         str(args.per_prompt), "--bootstrap", "200", "--out", str(args.out / "audit")])
    run([py, "-m", "diffmem", "detect", *common, "--labels", str(labels), "--steps",
         str(args.sample_steps), "--out", str(args.out / "detect")])
    summarize(args.out)


def _rows(data: Path) -> list[int]:
    """The picture of each training row, as numbered in ``write_data``."""
    return [int(Path(json.loads(line)["image"]).stem) for line in
            data.read_text().splitlines() if line.strip()]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a positive scores above a negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def draw_grid(out: Path) -> Path:
    """OUT/samples_by_prompt.png: a row per prompt, its (first) training picture as the VAE
    renders it, then its samples (each pixel drawn 3 x 3)."""
    samples = np.load(out / "audit" / "samples.npy")
    which = np.load(out / "audit" / "sample_conditions.npy")
    rendered = np.load(out / "run" / "reconstructions.npy")
    first = [json.loads(line)["picture"] for line in
             (out / "data" / "prompts.jsonl").read_text().splitlines() if line.strip()]
    per = int((which == 0).sum())
    rows = [np.concatenate([rendered[first[p]], *samples[which == p][:per]], axis=2)
            for p in range(int(which.max()) + 1)]
    grid = (np.concatenate(rows, axis=1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    path = out / "samples_by_prompt.png"
    Image.fromarray(grid.repeat(3, 0).repeat(3, 1)).save(path)
    return path


def summarize(out: Path) -> None:
    """Copies and detection ranks, duplicated prompts against the others, and how each
    detector agrees with the audit."""
    audit = json.loads((out / "audit" / "audit.json").read_text())
    detect = json.loads((out / "detect" / "detect.json").read_text())
    truth = _copied_by_prompt(out)
    groups: dict[str, list[float]] = {"1": [], "0": []}
    for e in audit["conditions"]:
        groups[e["prompt_label"]].append(truth[e["prompt_index"]])
    print(f"copies per prompt (nn-ratio or reproduction): duplicated "
          f"{np.mean(groups['1']):.2f} ({len(groups['1'])} prompts), once "
          f"{np.mean(groups['0']):.2f} ({len(groups['0'])} prompts); nn-ratio copies of all "
          f"samples {audit['nn_ratio']['fraction']:.2f}")
    primary = detect["primary"]
    ranked = sorted(detect["conditions"], key=lambda e: -(e.get(primary) or -np.inf))
    ranks = [i + 1 for i, e in enumerate(ranked) if e.get("prompt_label") == "1"]
    print(f"detect ({primary}): the duplicated prompts rank {ranks} of {len(ranked)}")
    entries = sorted(detect["conditions"], key=lambda e: e["prompt_index"])
    found = np.array([truth[e["prompt_index"]] >= 0.5 for e in entries])
    for name in detect["units"]:
        scores = np.array([np.nan if e.get(name) is None else e[name] for e in entries])
        if np.isnan(scores).any():
            continue
        roc = (detect.get("roc") or {}).get(name)
        print(f"  {name}: AUC {'-' if roc is None else format(roc['auc'], '.3f')} "
              f"(duplicated), {auc(scores, found):.3f} (copied by the audit, "
              f"{int(found.sum())} prompts)")
    clear = {i: 1 if c >= 0.75 else 0 if c <= 0.25 else None for i, c in truth.items()}
    verdict = detect.get("verdict") or {}
    flags = {e["prompt_index"]: e.get("memorized") for e in detect["conditions"]}
    pos = [flags[i] for i, c in clear.items() if c == 1]
    neg = [flags[i] for i, c in clear.items() if c == 0]
    print(f"verdicts ({verdict.get('rule')}): {sum(bool(f) for f in flags.values())} prompts "
          f"memorized; against the audit (a sample copied by nn-ratio or reproduction; clear "
          f"prompts at >= 0.75 or <= 0.25 copied): TPR "
          f"{np.mean(pos) if pos else float('nan'):.3f} ({len(pos)} prompts), FPR "
          f"{np.mean(neg) if neg else float('nan'):.3f} ({len(neg)} prompts)")
    print(f"-> {draw_grid(out)} (a row per prompt: its picture, then its samples)")


def _copied_by_prompt(out: Path) -> dict[int, float]:
    """Per prompt index, the fraction of its audited samples that are copies by the
    nn-ratio test or reproductions of the prompt's training item (per_sample.csv)."""
    import csv

    audit = json.loads((out / "audit" / "audit.json").read_text())
    index = {e["condition"]: e["prompt_index"] for e in audit["conditions"]}
    hits: dict[int, list[int]] = {}
    with open(out / "audit" / "per_sample.csv", newline="") as f:
        for row in csv.DictReader(f):
            copy = int(row["copy_nn_ratio"]) or int(row.get("copy_reproduction") or 0)
            hits.setdefault(index[row["condition"]], []).append(copy)
    return {i: float(np.mean(v)) for i, v in hits.items()}


if __name__ == "__main__":
    main()
