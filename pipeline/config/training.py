"""The sections of the stages that make a model: data, vq, clip, encode, ldm (and where it is tracked)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from pipeline.config.errors import ConfigError
from pipeline.config.errors import positive as _positive
from pipeline.diffusion import ScheduleConfig
from pipeline.models.vq import VQArchitecture
from pipeline.training.vqgan import VQLoss


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
    outage_wait_s: float = 30.0
    """When the ldm's training ends while an HTTP tracking server is away, how long the stage waits
    for it to answer again to send the metrics kept meanwhile; after that they stay in
    `<ldm storage>/<run name>/unlogged_metrics.jsonl` (send them with pipeline.tracking.replay_metrics)."""

    def __post_init__(self):
        if not self.outage_wait_s >= 0:
            raise ConfigError(f"mlflow.outage_wait_s must be >= 0 seconds, got {self.outage_wait_s}")


@dataclass
class WorkerGroup:
    """The Ray Train worker group of a stage that trains (vq, clip, ldm): `num_workers` workers of
    `cpus_per_worker` CPUs (their torch threads) each, and a GPU each with `use_gpu`. The fields
    stay flat in each section (`vq.num_workers`, `ldm.use_gpu`, ...)."""

    num_workers: int = 1
    cpus_per_worker: int = 2
    use_gpu: bool = False


@dataclass
class FirstStageTraining(WorkerGroup):
    """The training fields of the stages that fit a model for the ldm to build on (vq and clip, both
    fitted by `pipeline.training.first_stage.fit_small_model`). Each stage sets its own `max_steps`,
    `batch_size` and `warmup_steps`."""

    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 20
    """Linear LR warmup, then cosine decay to zero at max_steps."""
    max_train_images: int = 50_000
    """Training samples materialised in the object store for the stage's fit (a subset on large data)."""

    def check_training(self, section: str, max_steps: int | None = None, **more: int) -> None:
        """ConfigError naming `section`'s key when a training field (or one of `more`) is out of range;
        `max_steps`: the steps a preset gives where the field is left at null."""
        _positive(section, max_steps=self.max_steps if max_steps is None else max_steps, batch_size=self.batch_size,
                  num_workers=self.num_workers, **more)
        if self.warmup_steps < 0:
            raise ConfigError(f"{section}.warmup_steps must be >= 0, got {self.warmup_steps}")


VQ_PRESETS: dict[str, dict] = {
    # One codebook at one width (the first default): enough for images of a few kinds, such as the
    # demo's shapes (held-out PSNR 30.6 dB there, and its samples follow their prompts).
    # It learns them in fewer steps: on the demo 28.5 dB after 1000 (30.1 after 1600), and the
    # samples follow their prompts as well (adherence at guidance 3 0.98 and 0.99; the vq stage 174 s
    # against 257 on slow hours).
    "plain": {"channel_mult": [], "num_quantizers": 1, "lr": 2e-3, "max_steps": 1000},
    # Four codebooks and the latents' resolution twice as wide: on the quality benchmark's emoji at
    # 32 px held-out PSNR 25.3 dB in 1.24x the stage's time, where "plain" gives 22.2 (both with the
    # shuffled epochs of `pipeline.training.first_stage`; 21.4 before them); at 64 px 28.6 dB
    # against 25.2, in 1.42x the time; on the demo 32.9 dB.
    "detailed": {"channel_mult": [1, 1, 2], "num_quantizers": 4, "lr": 4e-3, "max_steps": 1600},
}
"""First-stage capacities by name (`vq.preset`); `pipeline.recipe.vq_preset` picks one from the data."""


@dataclass
class VQConfig(VQLoss, VQArchitecture, FirstStageTraining):
    """The vq stage: the architecture (`VQArchitecture`'s fields, smaller here), the objective
    (`VQLoss`'s: `vq.loss`, plain or VQGAN), then its training (`FirstStageTraining`'s)."""

    preset: str = "auto"
    """The first stage's capacity, one of VQ_PRESETS ("plain", "detailed"), which sets the fields
    below left at null. "auto": chosen from the training set when the vq stage reads it
    (`pipeline.recipe.vq_preset`: "plain" for small images whose captions repeat, like the demo's,
    or when `ldm.epochs` is set below 36 (a short budget goes to ldm steps), "detailed" otherwise);
    the choice and its reason are printed and tagged `recipe.vq` on the run."""
    hidden_channels: int = 32
    channel_mult: Optional[list[int]] = None
    """null: the preset's."""
    num_quantizers: Optional[int] = None
    """null: the preset's."""
    lr: Optional[float] = None
    """null: the preset's."""
    pretrained: str = ""
    """A VQ model directory (model.json + safetensors) or a registered VQ's URI
    (models:/<name>-vq/<version>) to load instead of training one."""
    max_steps: Optional[int] = None
    """null: the preset's (plain 1000, detailed 1600). On the demo: held-out PSNR 32.9 dB after 1600
    steps with the "detailed" preset, 30.9 with "plain" (offline, batch 32, cosine: 23.6 dB after 400
    steps, 29.6 after 1200); at 400 the decoded colours are visibly off, and so are the samples'."""
    batch_size: int = 32
    warmup_steps: int = 20
    eval_batch_size: int = 64
    """Images per chunk when the latent scale and the held-out metrics are measured (bounds the
    evaluation task's memory: at 256 px and 128 channels one activation of 64 images is ~2 GiB)."""

    def __post_init__(self):
        if self.preset != "auto" and self.preset not in VQ_PRESETS:
            raise ConfigError(f"vq.preset must be 'auto' or one of {sorted(VQ_PRESETS)}, got {self.preset!r}")
        # The fields as they would be trained with: the preset's values where none is set.
        filled = {key: value if getattr(self, key) is None else getattr(self, key)
                  for key, value in VQ_PRESETS["detailed" if self.preset == "auto" else self.preset].items()}
        try:
            VQArchitecture(**{f.name: filled.get(f.name, getattr(self, f.name)) for f in fields(VQArchitecture)})
            VQLoss.__post_init__(self)
        except ValueError as err:
            raise ConfigError(f"vq.{err}") from None
        steps = filled["max_steps"]
        if self.loss == "vqgan" and self.disc_start >= steps:
            raise ConfigError(f"vq.disc_start={self.disc_start} is not below vq.max_steps={steps}: "
                              "the discriminator would never start")
        self.check_training("vq", max_steps=steps, eval_batch_size=self.eval_batch_size)

    def with_preset(self, name: str | None = None) -> "VQConfig":
        """This config with `preset` = name and that preset's values in the fields left at null; no
        name: its own preset, "detailed" for "auto" (where no data has been seen)."""
        import dataclasses

        name = name or ("detailed" if self.preset == "auto" else self.preset)
        values = {key: value for key, value in VQ_PRESETS[name].items() if getattr(self, key) is None}
        return dataclasses.replace(self, preset=name, **{key: list(v) if isinstance(v, list) else v
                                                         for key, v in values.items()})


@dataclass
class ClipConfig(FirstStageTraining):
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
    warmup_steps: int = 25

    def __post_init__(self):
        self.check_training("clip")
        if self.context_length < 0 or 0 < self.context_length < 2:
            raise ConfigError(f"clip.context_length must be 0 (sized from the captions) or at least 2 "
                              f"(start and end tokens), got {self.context_length}")


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
class LDMConfig(WorkerGroup):
    preset: str = "auto"
    """UNet preset name (pipeline.models.unet.UNET_PRESETS: tiny, medium, sd). "auto": chosen when
    the vq stage has read the training set (`pipeline.recipe.unet_preset`: tiny on CPUs and below
    10,000 samples, medium from there on a GPU); the choice and its reason are printed and tagged
    `recipe.unet` on the workflow and ldm runs."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_steps: int = 0
    """Optimizer steps. 0: `epochs` passes over the encoded training set decide (pipeline/recipe.py)."""
    epochs: float = 0.0
    """The budget in passes over the training set, when `max_steps` is 0. 0: chosen from the caption
    vocabulary (22 when captions repeat, up to 72 when every image has its own; pipeline/recipe.py);
    the choice and its reason are printed and logged on the ldm run."""
    batch_size: int = 32
    """Micro batch per worker; global batch = batch_size x num_workers x grad_accum."""
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 50
    lr_schedule: str = "cosine"
    """After the linear warmup: 'cosine' decays the rate to zero at the last step; 'constant' keeps it.
    On the quality benchmark's emoji (1,400 steps, offline) cosine named the right image 0.023 of the
    time at guidance 3 (top-5 0.097) against constant's 0.017 (0.063)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """The largest global gradient norm (larger ones are scaled down to it); 0 does not clip."""
    zero_stage: int = 0
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    p_uncond: float = 0.1
    """Conditioning dropout probability for classifier-free guidance (Ho & Salimans use 0.1-0.2)."""
    ema_decay: float = 0.995
    checkpoint_every: int = 500
    """Steps between checkpoints (the last step is always checkpointed): what a failure loses."""
    keep_checkpoints: int = 2
    storage_path: str = ""
    """Ray Train storage for checkpoints (s3:// on a cluster). Empty: <workdir>/ray_results."""
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
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"ldm.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ConfigError(f"ldm.p_uncond must be in [0, 1], got {self.p_uncond}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ldm.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_steps < 0 or self.epochs < 0:
            raise ConfigError(f"ldm.max_steps and ldm.epochs must be >= 0 (0: chosen from the data), got "
                              f"{self.max_steps} and {self.epochs:g}")
        _positive(
            "ldm",
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


def unet_downsample_factor(preset: str) -> int:
    """How much the UNet of `ldm.preset` halves its latents; for "auto" not yet resolved (outside the
    workflow, which resolves it after the vq stage), the tiny UNet's, the least any choice needs."""
    from pipeline.models.unet import UNET_PRESETS

    return UNET_PRESETS["tiny" if preset == "auto" else preset].downsample_factor


def check_image_size(image_size: int, vq_downsample: int, preset: str, vq_key: str = "vq.downsample") -> None:
    """Images must shrink to latents that the UNet halves at each level: `image_size` a multiple of
    the VQ's downsampling times the UNet's. Checked before any work, not at the ldm stage's first step."""
    unet = unet_downsample_factor(preset)
    factor = vq_downsample * unet
    if image_size % factor:
        below = image_size - image_size % factor
        sizes = " or ".join(str(size) for size in (below, below + factor) if size >= 8)
        raise ConfigError(f"data.image_size={image_size} must be a multiple of {factor} ({vq_key}={vq_downsample} "
                          f"times {unet} for the {preset!r} UNet of ldm.preset): try {sizes}")

