"""Rank 0's in-training sample grids: fixed prompts and seeds from the EMA weights, through the
served model's generation path (`PipelineModel.grid`), logged to the ldm run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.diffusion import NoiseSchedule, ScheduleConfig
from pipeline.models.unet import UNet, UNetConfig
from pipeline.tracking import MetricLogger


@dataclass
class GridConfig:
    """In-training sample grids (rank 0): fixed prompts and seeds, the VQ and text encoder to use."""

    prompts: list[str]
    clip_dir: str
    vq_dir: str
    latent_shape: list[int]
    seed: int
    guidance_scale: float
    steps: int


def model_parts(loop, vq_dir: str, clip_dir: str, latent_shape: list[int]) -> dict:
    """`pipeline_model`'s arguments for the model a training loop (`LDMLoopConfig`) trains."""
    return {"unet": loop.unet, "schedule": loop.schedule, "vq_dir": vq_dir, "clip_dir": clip_dir,
            "latents_dir": loop.latents_dir, "latent_scale": loop.latent_scale, "latent_shape": latent_shape}


def pipeline_model(unet: dict, schedule: dict, vq_dir: str, clip_dir: str, latents_dir: str, latent_scale: float,
                   latent_shape: list[int]):
    """The served model's generation path around a fresh UNet (load the EMA weights into `.unet`),
    from the ldm stage's inputs: the VQ and text encoder directories and the latents' null condition."""
    from pipeline.model_package import PipelineModel
    from pipeline.models.text import TextEncoder
    from pipeline.models.vq import VQModel
    from pipeline.stages.encode import load_null_condition

    return PipelineModel(UNet(UNetConfig(**unet)), VQModel.load(vq_dir)[0], TextEncoder.load(clip_dir),
                         NoiseSchedule(ScheduleConfig(**schedule)), latent_scale, latent_shape,
                         null=load_null_condition(Path(latents_dir)).to(dtype=torch.float32))


class SampleGrids:
    """Rank 0: sample grids of fixed prompts and seeds from the EMA weights, logged to MLflow."""

    def __init__(self, loop, logger: MetricLogger, device: torch.device):
        self.loop, self.logger, self.device = loop, logger, device
        self.model = None  # built at the first grid, reused after

    def log(self, weights: dict, step: int) -> None:
        """Never fails the training: a grid that cannot be made or logged is reported and skipped."""
        try:
            self._log(weights, step)
        except Exception as error:  # noqa: BLE001
            print(f"[ldm] no sample grid for step {step}: {type(error).__name__}: {error}", flush=True)

    @torch.no_grad()
    def _log(self, weights: dict, step: int) -> None:
        from pipeline.model_package import GenerationRequest

        grid, start = self.loop.grid, time.perf_counter()
        if self.model is None:  # the served model's generation path, on the EMA weights in memory
            parts = model_parts(self.loop, grid.vq_dir, grid.clip_dir, grid.latent_shape)
            self.model = pipeline_model(**parts).to(self.device)
        self.model.unet.load_state_dict(weights)
        requests = [GenerationRequest(prompt, grid.seed + i, grid.guidance_scale) for i, prompt in enumerate(grid.prompts)]
        array = self.model.grid(requests, grid.steps, "ddim")
        self.logger.client.log_image(self.logger.run_id, array, artifact_file=f"samples/step_{step:06d}.png")
        print(f"[ldm] sample grid of step {step} logged to MLflow as samples/step_{step:06d}.png "
              f"({time.perf_counter() - start:.1f}s)", flush=True)
