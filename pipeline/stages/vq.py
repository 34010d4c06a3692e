"""The vq stage: train the VQ-VAE first stage with Ray Train on images read by Ray Data.

Output directory: the VQ model (model.json + model.safetensors) with `latent_scale`, the factor
that scales the pre-quantization latents to unit variance (measured on training data, as in LDM),
and `recon.png`, a held-out reconstruction grid. Metrics: held-out `psnr` and `codebook_usage`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch.nn import functional as F

from pipeline.config import PipelineConfig, check_image_size
from pipeline.data.images import images_to_tensor
from pipeline.data.reader import read_captioned_images
from pipeline.models.vq import VQModel, VQModelConfig
from pipeline.ray_runtime import run_task, task_resources
from pipeline.recipe import with_vq_preset
from pipeline.training.first_stage import FirstStageFit, fit_small_model
from pipeline.training.vqgan import VQGANObjective, VQLoss

# Enough held-out and training images for stable metrics and latent statistics, bounded in memory.
MAX_EVAL_IMAGES = 1000


def model_config(cfg: PipelineConfig) -> VQModelConfig:
    """The VQ model of the config; with `vq.preset=auto` and no data seen, the "detailed" one (the
    vq stage chooses from its training set, `with_vq_preset`)."""
    return VQModelConfig.of(cfg.vq.with_preset())


def caption_counts(train_ds) -> tuple[int, int]:
    """(samples, distinct captions) of a training set."""
    captions = train_ds.select_columns(["caption"]).to_pandas()["caption"]
    return len(captions), int(captions.nunique())


def training_counts(cfg: PipelineConfig, shards: list[str]) -> tuple[int, int]:
    """(samples, distinct captions) of the shards' training split, read for them alone."""
    return caption_counts(read_captioned_images(shards, split="train", image_size=cfg.data.image_size,
                                                heldout_fraction=cfg.data.heldout_fraction,
                                                max_image_pixels=cfg.data.max_image_pixels))


def fit_config(cfg: PipelineConfig) -> dict:
    """What every vq worker builds from: the model's config and the objective's (`vq.loss`)."""
    return {"model": asdict(model_config(cfg)),
            "loss": {f.name: getattr(cfg.vq, f.name) for f in fields(VQLoss)}, "lr": cfg.vq.lr}


class VQFit(FirstStageFit):
    """Reconstruction (pixel MSE) + commitment loss on the shard's images; with `vq.loss=vqgan`
    also the patch discriminator's terms (`pipeline.training.vqgan`), its step after each of ours."""

    name = "vq"

    def __init__(self, model_config: dict, rank: int, world_size: int, device: torch.device):
        import ray.train.torch

        self.core = VQModel(VQModelConfig(**model_config["model"]))
        self.model = ray.train.torch.prepare_model(self.core)
        self.device = device
        objective = VQLoss(**model_config["loss"])
        self.gan = (VQGANObjective(objective, device, model_config["lr"], ray.train.torch.prepare_model)
                    if objective.loss == "vqgan" else None)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        images = images_to_tensor(batch["image"]).to(self.device)
        recon, _, commit_loss = self.model(images)
        recon_loss = F.mse_loss(recon, images)
        metrics = {"recon_loss": recon_loss.item()}
        if self.gan is None:
            return recon_loss + commit_loss, metrics, len(images)
        loss, more = self.gan.generator_loss(images, recon, recon_loss, self.core.decoder[-1].weight)
        return loss + commit_loss, {**metrics, **more}, len(images)

    def after_step(self) -> dict[str, float] | None:
        return self.gan.discriminator_step() if self.gan is not None else None

    def save(self, directory: str) -> None:
        self.core.save(directory)


def image_batches(ds, chunk: int, device: torch.device):
    """A materialised dataset's images as (B, 3, H, W) tensors in [-1, 1], `chunk` at a time."""
    for batch in ds.iter_batches(batch_size=chunk, batch_format="numpy"):
        yield images_to_tensor(batch["image"]).to(device)


@torch.no_grad()
def evaluate(model: VQModel, batches) -> dict:
    """Held-out PSNR (dB) and the fraction of codebook entries used (the mean over the codebooks of
    a residual stack), chunk by chunk."""
    squared, count, used = 0.0, 0, {}
    for images in batches:
        recon, indices, _ = model(images)
        squared += F.mse_loss(recon.clamp(-1, 1), images, reduction="sum").item()
        count += images.numel()
        if indices is not None:  # a continuous (KL) first stage has no codes
            codes = indices.reshape(-1, indices.shape[-1] if indices.dim() == 4 else 1)  # (positions, codebooks)
            for book, column in enumerate(codes.T.tolist()):
                used.setdefault(book, set()).update(column)
    if count == 0:
        raise ValueError("no usable held-out images found in data.shards")
    mse = squared / count
    metrics = {"psnr": float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)}
    if model.cfg.codebook_size:
        metrics["codebook_usage"] = sum(len(codes) for codes in used.values()) / (len(used) * model.cfg.codebook_size)
    return metrics


@torch.no_grad()
def measure_latent_scale(model: VQModel, batches) -> float:
    """1 / std of the pre-quantization latents, so the LDM diffuses unit-variance latents."""
    total, squares, count = 0.0, 0.0, 0
    for images in batches:
        latents = model.encode(images).double()
        total += latents.sum().item()
        squares += latents.pow(2).sum().item()
        count += latents.numel()
    if count < 2:
        raise ValueError("no usable images found in data.shards")
    variance = (squares - total * total / count) / (count - 1)
    return float(1.0 / max(math.sqrt(max(variance, 0.0)), 1e-6))


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Images in [-1, 1] (B, 3, H, W) -> a PNG grid."""
    from torchvision.utils import save_image

    save_image((images.clamp(-1, 1) + 1) / 2, str(path), nrow=nrow, padding=1)


def finish_vq(model_dir: str, out_dir: str, train_ds, heldout_ds, chunk: int) -> dict:
    """A Ray task (`run_task`): measure the latent scale on training images, save the model with it
    into `out_dir`, and evaluate it on the held-out images (metrics and `recon.png`), `chunk` images
    at a time, on this task's GPU if it has one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = VQModel.load(model_dir)[0].to(device)
    latent_scale = measure_latent_scale(model, image_batches(train_ds, chunk, device))
    model.save(out_dir, latent_scale=latent_scale)
    metrics = evaluate(model, image_batches(heldout_ds, chunk, device))
    first = next(image_batches(heldout_ds.limit(16), 16, device))
    with torch.no_grad():
        recon = model(first)[0]
    save_grid(torch.cat([first, recon]).cpu(), Path(out_dir) / "recon.png", nrow=len(first))
    return {**metrics, "latent_scale": latent_scale}


def pretrained_dir(cfg: PipelineConfig) -> Path:
    """The directory of `vq.pretrained` (downloaded if a model URI), its downsampling checked from
    model.json before any shard is read (no weights loaded here, in the driver)."""
    import json

    from pipeline.components import COMPONENT_FILES
    from pipeline.model_package import resolve_model_uri

    from pipeline.models.diffusers_first_stage import diffusers_dir, shape_of
    from pipeline.models.vq import downsample_of

    if (directory := diffusers_dir(cfg.vq.pretrained)) is not None:  # a diffusers VQModel / AutoencoderKL
        downsample = shape_of(json.loads((directory / "config.json").read_text())).downsample
    else:
        directory = resolve_model_uri(cfg.vq.pretrained, cfg.tracking_uri, COMPONENT_FILES)
        downsample = downsample_of(json.loads((directory / "model.json").read_text()))
    check_image_size(cfg.data.image_size, downsample, cfg.ldm.preset,
                     vq_key=f"the downsampling of vq.pretrained={cfg.vq.pretrained}")
    return directory


def run_vq(cfg: PipelineConfig, shards: list[str], out_dir: Path, run_id: str | None) -> dict:
    """Train (or load) the VQ model into `out_dir`; returns the held-out metrics.

    The driver only wires the work: training runs on Ray Train, the latent scale and the held-out
    metrics in a Ray task with the stage's resources (`finish_vq`)."""
    source = pretrained_dir(cfg) if cfg.vq.pretrained else out_dir
    read = dict(image_size=cfg.data.image_size, heldout_fraction=cfg.data.heldout_fraction,
                max_image_pixels=cfg.data.max_image_pixels)
    train_ds = read_captioned_images(shards, split="train", **read)
    heldout = read_captioned_images(shards, split="heldout", **read).limit(MAX_EVAL_IMAGES).materialize()
    counts = {}
    if not cfg.vq.pretrained:
        # Materialised here (not only inside the fit) so the latent scale below reads no shard again.
        train_ds = train_ds.limit(cfg.vq.max_train_images).materialize()
        samples, distinct = caption_counts(train_ds)
        cfg, why = with_vq_preset(cfg, samples, distinct)
        print(f"[recipe] vq: {why}", flush=True)
        if run_id:
            import mlflow

            mlflow.MlflowClient(cfg.tracking_uri).set_tag(run_id, "recipe.vq", why)
        counts = {"train_samples": samples, "distinct_captions": distinct, "num_quantizers": cfg.vq.num_quantizers}
        fit_small_model(VQFit, fit_config(cfg), cfg.vq, seed=cfg.seed, tracking_uri=cfg.tracking_uri,
                        run_id=run_id, train_ds=train_ds, out_dir=out_dir, workdir=cfg.workdir)
    metrics = run_task(finish_vq, str(source), str(out_dir), train_ds.limit(MAX_EVAL_IMAGES).materialize(), heldout,
                       cfg.vq.eval_batch_size, **task_resources(cfg.vq))
    return {**metrics, **counts}
