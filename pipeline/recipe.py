"""What the config leaves to the data: the ldm's training budget, the first stage's capacity
(`vq.preset=auto`: `vq_preset`, chosen when the vq stage has read its training set) and the UNet
(`ldm.preset=auto`: `unet_preset`, chosen after the vq stage). Each choice comes with its reason,
printed and tagged on the MLflow runs (`recipe.ldm`, `recipe.vq`, `recipe.unet`).

The budget (and, when it is short, the first stage: `short_ldm_budget`):

`ldm.max_steps` set (> 0) is taken as it is. Otherwise the budget is `ldm.epochs` passes over the
encoded training set, and `ldm.epochs: 0` (the default) lets the caption vocabulary decide: a data set
whose captions repeat (the demo: 60 distinct captions over 4,000 images) is learnt in
EPOCHS_REPEATED passes; one where every image has a caption of its own (an icon set, most
scraped data) keeps improving far past that, and gets up to EPOCHS_DISTINCT, in proportion to
the share of distinct captions. The choice and its reason are printed, tagged `recipe.ldm` on the
workflow and ldm runs, and the ldm's metrics carry `steps` and `epochs`.

Measured on the quality benchmark (Twitter's emoji, each caption its own; `python jobs/benchmark.py
quality`): with a constant learning rate, fidelity at guidance 3 rose from 0.01 after 24 epochs to
0.05 after 48 and 0.18 after 73 and had not levelled off; with these defaults (72 epochs, cosine)
it was 0.13 where 24 epochs gave 0.003 on the same day, and with the sharper first stage and the
whole-set shuffles of the vq and clip fits it is 0.31 (0.003 after 12 epochs, 0.13 after 36; README,
"Quality on real images"). The demo's adherence is 0.99 after 22.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.training import VQ_PRESETS

VQ_PRESET_KEYS = tuple(VQ_PRESETS["plain"])

EPOCHS_REPEATED = 22.0
"""Passes when captions repeat: the demo (60 distinct captions over 4,000 images: 22.7 epochs, 1,411
steps of 64) has adherence 0.99 after 1,400 steps."""
EPOCHS_DISTINCT = 72.0
"""Passes when every caption is distinct."""


@dataclass(frozen=True)
class Budget:
    max_steps: int
    epochs: float
    samples: int
    distinct_captions: int
    steps_per_epoch: int
    """Global batches an epoch (each from one aspect-ratio bucket; a bucket's remainder waits)."""
    reason: str


def auto_epochs(samples: int, distinct_captions: int) -> float:
    """EPOCHS_REPEATED, plus up to EPOCHS_DISTINCT - EPOCHS_REPEATED in proportion to the share of
    distinct captions."""
    share = min(1.0, distinct_captions / max(1, samples))
    return round(EPOCHS_REPEATED + (EPOCHS_DISTINCT - EPOCHS_REPEATED) * share, 2)


def ldm_budget(max_steps: int, epochs: float, samples: int, distinct_captions: int, steps_per_epoch: int) -> Budget:
    """The ldm stage's steps from `ldm.max_steps`, else `ldm.epochs`, else the captions (see module doc)."""
    per_epoch = max(1, steps_per_epoch)
    if max_steps > 0:
        return Budget(max_steps, round(max_steps / per_epoch, 2), samples, distinct_captions, per_epoch,
                      f"ldm.max_steps={max_steps} is set ({max_steps / per_epoch:.1f} epochs of {samples} samples)")
    if epochs > 0:
        why = f"ldm.epochs={epochs:g} is set"
    else:
        epochs = auto_epochs(samples, distinct_captions)
        why = (f"ldm.epochs=0: {distinct_captions} distinct captions over {samples} samples "
               f"({distinct_captions / max(1, samples):.0%}) ask for {epochs:g} epochs "
               f"({EPOCHS_REPEATED:g} when captions repeat, up to {EPOCHS_DISTINCT:g} when all are distinct)")
    steps = max(1, math.ceil(epochs * per_epoch))
    return Budget(steps, epochs, samples, distinct_captions, per_epoch,
                  f"{why}: {steps} steps of {per_epoch} an epoch")


REPEATED_SHARE = 0.05
"""Captions repeat when at most this share of the samples has a caption of its own (the demo: 1.5%)."""
PLAIN_MAX_IMAGE_SIZE = 32
"""The "plain" first stage only for images up to this side: at 64 px the "detailed" one keeps 3.4 dB
more on real images (28.6 against 25.2 dB)."""


SHORT_LDM_EPOCHS = 36.0
"""An ldm budget set below this many epochs is short: the first stage's time is better spent on ldm
steps. On the quality benchmark's emoji at 32 px, at 24 epochs the plain first stage names the emoji
at guidance 3 as often as the detailed one (0.050 against 0.053) in 90 s of vq against 227; from 36
epochs on the detailed one was measured. The runs, with the old code beside them: README, "Quality
on real images"."""


def short_ldm_budget(cfg) -> bool:
    """Whether `vq.preset=auto` is to weigh a short ldm budget: `ldm.epochs` set below
    SHORT_LDM_EPOCHS (`ldm.max_steps` unset) for images up to PLAIN_MAX_IMAGE_SIZE. The vq stage's
    key carries it, so a budget that changes the first stage's choice trains it again, and one
    that does not finds it cached."""
    return (cfg.vq.preset == "auto" and cfg.data.image_size <= PLAIN_MAX_IMAGE_SIZE
            and 0 < cfg.ldm.epochs < SHORT_LDM_EPOCHS and not cfg.ldm.max_steps)


def vq_preset(image_size: int, samples: int, distinct_captions: int, short_epochs: float = 0.0) -> tuple[str, str]:
    """(the first stage's preset, why) for a training set: "plain" (one codebook, one width) for small
    images whose captions repeat, a few kinds of image shown many times (the demo: 60 captions over
    4,000 images learn to 30.6 dB with it, and "detailed" costs ~25% more of the stage's time), and
    when the ldm's budget is short (`short_epochs`: `ldm.epochs` where `short_ldm_budget` says it
    is, else 0: the detailed stage's extra minutes buy more as ldm steps); "detailed" (four
    codebooks, twice the width at the latents) for the rest: real images, each with a caption of
    its own, lose their detail in the plain one (22.2 against 25.3 dB on the quality benchmark's
    emoji)."""
    share = distinct_captions / max(1, samples)
    counts = f"{distinct_captions} distinct captions over {samples} samples ({share:.1%})"
    if share <= REPEATED_SHARE and image_size <= PLAIN_MAX_IMAGE_SIZE:
        return "plain", (f"{counts}: captions repeat (<= {REPEATED_SHARE:.0%}) at {image_size} px, a few kinds "
                         "of image")
    if short_epochs:
        return "plain", (f"{counts} at {image_size} px, but ldm.epochs={short_epochs:g} is a short budget "
                         f"(< {SHORT_LDM_EPOCHS:g}): the time goes to ldm steps")
    why = (f"at {image_size} px (> {PLAIN_MAX_IMAGE_SIZE})" if share <= REPEATED_SHARE
           else f"captions mostly their own (> {REPEATED_SHARE:.0%})")
    return "detailed", f"{counts}, {why}: detail to keep"


def with_vq_preset(cfg, samples: int, distinct_captions: int):
    """(cfg with `vq.preset` resolved and its values in the fields left at null, the reason)."""
    vq = cfg.vq
    if vq.preset == "auto":
        name, why = vq_preset(cfg.data.image_size, samples, distinct_captions,
                              cfg.ldm.epochs if short_ldm_budget(cfg) else 0.0)
        why = f"vq.preset=auto: {why}"
    else:
        name, why = vq.preset, f"vq.preset={vq.preset} is set"
    resolved = vq.with_preset(name)
    kept = [key for key in VQ_PRESET_KEYS if getattr(vq, key) is not None]
    if kept:
        why += f" ({', '.join(f'vq.{key}={getattr(vq, key)}' for key in kept)} as set)"
    values = ", ".join(f"{key}={getattr(resolved, key)}" for key in VQ_PRESET_KEYS)
    return dataclasses.replace(cfg, vq=resolved), f"{name} ({values}): {why}"


MEDIUM_MIN_SAMPLES = 10_000
"""On a GPU, the "medium" UNet (45M parameters) from this many training samples; the "tiny" one
(1M) below, and always on CPUs, where it is what trains in minutes (the demo: 330 img/s on 2 cores).
A heuristic, not measured here (no GPU): a million parameters are too few to learn tens of
thousands of images, and the medium UNet's step on a GPU costs about what tiny's does on a CPU."""


def unet_preset(use_gpu: bool, samples: int, latent_side: int) -> tuple[str, str]:
    """(the ldm's UNet preset, why) from where it trains and the training set's size."""
    from pipeline.models.unet import UNET_PRESETS

    if not use_gpu:
        return "tiny", "ldm.use_gpu=false: the CPU-sized UNet"
    if samples < MEDIUM_MIN_SAMPLES:
        return "tiny", f"{samples} training samples (< {MEDIUM_MIN_SAMPLES:,} for the medium UNet)"
    factor = UNET_PRESETS["medium"].downsample_factor
    if latent_side % factor or latent_side < 2 * factor:
        return "tiny", (f"{samples} training samples, but {latent_side}-wide latents do not halve "
                        f"{factor.bit_length() - 1} times down to >= 2 (the medium UNet)")
    return "medium", f"{samples} training samples (>= {MEDIUM_MIN_SAMPLES:,}) on a GPU"


def with_unet_preset(cfg, samples: int, latent_side: int):
    """(cfg with `ldm.preset` resolved, the reason); a preset set by hand is kept."""
    if cfg.ldm.preset != "auto":
        return cfg, f"{cfg.ldm.preset}: ldm.preset={cfg.ldm.preset} is set"
    name, why = unet_preset(cfg.ldm.use_gpu, samples, latent_side)
    return dataclasses.replace(cfg, ldm=dataclasses.replace(cfg.ldm, preset=name)), f"{name}: ldm.preset=auto: {why}"


def with_latents_recipe(cfg, latents_dir: Path):
    """cfg with what it leaves to the data resolved for an encoded set, where the workflow has not:
    the UNet (from the set's size and its smallest latent side) and the ldm budget."""
    import json

    from pipeline.data.buckets import latent_buckets

    if cfg.ldm.preset == "auto":
        buckets = latent_buckets(json.loads((Path(latents_dir) / "metadata.json").read_text()))
        side = min(min(bucket["latent_shape"][1:]) for bucket in buckets.values())
        cfg = with_unet_preset(cfg, latent_set_counts(latents_dir)[0], side)[0]
    return with_ldm_budget(cfg, latents_dir)[0] if not cfg.ldm.max_steps else cfg


def latent_set_counts(latents_dir: Path) -> tuple[int, int]:
    """(samples, distinct captions) of an encode stage's output, from its Parquet files' caption column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(str(path) for path in (Path(latents_dir) / "data").rglob("*.parquet"))
    captions = pq.read_table(files, columns=["caption"]).column("caption")
    return len(captions), int(pc.count_distinct(captions).as_py())


def steps_per_epoch(ldm, latents_dir: Path) -> int:
    """Global batches an epoch of the encoded set, as the ldm stage batches it: the micro batch shrunk
    to fit the largest bucket, one bucket per batch."""
    import json

    from pipeline.data.buckets import latent_buckets, trained_sizes

    buckets = latent_buckets(json.loads((Path(latents_dir) / "metadata.json").read_text()))
    micro = micro_batch(ldm, buckets)
    batches = trained_sizes(buckets, micro * ldm.num_workers * ldm.grad_accum)["bucket_batches_per_epoch"]
    return sum(batches.values())


def micro_batch(ldm, buckets: dict) -> int:
    """The micro batch per worker the ldm stage trains with: `ldm.batch_size`, shrunk (and said so)
    to what the largest bucket gives each worker, since a global batch comes from one bucket."""
    from pipeline.training.first_stage import fit_batch_size

    largest = max(bucket["samples"] for bucket in buckets.values())
    return fit_batch_size(largest // ldm.grad_accum, ldm.batch_size, ldm.num_workers, "ldm")


def global_batch(ldm) -> int:
    """Samples per optimizer step as configured: batch_size x num_workers x grad_accum."""
    return ldm.batch_size * ldm.num_workers * ldm.grad_accum


def with_ldm_budget(cfg, latents_dir: Path):
    """(cfg with `ldm.max_steps` resolved for the encoded set in `latents_dir`, the Budget)."""
    samples, distinct = latent_set_counts(latents_dir)
    budget = ldm_budget(cfg.ldm.max_steps, cfg.ldm.epochs, samples, distinct, steps_per_epoch(cfg.ldm, latents_dir))
    return dataclasses.replace(cfg, ldm=dataclasses.replace(cfg.ldm, max_steps=budget.max_steps)), budget
