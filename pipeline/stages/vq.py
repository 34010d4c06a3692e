"""The vq stage: train the VQ-VAE first stage with Ray Train on images read by Ray Data.

Output directory: the VQ model (model.json + model.safetensors) with `latent_scale`, the factor
that scales the pre-quantization latents to unit variance (measured on training data, as in LDM),
and `recon.png`, a held-out reconstruction grid. Metrics: held-out `psnr` and `codebook_usage`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn import functional as F

from pipeline.config import PipelineConfig, check_image_size
from pipeline.data.reader import images_to_tensor, read_captioned_images
from pipeline.models.vq import VQModel, VQModelConfig, psnr
from pipeline.ray_runtime import ProgressLine, batches_until, fit_small_model, report_final_model, warmup_cosine
from pipeline.tracking import MetricLogger

# Enough held-out and training images for stable metrics and latent statistics, bounded in memory.
MAX_EVAL_IMAGES = 1000


def model_config(cfg: PipelineConfig) -> VQModelConfig:
    v = cfg.vq
    return VQModelConfig(
        hidden_channels=v.hidden_channels,
        latent_channels=v.latent_channels,
        downsample=v.downsample,
        codebook_size=v.codebook_size,
        commitment_weight=v.commitment_weight,
    )


def vq_train_loop(config: dict) -> None:
    """Ray Train worker loop: reconstruction + commitment loss on the 'train' dataset shard."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"] + rank)
    model = VQModel(VQModelConfig(**config["model"]))
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    scheduler = warmup_cosine(optimizer, config["warmup_steps"], config["max_steps"])
    shard = ray.train.get_dataset_shard("train")
    logger = MetricLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config["run_id"] else None
    progress = ProgressLine("vq", config["max_steps"])
    step = 0
    for step, batch in batches_until(shard, config["batch_size"], config["max_steps"]):
        images = images_to_tensor(batch["image"]).to(ray.train.torch.get_device())
        recon, _, commit_loss = model(images)
        recon_loss = F.mse_loss(recon, images)
        loss = recon_loss + commit_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if rank == 0:
            shown = progress.update(step, len(images), loss=loss.item(), recon=recon_loss.item())
            if logger:
                logger.log({"loss": loss.item(), "recon_loss": recon_loss.item(), "lr": scheduler.get_last_lr()[0], **shown},
                           step)
    if logger:
        logger.close()
    report_final_model(core.save, step)


def take_images(ds, limit: int) -> torch.Tensor:
    rows = ds.limit(limit).take_batch(limit, batch_format="numpy")
    if len(rows["image"]) == 0:
        raise ValueError("no usable images found in data.shards")
    return images_to_tensor(rows["image"])


@torch.no_grad()
def evaluate(model: VQModel, images: torch.Tensor, batch: int = 256) -> dict:
    """Held-out PSNR (dB) and the fraction of codebook entries used."""
    recons, codes = [], []
    for chunk in images.split(batch):
        recon, indices, _ = model(chunk)
        recons.append(recon)
        codes.append(indices.flatten())
    used = torch.unique(torch.cat(codes)).numel()
    return {"psnr": psnr(images, torch.cat(recons)), "codebook_usage": used / model.cfg.codebook_size}


@torch.no_grad()
def measure_latent_scale(model: VQModel, images: torch.Tensor) -> float:
    """1 / std of the pre-quantization latents, so the LDM diffuses unit-variance latents."""
    latents = torch.cat([model.encode(chunk) for chunk in images.split(256)])
    return float(1.0 / latents.std().clamp_min(1e-6))


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Images in [-1, 1] (B, 3, H, W) -> a PNG grid."""
    from torchvision.utils import save_image

    save_image((images.clamp(-1, 1) + 1) / 2, str(path), nrow=nrow, padding=1)


def run_vq(cfg: PipelineConfig, shards: list[str], out_dir: Path, run_id: str | None) -> dict:
    """Train (or load) the VQ model into `out_dir`; returns the held-out metrics."""
    if cfg.vq.pretrained:  # a VQ model directory or a registered model's URI (pipeline.components)
        from pipeline.components import load_vq

        model, _ = load_vq(cfg.vq.pretrained, cfg.tracking_uri)  # checked before any shard is read
        check_image_size(cfg.data.image_size, model.cfg.downsample, cfg.ldm.preset,
                         vq_key=f"the downsampling of vq.pretrained={cfg.vq.pretrained}")
    train_ds = read_captioned_images(shards, cfg.data.image_size, "train", cfg.data.heldout_fraction,
                                     max_image_pixels=cfg.data.max_image_pixels)
    heldout = take_images(
        read_captioned_images(shards, cfg.data.image_size, "heldout", cfg.data.heldout_fraction,
                          max_image_pixels=cfg.data.max_image_pixels), MAX_EVAL_IMAGES
    )
    if not cfg.vq.pretrained:
        # Materialised here (not only inside the fit) so the latent scale below reads no shard again.
        train_ds = train_ds.limit(cfg.vq.max_train_images).materialize()
        fit_small_model(vq_train_loop, {"model": asdict(model_config(cfg))}, cfg.vq, seed=cfg.seed,
                        tracking_uri=cfg.tracking_uri, run_id=run_id, train_ds=train_ds, out_dir=out_dir,
                        workdir=cfg.workdir, name="vq")
        model, _ = VQModel.load(out_dir)
    latent_scale = measure_latent_scale(model, take_images(train_ds, MAX_EVAL_IMAGES))
    model.save(out_dir, latent_scale=latent_scale)
    metrics = evaluate(model, heldout)
    metrics["latent_scale"] = latent_scale
    n = min(16, len(heldout))
    with torch.no_grad():
        recon = model(heldout[:n])[0]
    save_grid(torch.cat([heldout[:n], recon]), out_dir / "recon.png", nrow=n)
    return metrics
