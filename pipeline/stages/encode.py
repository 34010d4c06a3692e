"""The encode stage: Ray Data runs the frozen encoders once over the shards -> a Parquet latent dataset.

Shards are read and decoded in CPU tasks; the VQ encoder and the CLIP text encoder run in an actor
pool (`map_batches` with a callable class; GPU actors on a cluster). Output directory:
`data/*.parquet` (key, caption, latent, tokens, mask, pooled, fp16 tensors; caption_tokens, the
caption's token count before truncation), `null_condition.safetensors`
(the encoding of the empty caption) and `metadata.json` (encoder directories and hashes, image size,
latent shape, `latent_scale`, counts). The latent scale travels with the latent data.

Bad samples are skipped and counted by reason (pipeline/data/reader.py, SKIP_REASONS): each read
task writes its shard's counts to `counts/<shard hash>.json` once the shard is read, so a retried
read rewrites its file instead of counting twice. The stage reports `samples` (rows written),
`unconditional` (rows with an empty caption), `skipped` ({reason: count}, every reason
present) and `captions_truncated` (the fraction of captions longer than the text context, kept with
their tails cut), and checks that the rows written match the rows the readers counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from pipeline.conditioning import Conditioning
from pipeline.config import PipelineConfig
from pipeline.data.images import images_to_tensor
from pipeline.data.reader import counts_summary, read_captioned_images, read_shard_counts, sum_counts
from pipeline.models.text import TextEncoder, truncation
from pipeline.models.vq import VQModel
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
        images = images_to_tensor(batch["image"]).to(self.device, self.dtype)
        latents = self.vq.encode(images)
        cond = self.text.encode(list(batch["caption"]))
        return {
            "key": batch["key"],
            "caption": batch["caption"],
            "latent": latents.to(torch.float16).cpu().numpy(),
            "tokens": cond.tokens.to(torch.float16).cpu().numpy(),
            "mask": cond.mask.cpu().numpy(),
            "pooled": cond.pooled.to(torch.float16).cpu().numpy(),
            # Before truncation: more than the context means the caption lost its tail.
            "caption_tokens": np.asarray(self.text.token_counts(list(batch["caption"])), dtype=np.int32),
        }


def run_encode(cfg: PipelineConfig, shards: list[str], vq_dir: Path, clip_dir: Path, out_dir: Path) -> dict:
    """Encode every good sample of the shards into `out_dir`; returns counts."""
    vq_meta = json.loads((vq_dir / "model.json").read_text())
    shards = list(dict.fromkeys(shards))  # a shard listed twice is read (and counted) once
    counts_dir = out_dir / "counts"  # one JSON per shard, written by its read task
    ds = read_captioned_images(shards, cfg.data.image_size, max_image_pixels=cfg.data.max_image_pixels,
                               counts_dir=str(counts_dir))
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
    counts_col = pq.read_table([str(path) for path in files], columns=["caption_tokens"]).column("caption_tokens")
    truncated = truncation(counts_col.to_pylist(), int(tokens_shape[0]), "encode")
    data_bytes = sum(path.stat().st_size for path in files)
    metadata = {
        "vq_dir": str(vq_dir),
        "clip_dir": str(clip_dir),
        "image_size": cfg.data.image_size,
        "latent_shape": list(schema.field("latent").type.shape),
        "context_length": int(tokens_shape[0]),
        "token_dim": int(tokens_shape[1]),
        "pooled_dim": int(schema.field("pooled").type.shape[0]),
        "latent_scale": vq_meta["latent_scale"],
        "samples": samples,
        "unconditional": counts["unconditional"],
        "skipped": counts["skipped"],
        "shards": len(shards),
        "bytes_per_sample": data_bytes / samples,
        **truncated,
    }
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return {"samples": samples, "unconditional": counts["unconditional"], "skipped": counts["skipped"],
            "bytes_per_sample": round(data_bytes / samples, 1), **truncated}


def save_null_condition(clip_dir: str, path: str) -> None:
    """A Ray task (`run_task`): the encoding of the empty caption, the null condition of guidance."""
    null = TextEncoder.load(clip_dir).null()
    save_file({"tokens": null.tokens.contiguous(), "mask": null.mask.contiguous(), "pooled": null.pooled.contiguous()},
              path)


def load_null_condition(latents_dir: Path) -> Conditioning:
    tensors = load_file(str(Path(latents_dir) / "null_condition.safetensors"))
    return Conditioning(tensors["tokens"], tensors["mask"], tensors["pooled"])
