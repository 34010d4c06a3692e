"""The clip stage: train a small open_clip model contrastively (ClipLoss) with Ray Train, or load one.

Output directory: the text encoder (model.json + model.safetensors, the whole CLIP so the image tower
stays available for CLIP scores). Metric: `retrieval_top1` on held-out samples: for each of up to
100 held-out captions, is the top-1 of up to 100 held-out images one with the same caption.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss
from torch.nn import functional as F

from pipeline.config import PipelineConfig
from pipeline.data.images import images_to_tensor
from pipeline.data.reader import read_captioned_images
from pipeline.model_package import is_model_uri
from pipeline.models.text import (AUTO_CONTEXT_MIN, TextEncoder, TinyClipConfig, auto_context_length, build_text_encoder,
                                  clip_image_preprocess, resize_for_clip, token_counts, truncation)
from pipeline.ray_runtime import run_task, task_resources
from pipeline.training.first_stage import FirstStageFit, fit_small_model

RETRIEVAL_SAMPLES = 100


def encoder_spec(cfg: PipelineConfig, context_length: int = 0) -> dict:
    """How to build the configured text encoder. The tiny model's context is `context_length`, else
    `clip.context_length`, else (0, sized from captions, but none given) AUTO_CONTEXT_MIN."""
    if cfg.clip.model == "tiny":
        tiny = TinyClipConfig(
            image_size=cfg.data.image_size,
            # A 4x4 grid of patches: enough to tell left/right/top/bottom, 4x cheaper than 8x8.
            patch_size=max(1, cfg.data.image_size // 4),
            context_length=context_length or cfg.clip.context_length or AUTO_CONTEXT_MIN,
            width=cfg.clip.width,
            layers=cfg.clip.layers,
            embed_dim=cfg.clip.width,
        )
        return {"kind": "tiny", "config": asdict(tiny)}
    return {"kind": "open_clip", "model": cfg.clip.model}


def image_features(encoder: TextEncoder, images: torch.Tensor) -> torch.Tensor:
    size = encoder.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return encoder.clip.encode_image(clip_image_preprocess(resize_for_clip(images, size)), normalize=True)


class ClipFit(FirstStageFit):
    """Symmetric contrastive loss (open_clip's ClipLoss, gathered over the workers) on image-caption pairs."""

    name = "clip"
    weight_decay = 0.1  # CLIP's (Radford et al. 2021)

    def __init__(self, model_config: dict, rank: int, world_size: int, device: torch.device):
        import ray.train.torch

        self.encoder = build_text_encoder(model_config)
        self.model = ray.train.torch.prepare_model(self.encoder.clip)
        self.loss_fn = ClipLoss(rank=rank, world_size=world_size, gather_with_grad=True)
        self.device = device
        self.image_size = self.encoder.clip.visual.image_size[0]

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        images = images_to_tensor(batch["image"]).to(self.device)
        images = clip_image_preprocess(resize_for_clip(images, self.image_size))
        text = self.encoder.tokenize(list(batch["caption"])).to(self.device)
        image_feats, text_feats, logit_scale = self.model(images, text)[:3]
        return self.loss_fn(image_feats, text_feats, logit_scale), {}, len(images)

    @torch.no_grad()
    def after_step(self) -> None:  # CLIP clamps the learned temperature at 100
        self.encoder.clip.logit_scale.clamp_(0, math.log(100))

    def save(self, directory: str) -> None:
        self.encoder.save(directory)


@torch.no_grad()
def retrieval_top1(encoder: TextEncoder, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Caption -> image retrieval among the same samples; a hit is any image with that caption.

    When every caption is a demo caption, `retrieval_top1_content` also counts a hit for any image
    of the same shape, colour and position, whatever its wording. The demo data gives each content
    one wording, so the two agree there; on captions that word one content several ways, exact
    retrieval cannot tell the wordings apart from the image and the content figure is the one to read.
    """
    from pipeline.data.demo import caption_to_spec

    encoder.eval()
    img = image_features(encoder, images)
    txt = F.normalize(encoder.encode(captions).pooled, dim=-1)
    best = [int(j) for j in (txt @ img.T).argmax(dim=1)]
    metrics = {"retrieval_top1": sum(captions[j] == captions[i] for i, j in enumerate(best)) / len(best)}
    specs = [caption_to_spec(caption) for caption in captions]
    if all(specs):
        metrics["retrieval_top1_content"] = sum(specs[j] == specs[i] for i, j in enumerate(best)) / len(best)
    return metrics


def save_encoder(cfg: PipelineConfig, out_dir: str) -> None:
    """A Ray task (`run_task`): load the configured pretrained encoder (ours by directory or URI,
    or an open_clip model) and save it into `out_dir`; big encoders never load in the driver."""
    pretrained = cfg.clip.pretrained
    if pretrained and (is_model_uri(pretrained) or (Path(pretrained) / "model.json").is_file()):
        from pipeline.components import load_text_encoder  # a saved or registered encoder of ours

        load_text_encoder(pretrained, cfg.tracking_uri).save(out_dir)
    else:
        build_text_encoder(encoder_spec(cfg), pretrained=pretrained or None).save(out_dir)


def heldout_retrieval(encoder_dir: str, heldout_ds) -> dict:
    """A Ray task (`run_task`): `retrieval_top1` of the saved encoder on up to RETRIEVAL_SAMPLES
    held-out samples (on this task's GPU if it has one)."""
    rows = heldout_ds.take_batch(RETRIEVAL_SAMPLES, batch_format="numpy")
    if len(rows["key"]) == 0:
        return {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = TextEncoder.load(encoder_dir).to(device)
    return retrieval_top1(encoder, images_to_tensor(rows["image"]).to(device), list(rows["caption"]))


def run_clip(cfg: PipelineConfig, shards: list[str], out_dir: Path, run_id: str | None) -> dict:
    """Train (or load) the CLIP text encoder into `out_dir`; returns held-out retrieval metrics.

    The driver only wires the work: training runs on Ray Train, loading a pretrained encoder and
    the retrieval figure in Ray tasks with the stage's resources."""
    read = dict(image_size=cfg.data.image_size, heldout_fraction=cfg.data.heldout_fraction,
                max_image_pixels=cfg.data.max_image_pixels)
    metrics: dict = {}
    if cfg.clip.pretrained or cfg.clip.model != "tiny":
        run_task(save_encoder, cfg, str(out_dir), **task_resources(cfg.clip))
    else:
        # Materialised here (not only inside the fit) so the caption lengths read no shard again.
        train_ds = read_captioned_images(shards, split="train", **read).limit(cfg.clip.max_train_images).materialize()
        captions = [row["caption"] for row in train_ds.select_columns(["caption"]).take_all()]
        counts = token_counts(open_clip.tokenizer.SimpleTokenizer(), captions, 0)
        context = cfg.clip.context_length or auto_context_length(counts)
        metrics = {"context_length": context, **truncation(counts, context)}
        fit_small_model(ClipFit, encoder_spec(cfg, context), cfg.clip, seed=cfg.seed, tracking_uri=cfg.tracking_uri,
                        run_id=run_id, train_ds=train_ds, out_dir=out_dir, workdir=cfg.workdir)
    heldout = read_captioned_images(shards, split="heldout", **read).limit(RETRIEVAL_SAMPLES).materialize()
    return {**metrics, **run_task(heldout_retrieval, str(out_dir), heldout, **task_resources(cfg.clip))}
