"""Typed configuration: one dataclass per stage, loaded from YAML with dotted `key=value` overrides.

Every job parses its config here before any work starts, so an unknown key or a wrongly typed value
fails fast with a `ConfigError` naming the key. Each stage's section is part of that stage's cache
key (`section_yaml`) and is logged to MLflow verbatim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.diffusion import ScheduleConfig
from pipeline.models.vq import VQArchitecture

CONFIG_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"

DEMO_PROMPTS = [
    "a red circle on the left",
    "a blue square on the right",
    "a green triangle at the top",
    "a yellow circle at the bottom",
    "a blue triangle on the left",
    "a red square at the top",
    "a yellow triangle on the right",
    "a green circle at the bottom",
]


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclass
class DataConfig:
    shards: str = ""
    """WebDataset shards: a directory, glob, brace pattern or URL. Empty: generate the embedded demo."""
    image_size: int = 32
    """Training resolution: the side of the square bucket; every bucket has about image_size² pixels."""
    buckets: str = "auto"
    """Aspect-ratio buckets of the encode stage (the latents the UNet trains on; `pipeline.data.buckets`):
    'auto', the table of sizes around image_size² pixels up to `max_aspect` (square images all land in
    the square bucket, so square data is trained as before); 'square', every image resized and
    centre-cropped to image_size²; or the sizes themselves, 'WxH,WxH,...' (each side a multiple of
    what the VQ and UNet need). The vq and clip stages always train on square crops."""
    max_aspect: float = 2.0
    """The most elongated bucket of 'auto': neither side more than this times the other."""
    heldout_fraction: float = 0.05
    """Fraction of samples (chosen by a hash of the key) held out for the stages' metrics."""
    demo_num_samples: int = 4000
    """Demo only: how many captioned images to generate."""
    demo_shard_size: int = 1000
    """Demo only: samples per shard."""
    max_image_pixels: int = 89_478_485
    """Decompression-bomb guard of the encode stage: images with more pixels (width x height, read
    from the header before decoding) are skipped as `too_many_pixels`. Default: PIL's own limit.
    PIL's hard limit (twice its default) also applies."""

    def __post_init__(self):
        if self.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {self.image_size}")
        if self.max_image_pixels <= 0:
            raise ConfigError(f"data.max_image_pixels must be > 0, got {self.max_image_pixels}")
        if not 0.0 <= self.heldout_fraction < 0.5:
            raise ConfigError(f"data.heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")
        if self.max_aspect < 1.0:
            raise ConfigError(f"data.max_aspect must be >= 1, got {self.max_aspect}")
        if self.buckets not in ("auto", "square"):
            from pipeline.data.buckets import parse_size

            try:
                [parse_size(part) for part in self.buckets.split(",")]
            except ValueError as err:
                raise ConfigError(f"data.buckets must be 'auto', 'square' or 'WxH,WxH,...': {err}") from None


@dataclass
class MLflowConfig:
    tracking_uri: str = ""
    """MLflow tracking URI. Empty: a local SQLite store under the workdir."""
    experiment_name: str = "ldm-pipeline"
    registered_model_name: str = "ldm-pipeline"
    """Name the final pipeline model is registered under."""
    alias: str = "candidate"
    """Registry alias set on the newly registered version (`models:/name@alias`)."""


@dataclass
class VQConfig(VQArchitecture):
    """The vq stage: the architecture (`VQArchitecture`'s fields, smaller here), then its training."""

    hidden_channels: int = 32
    pretrained: str = ""
    """A VQ model directory (model.json + safetensors) or a registered VQ's URI
    (models:/<name>-vq/<version>) to load instead of training one."""
    max_steps: int = 1600
    """On the demo (offline, batch 32, cosine): held-out PSNR 23.6 dB after 400 steps, 29.6 after
    1200, 30.9 after 1600; at 400 the decoded colours are visibly off, and so are the samples'."""
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 20
    """Linear LR warmup, then cosine decay to zero at max_steps."""
    max_train_images: int = 50_000
    """Training images materialised in the object store for the vq fit (a subset on large data)."""
    eval_batch_size: int = 64
    """Images per chunk when the latent scale and the held-out metrics are measured (bounds the
    evaluation task's memory: at 256 px and 128 channels one activation of 64 images is ~2 GiB)."""
    num_workers: int = 1
    cpus_per_worker: int = 2
    use_gpu: bool = False

    def __post_init__(self):
        if self.downsample not in (4, 8):
            raise ConfigError(f"vq.downsample must be 4 or 8, got {self.downsample}")
        super().__post_init__()
        _positive("vq", max_steps=self.max_steps, batch_size=self.batch_size, num_workers=self.num_workers,
                  eval_batch_size=self.eval_batch_size)
        if self.warmup_steps < 0:
            raise ConfigError(f"vq.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class ClipConfig:
    model: str = "tiny"
    """'tiny' (this project's small CLIP, trained here) or any open_clip model name."""
    pretrained: str = ""
    """Set it to skip training: an open_clip pretrained tag, a local checkpoint file (safetensors or
    a torch state dict, loaded with weights_only=True), a text encoder directory saved by the clip
    stage, or a registered encoder's URI (models:/<name>-clip/<version>)."""
    context_length: int = 0
    """Text tokens per caption, start and end tokens included (tiny model only; pretrained models
    bring their own). 0: sized from the training captions, the count that holds 99% of them, at
    least 16 and at most 77 (CLIP's); 16 for a tiny checkpoint file (`pretrained`). Longer captions
    are cut: the clip and encode stages report how many as `captions_truncated`."""
    width: int = 128
    """Text and vision transformer width of the tiny model."""
    layers: int = 2
    max_steps: int = 250
    """Contrastive steps. On the demo, 100 left the text features worse for conditioning than
    random ones (retrieval of the right shape/colour/position 0.17); 250 learn it (1.0)."""
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 25
    """Linear LR warmup, then cosine decay to zero at max_steps."""
    max_train_images: int = 50_000
    """Training samples materialised in the object store for the clip fit."""
    num_workers: int = 1
    cpus_per_worker: int = 2
    use_gpu: bool = False

    def __post_init__(self):
        _positive("clip", max_steps=self.max_steps, batch_size=self.batch_size, num_workers=self.num_workers)
        if self.context_length < 0 or 0 < self.context_length < 2:
            raise ConfigError(f"clip.context_length must be 0 (sized from the captions) or at least 2 "
                              f"(start and end tokens), got {self.context_length}")
        if self.warmup_steps < 0:
            raise ConfigError(f"clip.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class EncodeConfig:
    batch_size: int = 256
    """Images per encoder call in the actor pool."""
    concurrency: int = 1
    """Number of encoder actors."""
    num_gpus_per_actor: float = 0.0

    def __post_init__(self):
        _positive("encode", batch_size=self.batch_size, concurrency=self.concurrency)


@dataclass
class LDMConfig:
    preset: str = "tiny"
    """UNet preset name (pipeline.models.unet.UNET_PRESETS)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_steps: int = 800
    batch_size: int = 32
    """Micro batch per worker; global batch = batch_size x num_workers x grad_accum."""
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """The largest global gradient norm (larger ones are scaled down to it); 0 does not clip."""
    p_uncond: float = 0.1
    """Conditioning dropout probability for classifier-free guidance (Ho & Salimans use 0.1-0.2)."""
    ema_decay: float = 0.995
    checkpoint_every: int = 500
    """Steps between checkpoints (the last step is always checkpointed): what a failure loses."""
    keep_checkpoints: int = 2
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 0
    """Worker failures Ray Train recovers from by restarting from the latest checkpoint (a lost
    node counts as one)."""
    stall_timeout_s: float = 900.0
    """When no training step completes for this long (the first one after a (re)start included),
    the stage stops with an error naming the resources Ray is waiting for. 0: wait forever."""
    stream_latents: bool = False
    """Stream the latent dataset to the workers with Ray Data (latent sets larger than a worker's
    memory); its read tasks need CPUs the trainers do not hold. False: every worker reads the
    latents' files into memory, in one global order (exact resume, any node may be lost)."""
    zero_stage: int = 0
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    storage_path: str = ""
    """Ray Train storage for checkpoints (s3:// on a cluster). Empty: <workdir>/ray_results."""
    log_every: int = 25
    """Print the progress line every this many steps (metrics go to MLflow every step)."""
    max_nonfinite_steps: int = 10
    """A non-finite loss skips its step (counted as `nonfinite_steps`); this many in a row stop the run."""
    sample_every: int = 0
    """Log a sample grid of the samples stage's prompts (up to 16) from the EMA weights to MLflow every this many steps
    (0: only at the end of training)."""
    sample_grid_steps: int = 25
    """DDIM steps for those in-training grids (cheap; the samples stage uses `samples.steps`)."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"ldm.zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"ldm.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ConfigError(f"ldm.p_uncond must be in [0, 1], got {self.p_uncond}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ldm.ema_decay must be in [0, 1), got {self.ema_decay}")
        _positive(
            "ldm",
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            checkpoint_every=self.checkpoint_every,
            max_nonfinite_steps=self.max_nonfinite_steps,
            sample_grid_steps=self.sample_grid_steps,
            num_workers=self.num_workers,
            keep_checkpoints=self.keep_checkpoints,
        )
        if self.sample_every < 0:
            raise ConfigError(f"ldm.sample_every must be >= 0, got {self.sample_every}")
        if self.stall_timeout_s < 0:
            raise ConfigError(f"ldm.stall_timeout_s must be >= 0 (0: wait forever), got {self.stall_timeout_s}")


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model samples when a request does not say: the one place these values are spelled.
    The samples stage's settings are written into each package as its own defaults (model.json)."""

    guidance_scale: float = 3.0
    steps: int = 50
    sampler: str = "ddim"

    @classmethod
    def of(cls, given: dict | None) -> dict:
        """A package's `sampling` map with every key, the missing ones from here."""
        base = cls()
        return {name: (given or {}).get(name, getattr(base, name)) for name in ("guidance_scale", "steps", "sampler")}


@dataclass
class SamplesConfig:
    prompts: list[str] = field(default_factory=lambda: list(DEMO_PROMPTS))
    """The prompts of the samples stage's grid (and the ldm stage's in-training grids). Empty, with
    no `prompts_file`: the first `heldout_prompts` captions of the held-out split."""
    prompts_file: str = ""
    """A UTF-8 file with one prompt per line (on shared storage on a cluster); replaces `prompts`."""
    heldout_prompts: int = 16
    """How many held-out captions to sample when neither `prompts` nor `prompts_file` is given."""
    guidance_scale: float = SamplingDefaults.guidance_scale
    steps: int = SamplingDefaults.steps
    sampler: str = SamplingDefaults.sampler
    seed: int = 0
    num_per_prompt: int = 4
    adherence_images: int = 120
    """Demo data only: how many images (cycling through every shape x colour x position, seeds from
    `seed`) to generate at guidance scales 1 and `guidance_scale` for `adherence_g1` /
    `adherence_g<scale>`. 0 turns the evaluation off."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05
    """How long the sampler waits to fill a batch; small against a sampling call's seconds."""
    num_cpus: float = 2
    """CPUs (and torch threads) of the sampler replica; the demo machine has 2."""
    num_gpus: float = 0
    start_timeout_s: float = 600.0
    """How long a job waits for the Serve app it starts to answer (the replica placed and its
    model loaded) before it stops with an error saying what Serve reports."""


@dataclass
class PipelineConfig:
    workdir: str = "work"
    """All outputs (shards, stage outputs, MLflow store, samples) go under it: a local path, or on
    a cluster a volume every node mounts (stage outputs are renamed into place and locked, which
    object stores cannot do; they hold the shards, checkpoints and MLflow artifacts instead)."""
    seed: int = 0
    ray_address: str = ""
    """Ray cluster to join. Empty: RAY_ADDRESS if set, else a local Ray instance."""
    data: DataConfig = field(default_factory=DataConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self):
        from pipeline.models.unet import UNET_PRESETS

        if "://" in self.workdir:
            raise ConfigError(
                f"workdir={self.workdir!r} must be a filesystem path (on a cluster, a volume every node mounts, e.g. "
                f"/mnt/work): stage outputs are renamed into place and locked, which an object store cannot do. Keep "
                f"shards, checkpoints and artifacts there instead: data.shards=s3://..., ldm.storage_path=s3://..., "
                f"and an MLflow server with an S3 artifact store (mlflow.tracking_uri)")
        if self.ldm.preset not in UNET_PRESETS:
            raise ConfigError(f"ldm.preset must be one of {sorted(UNET_PRESETS)}, got {self.ldm.preset!r}")
        if not self.vq.pretrained:  # a pretrained VQ's downsampling is checked when the vq stage loads it
            check_image_size(self.data.image_size, self.vq.downsample, self.ldm.preset)

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI, defaulting to a SQLite store under the workdir."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{Path(self.workdir).resolve() / 'mlflow.db'}"


def check_image_size(image_size: int, vq_downsample: int, preset: str, vq_key: str = "vq.downsample") -> None:
    """Images must shrink to latents that the UNet halves at each level: `image_size` a multiple of
    the VQ's downsampling times the UNet's. Checked before any work, not at the ldm stage's first step."""
    from pipeline.models.unet import UNET_PRESETS

    unet = UNET_PRESETS[preset].downsample_factor
    factor = vq_downsample * unet
    if image_size % factor:
        below = image_size - image_size % factor
        sizes = " or ".join(str(size) for size in (below, below + factor) if size >= 8)
        raise ConfigError(f"data.image_size={image_size} must be a multiple of {factor} ({vq_key}={vq_downsample} "
                          f"times {unet} for the {preset!r} UNet of ldm.preset): try {sizes}")


def _positive(section: str, **values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (default: jobs/configs/demo.yaml) and apply dotted `key=value` overrides.

    Raises ConfigError naming the key for an unknown key, a wrongly typed value, a malformed
    override, or a value that fails a section's validation.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    merged = OmegaConf.structured(PipelineConfig)
    try:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {_describe(err)}") from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"override: {_describe(err)}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    except ValueError as err:  # a section's __post_init__ validation
        raise ConfigError(str(err)) from None


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def to_yaml(cfg) -> str:
    """Serialise a config dataclass (or one section) to YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
