"""The served artefact: one directory (and one MLflow model) holding everything needed to sample.

Layout (no pickles: JSON + safetensors only):

    model.json            format, schedule, latent scale and shape, sampling defaults, and the
                          sizes it samples at ("WxH", its aspect-ratio buckets) with the default
    unet.json, unet.safetensors   the EMA UNet
    vq/                   the VQ model (its decoder turns latents into images)
    text_encoder/         the CLIP text encoder (prompts -> conditioning)

`PipelineModel` loads such a directory, or an MLflow model URI whose artefacts contain one, and
generates images: prompts -> CLIP -> guided sampler on the UNet -> VQ decode -> uint8 images.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.conditioning import Conditioning
from pipeline.config import SamplingDefaults
from pipeline.data.buckets import Size, parse_size, size_name
from pipeline.data.images import captioned_tile, tensor_to_images
from pipeline.diffusion import NoiseSchedule
from pipeline.models.text import TextEncoder
from pipeline.models.unet import UNet, UNetConfig
from pipeline.models.vq import VQModel
from pipeline.sampling import SAMPLERS, guided, randn_per_sample, sample

FORMAT = "ldm-pipeline/1"
# Inside an MLflow model, the pipeline directory is this artefact.
MLFLOW_ARTIFACT = "pipeline"
# Prompt encodings kept by a PipelineModel (a few KiB each for the demo encoder).
PROMPT_CACHE_SIZE = 4096


def write_package(out_dir: Path, unet_dir: Path, vq_dir: Path, clip_dir: Path, latents_meta: dict,
                  schedule: dict, sampling_defaults: dict) -> None:
    """Assemble the pipeline model directory from the stages' outputs. The sizes are those the ldm
    stage trained on (`unet_dir/sizes.json`), else the square of the latents' image size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    square = f"{latents_meta['image_size']}x{latents_meta['image_size']}"
    sizes = {"sizes": [square], "default_size": square}
    if (unet_dir / "sizes.json").is_file():
        sizes = json.loads((unet_dir / "sizes.json").read_text())
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
        "sizes": sizes["sizes"],
        "default_size": sizes["default_size"],
    }, indent=2))


def find_package_dir(path: Path, required: tuple[str, ...] = ("model.json", "unet.safetensors")) -> Path:
    """The model directory in `path`: itself, or inside an MLflow model's artefacts."""
    for candidate in (path, *sorted((path / "artifacts").glob("*"))):
        if all((candidate / name).is_file() for name in required):
            return candidate
    raise FileNotFoundError(f"no model ({' + '.join(required)}) in {path}")


def is_model_uri(text: str) -> bool:
    """An MLflow (or other remote) URI rather than a local path."""
    return "://" in text or text.startswith(("models:", "runs:"))


def resolve_model_uri(model_uri: str, tracking_uri: str | None = None,
                      required: tuple[str, ...] = ("model.json", "unet.safetensors"), dst_path: str | None = None) -> Path:
    """A local directory as is; an MLflow URI (models:/..., runs:/...) downloaded (into `dst_path`,
    default a temporary directory), then located.

    The model directory is the first of the directory itself and its MLflow artefacts that holds
    every file in `required` (default: a pipeline model's).
    """
    local = Path(model_uri)
    if not is_model_uri(model_uri):
        if not local.exists():
            raise FileNotFoundError(f"model directory not found: {model_uri}")
        return find_package_dir(local, required)
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
    return find_package_dir(downloaded, required)


def resolve_model_version(model_uri: str, tracking_uri: str | None = None) -> str:
    """models:/name@alias, models:/name/latest or models:/name/Stage -> models:/name/N; others as given."""
    if not model_uri.startswith("models:/"):
        return model_uri
    rest = model_uri[len("models:/"):]
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking_uri or None, registry_uri=tracking_uri or None)
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, _, ref = rest.rpartition("/")
            if not name or ref.isdigit():
                return model_uri
            if ref == "latest":
                version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            else:
                version = client.get_latest_versions(name, [ref])[0].version
        return f"models:/{name}/{version}"
    except Exception:  # noqa: BLE001 - the version header is informative; loading reports real errors
        return model_uri


@dataclass
class GenerationRequest:
    """One image to generate; a batch may mix prompts, seeds and guidance scales."""

    prompt: str
    seed: int = 0
    guidance_scale: float = SamplingDefaults.guidance_scale
    size: Size | None = None
    """(width, height), one of the model's `sizes`; None: its default size."""


class PipelineModel:
    """Prompts -> images with the EMA UNet, the VQ decoder and the CLIP text encoder."""

    def __init__(self, unet: UNet, vq: VQModel, text: TextEncoder, schedule: NoiseSchedule, latent_scale: float,
                 latent_shape: tuple[int, ...], defaults: dict | None = None, null: Conditioning | None = None,
                 sizes: list[Size] | None = None, default_size: Size | None = None, downsample: int = 0):
        """From the networks (the ldm stage's in-training grids build one so); `load` reads a package.
        `latent_shape` is that of the default size; `sizes` the (width, height) images it samples at
        (default: the one `latent_shape` decodes to), each `downsample` times its latent."""
        self.schedule = schedule
        self.unet = unet.eval()
        self.vq = vq
        self.text = text
        self.null = self.text.null() if null is None else null
        self.latent_scale = float(latent_scale)
        self.latent_shape = tuple(latent_shape)
        self.downsample = downsample or vq.cfg.downsample
        self.default_size = default_size or (latent_shape[2] * self.downsample, latent_shape[1] * self.downsample)
        self.sizes = [tuple(size) for size in sizes] if sizes else [self.default_size]
        self.defaults = SamplingDefaults.of(defaults)
        """guidance_scale, steps and sampler of a request that does not give them."""
        self.device = torch.device("cpu")
        self._prompt_cache: OrderedDict[str, Conditioning] = OrderedDict()
        self.fixed_batch = 0
        """When > 0, every UNet forward runs on exactly 2 * fixed_batch rows (see `FixedRowsUNet`)
        and every VQ decode on exactly fixed_batch images (chunked, the last chunk
        padded with copies of its last row).
        CPU and GPU kernels pick their algorithm by shape, so a row's result can depend on the batch
        size; with one fixed shape an image depends only on its own request, whatever shares its
        batch (the serving app sets this). 0: run each batch at its own size."""

    def to(self, device) -> "PipelineModel":
        """Move the networks to a device (sampling noise is still drawn on the CPU, per request)."""
        self.device = torch.device(device)
        for net in (self.unet, self.vq, self.text):
            net.to(self.device)
        self.null = self.null.to(self.device)
        self._prompt_cache.clear()
        return self

    @classmethod
    def load(cls, directory: str | Path) -> "PipelineModel":
        """A package directory (`write_package`'s layout)."""
        directory = Path(directory)
        meta = json.loads((directory / "model.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: unsupported model format {meta.get('format')!r}, expected {FORMAT}")
        unet = UNet(UNetConfig(**json.loads((directory / "unet.json").read_text())))
        unet.load_state_dict(load_file(str(directory / "unet.safetensors")))
        square = f"{meta['image_size']}x{meta['image_size']}"  # a package from before buckets
        return cls(unet, VQModel.load(directory / "vq")[0], TextEncoder.load(directory / "text_encoder"),
                   NoiseSchedule.from_dict(meta["schedule"]), meta["latent_scale"], meta["latent_shape"],
                   meta.get("sampling"), sizes=[parse_size(name) for name in meta.get("sizes", [square])],
                   default_size=parse_size(meta.get("default_size", square)),
                   downsample=meta["image_size"] // meta["latent_shape"][1])

    @classmethod
    def from_uri(cls, model_uri: str, tracking_uri: str | None = None) -> "PipelineModel":
        return cls.load(resolve_model_uri(model_uri, tracking_uri))

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """CLIP-encode prompts, caching each prompt's encoding (least recently used out first).

        Each new prompt is encoded alone, so its encoding does not depend on which prompts arrived
        with it (batched matmuls can differ in the last bits).
        """
        for prompt in dict.fromkeys(prompts):
            if prompt in self._prompt_cache:
                self._prompt_cache.move_to_end(prompt)
            else:
                self._prompt_cache[prompt] = self.text.encode([prompt])
                if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                    self._prompt_cache.popitem(last=False)
        return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    def _unet_fn(self):
        if not self.fixed_batch:
            return self.unet
        return FixedRowsUNet(self.unet, 2 * self.fixed_batch)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.fixed_batch:
            return self.vq.decode(latents)
        return _in_fixed_chunks(lambda idx: self.vq.decode(latents[idx]), latents.shape[0], self.fixed_batch,
                                latents.device)

    def size_of(self, request: GenerationRequest) -> Size:
        """The request's (width, height); ValueError listing the allowed sizes if it is not one."""
        if request.size is None:
            return self.default_size
        size = tuple(request.size)
        if size not in self.sizes:
            raise ValueError(f"{size_name(size)} is not a size this model samples at; its sizes: "
                             f"{', '.join(size_name(s) for s in self.sizes)}")
        return size

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], steps: int, sampler: str) -> list[np.ndarray]:
        """Generate one image per request, (height, width, 3) uint8 each, one batched sampling run per size.

        Each request's noise comes from its own seeded generator; with `fixed_batch` set, an image
        is bit for bit the same whatever else shares its batch, except that a batch whose scales
        are all exactly 1 skips the unconditional half (so keep such requests in batches of their own).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
        sizes = [self.size_of(request) for request in requests]
        images: list = [None] * len(requests)
        for size in dict.fromkeys(sizes):
            rows = [i for i, s in enumerate(sizes) if s == size]
            for i, image in zip(rows, self._generate([requests[i] for i in rows], size, steps, sampler)):
                images[i] = image
        return images

    def generate_in_chunks(self, captions: list[str], seed: int, scale: float, steps: int = 0, sampler: str = "",
                           batch_size: int = 64) -> Iterator[tuple[list[str], list[np.ndarray]]]:
        """One image per caption, the i-th with seed `seed + i`, at one guidance scale (steps 0 /
        sampler '': the model's defaults), `batch_size` captions a `generate` call (what bounds the
        memory of an evaluation): yields each chunk's captions and images, in order."""
        steps, sampler = steps or int(self.defaults["steps"]), sampler or self.defaults["sampler"]
        for i in range(0, len(captions), batch_size):
            chunk = captions[i:i + batch_size]
            yield chunk, self.generate([GenerationRequest(c, seed + i + j, scale) for j, c in enumerate(chunk)],
                                       steps, sampler)

    def _generate(self, requests: list[GenerationRequest], size: Size, steps: int, sampler: str) -> list[np.ndarray]:
        cond = self.encode_prompts([r.prompt for r in requests])
        scales = torch.tensor([float(r.guidance_scale) for r in requests])
        generators = [torch.Generator().manual_seed(int(r.seed)) for r in requests]
        shape = (self.latent_shape[0], size[1] // self.downsample, size[0] // self.downsample)
        x = randn_per_sample((len(requests), *shape), generators, torch.device("cpu"), torch.float32)
        x, scales = x.to(self.device), scales.to(self.device)
        model_fn = guided(self._unet_fn(), cond, self.null, scales)
        latents = sample(sampler, model_fn, x, self.schedule, num_steps=steps, generator=generators)
        images = self._decode(latents / self.latent_scale)
        return list(tensor_to_images(images))

    def grid(self, requests: list[GenerationRequest], steps: int, sampler: str, ncol: int = 0) -> np.ndarray:
        """`generate`'s images tiled into one near-square picture (uint8), row by row, each with its prompt."""
        return captioned_tile(self.generate(requests, steps, sampler), [r.prompt for r in requests], ncol)


class FixedRowsUNet:
    """A UNet run at one fixed shape: chunks of exactly `rows` rows, text without batch-wide shortcuts.

    The last chunk is padded by repeating its last row; the padding's outputs are dropped. With one
    shape and `UNet.bind(..., fixed_text=True)`, a row's output does not depend on the rest of its
    batch. Offers `bind(cond)` (see `pipeline.sampling.guided`): each chunk's condition is bound once
    per sampling run.
    """

    def __init__(self, unet: UNet, rows: int):
        self.unet, self.rows = unet, rows

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.bind(cond)(x, t)

    def bind(self, cond: Conditioning):
        n = len(cond)
        device = cond.tokens.device
        chunks = [torch.arange(start, start + self.rows, device=device).clamp(max=n - 1)
                  for start in range(0, n, self.rows)]
        fns = [self.unet.bind(cond.index(idx), fixed_text=True) for idx in chunks]

        def bound(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != n or t.shape[0] != n:
                raise ValueError(f"x has batch {x.shape[0]} and t {t.shape[0]}, the condition {n}")
            return torch.cat([fn(x[idx], t[idx])[: min(self.rows, n - start)]
                              for start, idx, fn in zip(range(0, n, self.rows), chunks, fns)])

        return bound


def _in_fixed_chunks(run, n: int, rows: int, device) -> torch.Tensor:
    """torch.cat of run(idx) over chunks of exactly `rows` row indices covering range(n), the last
    chunk padded by repeating row n - 1; the padding's outputs are dropped."""
    outs = []
    for start in range(0, n, rows):
        idx = torch.arange(start, start + rows, device=device).clamp(max=n - 1)
        outs.append(run(idx)[: min(rows, n - start)])
    return torch.cat(outs)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (deterministic for equal pixels)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
