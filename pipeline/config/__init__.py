"""Typed configuration: one dataclass per stage (`training.py`: the stages that make
a model; `trained.py`: what is done with it), loaded from YAML with dotted `key=value` overrides.

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

from pipeline.config.errors import ConfigError
from pipeline.config.sweep import SweepConfig
from pipeline.config.trained import (DEMO_PROMPTS, EvaluateConfig, PromoteConfig, SamplesConfig, SamplingDefaults,
                                     ServeConfig)
from pipeline.config.training import (ClipConfig, DataConfig, EncodeConfig, LDMConfig, MLflowConfig, VQConfig,
                                      check_image_size)

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "DEMO_PROMPTS", "ClipConfig", "ConfigError", "DataConfig", "EncodeConfig",
           "EvaluateConfig", "LDMConfig", "MLflowConfig", "PipelineConfig", "PromoteConfig", "SamplesConfig",
           "SamplingDefaults", "ServeConfig", "SweepConfig", "VQConfig", "check_image_size", "load_config", "to_yaml"]

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "jobs" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"


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
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """What `jobs/sweep.py` varies (each trial's config is this one with its values)."""

    def __post_init__(self):
        from pipeline.models.unet import UNET_PRESETS

        if "://" in self.workdir:
            raise ConfigError(
                f"workdir={self.workdir!r} must be a filesystem path (on a cluster, a volume every node mounts, e.g. "
                f"/mnt/work): stage outputs are renamed into place and locked, which an object store cannot do. Keep "
                f"shards, checkpoints and artifacts there instead: data.shards=s3://..., ldm.storage_path=s3://..., "
                f"and an MLflow server with an S3 artifact store (mlflow.tracking_uri)")
        if self.ldm.preset != "auto" and self.ldm.preset not in UNET_PRESETS:
            raise ConfigError(f"ldm.preset must be 'auto' or one of {sorted(UNET_PRESETS)}, got {self.ldm.preset!r}")
        if self.promote.alias == self.mlflow.alias:
            raise ConfigError(f"promote.alias and mlflow.alias are both {self.mlflow.alias!r}: every new version "
                              f"would take the alias that evaluation is meant to gate")
        if not self.vq.pretrained:  # a pretrained VQ's downsampling is checked when the vq stage loads it
            check_image_size(self.data.image_size, self.vq.downsample, self.ldm.preset)

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI, defaulting to a SQLite store under the workdir."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{Path(self.workdir).resolve() / 'mlflow.db'}"



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
