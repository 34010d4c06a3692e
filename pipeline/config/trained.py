"""The sections of what is done with a trained model: sampled, evaluated, promoted, served."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.errors import ConfigError
from pipeline.config.errors import positive as _positive

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
class TaskResources:
    """What each Ray task or replica of a section asks for (`evaluate.num_cpus`, `serve.num_gpus`, ...);
    its CPUs are also its torch threads."""

    num_cpus: float = 2
    num_gpus: float = 0


@dataclass
class EvaluateConfig(TaskResources):
    """The evaluate stage and jobs/evaluate.py (pipeline/evaluation.py): held-out captions sampled at
    each guidance scale, FD and CLIP score against the held-out images, per scale. `num_cpus` and
    `num_gpus`: the resources of each generation task (one per guidance scale, side by side where
    there is room)."""

    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0])
    num_images: int = 500
    """Held-out images (their captions the prompts, one image each, seeds from `seed`); fewer when
    the held-out split is smaller. FD's bias shrinks with more: compare runs at the same count."""
    encoder: str = ""
    """'' the run's own CLIP; 'open_clip:<model>:<checkpoint file>'; 'inception:<state dict file>' (FID)."""
    seed: int = 0
    steps: int = 0
    """Sampling steps; 0: the model's own default (samples.steps)."""
    batch_size: int = 50
    grid_images: int = 16
    """Images of the grid logged per guidance scale, each with its caption."""
    every: int = 1
    """During training: evaluate every `every`-th ldm checkpoint (and the last) beside training, at
    the promotion guidance scale, into the ldm run at its step (the FD curve); 0: only after it."""
    during_images: int = 100
    """Held-out captions of each evaluation during training (the first of the evaluate stage's)."""
    during_timeout_s: float = 1800.0
    """How long the ldm stage waits, after training, for its evaluations still running; then it
    says which steps it gave up on (the training's result is kept either way)."""

    def __post_init__(self):
        _positive("evaluate", num_images=self.num_images, batch_size=self.batch_size,
                  during_images=self.during_images)
        if self.every < 0:
            raise ConfigError(f"evaluate.every must be >= 0 (0: no evaluation during training), got {self.every}")
        if not self.guidance_scales or min(self.guidance_scales) < 0:
            raise ConfigError(f"evaluate.guidance_scales must be a non-empty list of scales >= 0, "
                              f"got {self.guidance_scales}")


@dataclass
class PromoteConfig:
    """Who takes the `alias` (production): a new version only if its FD beats the current holder's."""

    alias: str = "production"
    guidance_scale: float = 0.0
    """The guidance scale the FDs are compared at; 0: samples.guidance_scale (the package's default)."""
    force: bool = False
    """Promote whatever the figures say (`--force-promote`); the figures are still logged."""


@dataclass
class ServeConfig(TaskResources):
    """The serving app's sampler (`pipeline.serve`). `num_cpus` and `num_gpus`: the sampler replica's
    (its CPUs its torch threads; the default 2 is what the demo machine has)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05
    """How long the sampler waits to fill a batch; small against a sampling call's seconds."""
    start_timeout_s: float = 600.0
    """How long a job waits for the Serve app it starts to answer (the replica placed and its
    model loaded) before it stops with an error saying what Serve reports."""
