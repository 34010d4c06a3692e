"""The `sweep` section: what `jobs/sweep.py` varies and how it ranks the trials (`pipeline.sweep`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config.errors import ConfigError
from pipeline.config.errors import positive as _positive

SWEEP_METRICS = {"fd": "min", "clip_score": "max"}


@dataclass
class SweepConfig:
    space: dict[str, Any] = field(default_factory=dict)
    """Config keys to vary, nested like the config or dotted: each a list (a grid: every value is
    tried) or a string drawn from: `loguniform(a, b)`, `uniform(a, b)`, `randint(a, b)` (b excluded),
    `choice(a, b, ...)`. E.g. `{ldm: {lr: "loguniform(1e-4, 3e-3)", p_uncond: [0.05, 0.1, 0.2]}}`."""
    num_samples: int = 4
    """Draws from `space`: trials = num_samples x the product of the lists' lengths."""
    metric: str = "fd"
    """What ranks trials: `fd` (lower is better) or `clip_score`, at the promotion guidance scale.
    ASHA stops trials on its in-training value (`evaluate.every`); the best trial is the finished
    one with the best value from its evaluate stage."""
    max_concurrent: int = 1
    """Trials at once. Each trains its own ldm with `ldm.num_workers` workers; on the demo machine
    one at a time."""
    grace_evaluations: int = 1
    """ASHA: no trial is stopped before this many in-training evaluations."""
    reduction_factor: int = 2
    """ASHA: at each rung only the best 1/reduction_factor of the trials go on."""
    seed: int = 0
    """Seed of the search (the points drawn from `space`)."""

    def __post_init__(self):
        _positive("sweep", num_samples=self.num_samples, max_concurrent=self.max_concurrent,
                  grace_evaluations=self.grace_evaluations)
        if self.metric not in SWEEP_METRICS:
            raise ConfigError(f"sweep.metric must be one of {sorted(SWEEP_METRICS)}, got {self.metric!r}")
        if self.reduction_factor < 2:
            raise ConfigError(f"sweep.reduction_factor must be >= 2, got {self.reduction_factor}")

    @property
    def mode(self) -> str:
        return SWEEP_METRICS[self.metric]
