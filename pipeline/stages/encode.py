"""The encode stage: Ray Data runs the frozen encoders once over the shards -> a Parquet latent dataset.

Shards are read and decoded in CPU tasks; the VQ encoder and the CLIP text encoder run in an actor
pool (`map_batches` with a callable class; GPU actors on a cluster). Output directory:
`data/*.parquet` (key, caption, latent, tokens, mask, pooled, fp16 tensors; caption_tokens, the
caption's token count before truncation; bucket, the image's size 'WxH'; crop, the fraction of the
image cut off), `null_condition.safetensors` (the encoding of the empty caption) and `metadata.json`
(encoder directories and hashes, image size, the square latent shape, `latent_scale`, counts, and
`buckets`: {'WxH': {samples, latent_shape}} for every bucket an image went to). The latent scale
travels with the latent data.

Aspect-ratio buckets (`data.buckets`, `pipeline.data.buckets`): each image is fitted to the bucket
nearest its aspect, so the latent column holds latents of several shapes (a variable-shaped tensor
column when a file has more than one); the encoders run once per shape in each batch.

Bad samples are skipped and counted by reason (pipeline/data/reader.py, SKIP_REASONS): each read
task writes its shard's counts to `counts/<shard hash>.json` once the shard is read, so a retried
read rewrites its file instead of counting twice. The stage reports `samples` (rows written: the
training split; the held-out split, `data.heldout_fraction`, is left for the evaluate stage and
counted as `heldout_samples`), `unconditional` (rows with an empty caption), `skipped` ({reason:
count}, every reason present) and `captions_truncated` (the fraction of captions longer than the
text context, kept with their tails cut), and checks that the rows written match the rows the
readers counted.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from pipeline.conditioning import Conditioning
from pipeline.config import PipelineConfig
from pipeline.config.training import unet_downsample_factor
from pipeline.data.buckets import parse_size, size_name, training_buckets
from pipeline.data.images import images_to_tensor, ragged
from pipeline.data.reader import counts_summary, read_captioned_images, read_shard_counts, sum_counts
from pipeline.models.text import TextEncoder, truncation
from pipeline.models.vq import VQModel, downsample_of
from pipeline.ray_runtime import run_task


class FrozenEncoders:
    """Ray Data actor: a batch of {key, caption, image} -> latents and text conditioning."""

    def __init__(self, vq_dir: str, clip_dir: str, fp16: bool = False):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vq, _ = VQModel.load(vq_dir)
        self.text = TextEncoder.load(clip_dir)
        # fp16 halves memory and time on GPUs; CPU kernels are faster (and exact) in fp32.
        self.dtype = torch.float16 if fp16 and self.device.type == "cuda" else torch.float32
        self.vq.to(self.device, self.dtype)
        self.text.to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        images = list(batch["image"])  # (n, h, w, 3), or a ragged column of images in several buckets
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        latents: list = [None] * len(images)
        for rows in by_shape.values():
            pixels = images_to_tensor(np.stack([images[i] for i in rows])).to(self.device, self.dtype)
            for i, latent in zip(rows, self.vq.encode(pixels).to(torch.float16).cpu().numpy()):
                latents[i] = latent
        cond = self.text.encode(list(batch["caption"]))
        return {
            "key": batch["key"],
            "caption": batch["caption"],
            "latent": ragged(latents),
            "bucket": np.array([f"{image.shape[1]}x{image.shape[0]}" for image in images], dtype=object),
            "crop": np.asarray(batch["crop"], dtype=np.float32),
            "tokens": cond.tokens.to(torch.float16).cpu().numpy(),
            "mask": cond.mask.cpu().numpy(),
            "pooled": cond.pooled.to(torch.float16).cpu().numpy(),
            # Before truncation: more than the context means the caption lost its tail.
            "caption_tokens": np.asarray(self.text.token_counts(list(batch["caption"])), dtype=np.int32),
        }


def run_encode(cfg: PipelineConfig, shards: list[str], vq_dir: Path, clip_dir: Path, out_dir: Path) -> dict:
    """Encode every good sample of the shards' training split into `out_dir`; returns counts."""
    vq_meta = json.loads((vq_dir / "model.json").read_text())
    downsample = downsample_of(vq_meta)
    sizes = training_buckets(cfg.data, downsample * unet_downsample_factor(cfg.ldm.preset))
    shards = list(dict.fromkeys(shards))  # a shard listed twice is read (and counted) once
    counts_dir = out_dir / "counts"  # one JSON per shard, written by its read task
    # The training split only: the held-out images are what the evaluate stage compares samples with.
    ds = read_captioned_images(shards, sizes, "train", cfg.data.heldout_fraction,
                               max_image_pixels=cfg.data.max_image_pixels, counts_dir=str(counts_dir))
    encoded = ds.map_batches(
        FrozenEncoders,
        fn_constructor_kwargs={"vq_dir": str(vq_dir), "clip_dir": str(clip_dir),
                               "fp16": cfg.encode.num_gpus_per_actor > 0},
        batch_size=cfg.encode.batch_size,
        batch_format="numpy",
        concurrency=cfg.encode.concurrency,
        num_gpus=cfg.encode.num_gpus_per_actor or None,
    )
    encoded.write_parquet(str(out_dir / "data"))
    per_shard = read_shard_counts(str(counts_dir))  # keyed by the path as Ray Data names it
    if len(per_shard) != len(shards):
        raise RuntimeError(f"counts arrived from {len(per_shard)} of {len(shards)} shards")
    counts = counts_summary(sum_counts(per_shard.values()))
    files = sorted((out_dir / "data").rglob("*.parquet"))
    # Row counts from the Parquet footers: no second pass over the data.
    samples = sum(pq.read_metadata(str(path)).num_rows for path in files)
    if samples != counts["samples"]:
        raise RuntimeError(f"wrote {samples} rows but the readers counted {counts['samples']} good samples")
    if samples == 0:
        raise ValueError(f"no usable samples in data.shards ({len(shards)} shards); skipped: {counts['skipped']}")
    run_task(save_null_condition, str(clip_dir), str(out_dir / "null_condition.safetensors"),
             num_cpus=1.0, num_gpus=cfg.encode.num_gpus_per_actor and 1.0)
    schema = pq.read_schema(str(files[0]))  # Ray's tensor columns carry their shapes
    tokens_shape = schema.field("tokens").type.shape
    small = pq.read_table([str(path) for path in files], columns=["caption_tokens", "bucket", "crop"])
    truncated = truncation(small.column("caption_tokens").to_pylist(), int(tokens_shape[0]), "encode")
    channels = int(vq_meta["config"]["latent_channels"])  # ours and diffusers' configs both say
    per_bucket = Counter(small.column("bucket").to_pylist())
    buckets = {name: {"samples": per_bucket[name],
                      "latent_shape": [channels, parse_size(name)[1] // downsample, parse_size(name)[0] // downsample]}
               for name in sorted(per_bucket, key=lambda n: parse_size(n)[0] / parse_size(n)[1])}
    crops = np.asarray(small.column("crop").to_numpy(), dtype=np.float64)
    side = cfg.data.image_size // downsample
    data_bytes = sum(path.stat().st_size for path in files)
    metadata = {
        "vq_dir": str(vq_dir),
        "clip_dir": str(clip_dir),
        "image_size": cfg.data.image_size,
        "latent_shape": [channels, side, side],
        "buckets": buckets,
        "bucket_table": [size_name(size) for size in sizes],
        "crop_mean": float(crops.mean()),
        "crop_max": float(crops.max()),
        "context_length": int(tokens_shape[0]),
        "token_dim": int(tokens_shape[1]),
        "pooled_dim": int(schema.field("pooled").type.shape[0]),
        "latent_scale": vq_meta["latent_scale"],
        "samples": samples,
        "heldout_samples": counts["other_split"],
        "unconditional": counts["unconditional"],
        "skipped": counts["skipped"],
        "shards": len(shards),
        "bytes_per_sample": data_bytes / samples,
        **truncated,
    }
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return {"samples": samples, "heldout_samples": counts["other_split"], "unconditional": counts["unconditional"],
            "skipped": counts["skipped"],
            "bytes_per_sample": round(data_bytes / samples, 1), **truncated,
            "buckets": {name: bucket["samples"] for name, bucket in buckets.items()},
            "crop_mean": round(float(crops.mean()), 4), "crop_max": round(float(crops.max()), 4)}




def save_null_condition(clip_dir: str, path: str) -> None:
    """A Ray task (`run_task`): the encoding of the empty caption, the null condition of guidance."""
    null = TextEncoder.load(clip_dir).null()
    save_file({"tokens": null.tokens.contiguous(), "mask": null.mask.contiguous(), "pooled": null.pooled.contiguous()},
              path)


def load_null_condition(latents_dir: Path) -> Conditioning:
    tensors = load_file(str(Path(latents_dir) / "null_condition.safetensors"))
    return Conditioning(tensors["tokens"], tensors["mask"], tensors["pooled"])
