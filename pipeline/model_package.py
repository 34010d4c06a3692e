"""The served artefact: one directory (and one MLflow model) holding everything needed to sample.

Layout (no pickles: JSON + safetensors only):

    model.json            format, schedule, latent scale and shape, sampling defaults
    unet.json, unet.safetensors   the EMA UNet
    vq/                   the VQ model (its decoder turns latents into images)
    text_encoder/         the CLIP text encoder (prompts -> conditioning)

`PipelineModel` loads such a directory, or an MLflow model URI whose artefacts contain one, and
generates images: prompts -> CLIP -> guided sampler on the UNet -> VQ decode -> uint8 images.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.conditioning import Conditioning
from pipeline.diffusion import NoiseSchedule
from pipeline.models.text import TextEncoder
from pipeline.models.unet import UNet, UNetConfig
from pipeline.models.vq import VQModel
from pipeline.sampling import SAMPLERS, guided, randn_per_sample, sample

FORMAT = "ldm-pipeline/1"
# Inside an MLflow model, the pipeline directory is this artefact.
MLFLOW_ARTIFACT = "pipeline"


def write_package(out_dir: Path, unet_dir: Path, vq_dir: Path, clip_dir: Path, latents_meta: dict,
                  schedule: dict, sampling_defaults: dict) -> None:
    """Assemble the pipeline model directory from the stages' outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("unet.json", "unet.safetensors"):
        shutil.copy2(unet_dir / name, out_dir / name)
    shutil.copytree(vq_dir, out_dir / "vq", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.png", "stage.json"))
    shutil.copytree(clip_dir, out_dir / "text_encoder", dirs_exist_ok=True, ignore=shutil.ignore_patterns("stage.json"))
    (out_dir / "model.json").write_text(json.dumps({
        "format": FORMAT,
        "schedule": schedule,
        "latent_scale": latents_meta["latent_scale"],
        "latent_shape": latents_meta["latent_shape"],
        "image_size": latents_meta["image_size"],
        "sampling": sampling_defaults,
    }, indent=2))


def find_package_dir(path: Path) -> Path:
    """The pipeline directory in `path`: itself, or inside an MLflow model's artefacts."""
    for candidate in (path, *sorted((path / "artifacts").glob("*"))):
        if (candidate / "model.json").is_file() and (candidate / "unet.safetensors").is_file():
            return candidate
    raise FileNotFoundError(f"no pipeline model (model.json + unet.safetensors) in {path}")


def resolve_model_uri(model_uri: str, tracking_uri: str | None = None) -> Path:
    """A local directory as is; an MLflow URI (models:/..., runs:/...) downloaded, then located."""
    local = Path(model_uri)
    if "://" not in model_uri and not model_uri.startswith(("models:", "runs:")):
        if not local.exists():
            raise FileNotFoundError(f"model directory not found: {model_uri}")
        return find_package_dir(local)
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    return find_package_dir(downloaded)


@dataclass
class GenerationRequest:
    """One image to generate; a batch may mix prompts, seeds and guidance scales."""

    prompt: str
    seed: int = 0
    guidance_scale: float = 3.0


class PipelineModel:
    """Prompts -> images with the EMA UNet, the VQ decoder and the CLIP text encoder."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        meta = json.loads((directory / "model.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: unsupported model format {meta.get('format')!r}, expected {FORMAT}")
        self.directory = directory
        self.meta = meta
        self.schedule = NoiseSchedule.from_dict(meta["schedule"])
        self.unet = UNet(UNetConfig(**json.loads((directory / "unet.json").read_text())))
        self.unet.load_state_dict(load_file(str(directory / "unet.safetensors")))
        self.unet.eval()
        self.vq, _ = VQModel.load(directory / "vq")
        self.text = TextEncoder.load(directory / "text_encoder")
        self.null = self.text.null()
        self.latent_scale = float(meta["latent_scale"])
        self.latent_shape = tuple(meta["latent_shape"])
        self.defaults = meta.get("sampling", {})
        self.device = torch.device("cpu")
        self._prompt_cache: dict[str, Conditioning] = {}

    def to(self, device) -> "PipelineModel":
        """Move the networks to a device (sampling noise is still drawn on the CPU, per request)."""
        self.device = torch.device(device)
        for net in (self.unet, self.vq, self.text):
            net.to(self.device)
        self.null = self.null.to(self.device)
        self._prompt_cache.clear()
        return self

    @classmethod
    def from_uri(cls, model_uri: str, tracking_uri: str | None = None) -> "PipelineModel":
        return cls(resolve_model_uri(model_uri, tracking_uri))

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """CLIP-encode prompts, caching each prompt's encoding."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            encoded = self.text.encode(missing)
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = encoded.index(slice(i, i + 1))
        return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], steps: int, sampler: str) -> list[np.ndarray]:
        """Generate one image per request, (S, S, 3) uint8 each, in one batched sampling run.

        Each request's noise comes from its own seeded generator, so an image does not depend on
        the other requests in the batch.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
        cond = self.encode_prompts([r.prompt for r in requests])
        scales = torch.tensor([float(r.guidance_scale) for r in requests])
        generators = [torch.Generator().manual_seed(int(r.seed)) for r in requests]
        x = randn_per_sample((len(requests), *self.latent_shape), generators, torch.device("cpu"), torch.float32)
        x, scales = x.to(self.device), scales.to(self.device)
        model_fn = guided(self.unet, cond, self.null, scales)
        latents = sample(sampler, model_fn, x, self.schedule, num_steps=steps, generator=generators)
        images = self.vq.decode(latents / self.latent_scale)
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        return [img.permute(1, 2, 0).numpy() for img in images]


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (deterministic for equal pixels)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
