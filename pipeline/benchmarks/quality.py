"""Benchmark: quality on real captioned images (Twitter's emoji, `pipeline.data.emoji`), end to end.

    python jobs/benchmark.py quality [--data DIR] [--workdir DIR] [--captions 1000] [key=value ...]

The whole workflow (vq, clip, encode, ldm, samples, evaluate) trains on the emoji shards, the
(emoji, skin tone) pairs of `composed_pairs` left out, with what a user gets by default
(`jobs/train_ldm.py data.shards=... data.image_size=32`: jobs/configs/demo.yaml's recipe) unless
overridden. Then, with fixed seeds:

- **fidelity** at guidance 1 and 3: one image for each of `--captions` training captions (fixed,
  drawn once), judged by `pipeline.judge.NearestImageJudge` over all 3,775 real images (chance
  0.0003): the share whose nearest real image is the one the caption names (and within the
  nearest five), with its standard error over the captions (`fidelity_se`; 1,000 captions hold a
  figure near 0.05 to about +-0.007, 300 to +-0.013);
- **composed**: the same on the held-out (emoji, tone) pairs' captions, never seen together;
- **calibration**, beside them: the judge on the named real images themselves (1.0 unless images
  repeat) and on them after the first stage's round trip (`first_stage`: the ceiling of a perfect
  diffusion model over this VQ);
- the evaluate stage's FD and CLIP score per guidance scale, the vq stage's held-out PSNR and
  codebook usage, and each stage's wall time.

`<workdir>/quality.png` shows generated images above the real ones they should match.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

BASE_OVERRIDES = ["data.image_size=32"]  # the rest: jobs/configs/demo.yaml, what train_ldm.py runs by default
SCALES = (1.0, 3.0)


def generate(model, captions: list[str], scale: float, seed: int = 0, batch_size: int = 64):
    """One image per caption (seed + i) at the model's default steps and sampler, stacked (uint8)."""
    return np.stack([image for _, images in model.generate_in_chunks(captions, seed, scale, batch_size=batch_size)
                     for image in images])


def round_trip(vq, images):
    """Real images through the first stage (encode, quantize, decode), as uint8."""
    import torch

    from pipeline.data.images import images_to_tensor, tensor_to_images

    with torch.no_grad():
        return np.concatenate([tensor_to_images(vq(images_to_tensor(images[i:i + 256]))[0])
                               for i in range(0, len(images), 256)])


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="benchmark.py quality")
    parser.add_argument("--data", default=None, help="where the emoji package tarball is (make benchmark-data)")
    parser.add_argument("--workdir", default="", help="keep the run here (default: a temporary directory)")
    parser.add_argument("--captions", type=int, default=1000, help="training captions judged (one image each per guidance scale)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.workdir:
        return run(args, Path(args.workdir))
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, Path(tmp))


def run(args, workdir: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.data import emoji as E
    from pipeline.data.images import captioned_tile
    from pipeline.data.reader import is_heldout
    from pipeline.judge import NearestImageJudge
    from pipeline.model_package import PipelineModel
    from pipeline.workflow import Workflow

    tgz = E.require(args.data or E.DEFAULT_DIR)
    manifest = E.write_emoji_shards(tgz, workdir / "emoji")
    cfg = load_config(None, [f"workdir={workdir}", f"data.shards={manifest['shards']}", *BASE_OVERRIDES,
                             *args.overrides])
    start = time.perf_counter()
    summary = Workflow(cfg).run()
    wall_s = time.perf_counter() - start

    emoji, gallery = E.load_gallery(tgz, cfg.data.image_size)
    keys = [e.key for e in emoji]
    judge = NearestImageJudge(gallery, keys)
    held = set(manifest["composed"])
    train = [i for i, e in enumerate(emoji) if e.key not in held and not is_heldout(e.key, cfg.data.heldout_fraction)]
    picked = sorted(np.random.default_rng(0).choice(train, size=min(args.captions, len(train)), replace=False))
    sets = {"train": picked, "composed": [i for i, e in enumerate(emoji) if e.key in held]}

    model = PipelineModel.from_uri(summary["model_uri"], summary["tracking_uri"])
    result: dict = {"chance": judge.chance, "gallery": len(keys), "data": manifest["package"],
                    "image_size": cfg.data.image_size, "overrides": [*BASE_OVERRIDES, *args.overrides]}
    shown = []
    for name, idx in sets.items():
        captions, target = [emoji[i].caption for i in idx], [keys[i] for i in idx]
        real = gallery[idx]
        result[f"{name}_calibration"] = {
            "real": judge.judge(real, target).figures()["fidelity"],
            "first_stage": judge.judge(round_trip(model.vq, real), target).figures()["fidelity"]}
        for scale in SCALES:
            t0 = time.perf_counter()
            images = generate(model, captions, scale)
            figures = judge.judge(images, target).figures()
            result[f"{name}_g{scale:g}"] = {**figures, "seconds": round(time.perf_counter() - t0, 1)}
            if scale == SCALES[-1]:
                shown.append((images[:8], real[:8], captions[:8]))
    tiles, labels = [], []
    for images, real, captions in shown:
        tiles += [*images, *real]
        labels += [f"{c} (generated g{SCALES[-1]:g})" for c in captions] + ["real"] * len(real)
    from PIL import Image

    Image.fromarray(captioned_tile(tiles, labels, ncol=8)).save(workdir / "quality.png")

    stages = summary["stages"]
    evaluate = stages["evaluate"]["metrics"]
    result.update({
        "fd": {k: v for k, v in evaluate.items() if k.startswith("fd_")},
        "clip_score": {k: v for k, v in evaluate.items() if k.startswith("clip_score_")},
        "vq": {k: stages["vq"]["metrics"].get(k) for k in ("psnr", "codebook_usage")},
        "clip_retrieval": stages["clip"]["metrics"].get("retrieval_top1"),
        "stage_seconds": {name: s["seconds"] for name, s in stages.items()},
        "wall_s": round(wall_s, 1),
        "grid": str(workdir / "quality.png"),
    })
    return result
