"""Exponential moving average of the UNet weights: what the samples and the registered model use."""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """The EMA of the UNet weights, kept in fp32 on rank 0 (on the weights' device).

    Under ZeRO-3 each rank holds only a partition of every parameter, so reading the weights is a
    collective: every rank must call `update` (and the constructor), which gathers the full
    parameters for the moment of the update; only rank 0 (`keep=True`) keeps the average.
    """

    def __init__(self, engine, decay: float, keep: bool, zero3: bool):
        self.decay, self.keep, self.zero3 = decay, keep, zero3
        self.shadow: dict[str, torch.Tensor] = {}
        with self._full_weights(engine) as weights:
            if keep:
                self.shadow = {k: v.detach().float().clone() for k, v in weights.items()}

    @contextlib.contextmanager
    def _full_weights(self, engine):
        """The module's full weights by name; under ZeRO-3 gathered on every rank for the block."""
        module = engine.module
        weights = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        if not self.zero3:
            yield weights
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield weights

    @torch.no_grad()
    def update(self, engine) -> None:
        with self._full_weights(engine) as weights:
            if not self.keep:
                return
            for name, value in weights.items():
                shadow = self.shadow[name]
                if value.is_floating_point():
                    shadow.lerp_(value.detach().float(), 1 - self.decay)
                else:
                    shadow.copy_(value)

    def cpu_weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights on the CPU, contiguous (for safetensors and for sampling grids)."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.shadow.items()}
