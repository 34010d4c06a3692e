"""Whether a training step is healthy, agreed by every rank: finite losses, finite weights, the gradient norm."""

from __future__ import annotations

import torch


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Sum `values` over the ranks: one small all-reduce on the engine's device (NCCL needs a GPU tensor)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def weights_finite(engine, device: torch.device) -> bool:
    """Whether every rank's (partition of the) weights is finite."""
    local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters())
    return sum_over_ranks([0.0 if local else 1.0], device)[0] == 0


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else None
