"""Exponential moving average of the UNet weights: what the samples and the registered model use."""

from __future__ import annotations

import torch


class EMA:
    """The EMA of the UNet weights, in fp32 on the weights' device.

    Without ZeRO-3 every rank holds the whole model and rank 0 alone keeps the average. Under
    ZeRO-3 each rank holds one partition of every parameter (`param.ds_tensor`), and each keeps the
    average of its own partitions: the update is local, no parameter is gathered for it. The whole
    average is gathered only when it is read (`full_weights`: checkpoints, grids, the export), a
    collective every rank calls. Buffers are not partitioned; rank 0 keeps theirs.
    """

    def __init__(self, engine, decay: float, rank: int, zero3: bool):
        self.decay, self.rank, self.zero3 = decay, rank, zero3
        self.shadow: dict[str, torch.Tensor] = {}
        """name -> the average of what this rank holds: whole tensors, or under ZeRO-3 its partitions."""
        self.shapes: dict[str, torch.Size] = {}
        """Under ZeRO-3: name -> the parameter's full shape."""
        with torch.no_grad():
            for name, value in self._held(engine).items():
                self.shadow[name] = value.detach().float().clone()

    def _held(self, engine) -> dict[str, torch.Tensor]:
        """What this rank averages: its partitions under ZeRO-3 (and rank 0 the buffers), else
        rank 0 the whole module and the other ranks nothing."""
        module = engine.module
        if not self.zero3:
            return {**dict(module.named_parameters()), **dict(module.named_buffers())} if self.rank == 0 else {}
        held = {}
        for name, param in module.named_parameters():
            held[name] = param.ds_tensor
            self.shapes[name] = param.ds_shape
        if self.rank == 0:
            held.update(dict(module.named_buffers()))
        return held

    @property
    def keep(self) -> bool:
        """Whether this rank ends up with the whole average (`full_weights` returns it here)."""
        return self.rank == 0

    @torch.no_grad()
    def update(self, engine) -> None:
        averaged, values = [], []
        for name, value in self._held(engine).items():
            if value.is_floating_point():
                averaged.append(self.shadow[name])
                values.append(value.detach().float())
            else:
                self.shadow[name].copy_(value)
        if averaged:  # one kernel over all of them, as torch's own swa_utils does
            torch._foreach_lerp_(averaged, values, 1 - self.decay)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The whole average on the CPU, contiguous, on rank 0 ({} on the others). Under ZeRO-3 a
        collective: every rank must call it, and its partitions travel in one all-gather."""
        if not self.zero3:
            return {k: v.detach().to("cpu").contiguous() for k, v in self.shadow.items()}
        import torch.distributed as dist

        names = list(self.shapes)
        flat = torch.cat([self.shadow[name] for name in names])  # this rank's partitions, end to end
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        if self.rank != 0:
            return {}
        weights, offset = {}, 0
        for name in names:
            size = self.shadow[name].numel()  # every rank's partition of a parameter has this size
            parts = [part[offset:offset + size] for part in gathered]
            weights[name] = whole_from_partitions(parts, self.shapes[name]).cpu()
            offset += size
        weights.update({k: v.detach().cpu().contiguous() for k, v in self.shadow.items() if k not in self.shapes})
        return weights

    @torch.no_grad()
    def load_full(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the average from a whole one (`full_weights` of any world size): under ZeRO-3 every
        rank takes its partitions of it, else rank 0 keeps it."""
        for name, shadow in self.shadow.items():
            value = weights[name].to(device=shadow.device, dtype=torch.float32)
            if name in self.shapes:
                value = partition_of(value, self.rank, shadow.numel())
            shadow.copy_(value.view_as(shadow))


def partition_of(whole: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 partition of a parameter: elements [rank * size, (rank + 1) * size) of
    it flattened and zero-padded to a multiple of `size` (DeepSpeed's `_partition_param` layout)."""
    flat = whole.flatten()
    flat = torch.cat([flat, flat.new_zeros(max(0, size * (rank + 1) - flat.numel()))])
    return flat[size * rank:size * (rank + 1)]


def whole_from_partitions(parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The inverse of `partition_of` over every rank's partition, in rank order (padding cut)."""
    numel = 1
    for dim in shape:
        numel *= dim
    return torch.cat(parts)[:numel].view(shape).contiguous()
