"""The ldm stage's EMA under ZeRO-3: each rank averages its own partitions, gathered only to read."""


import pytest
import torch

from pipeline.training.ema import partition_of, whole_from_partitions


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(7,), (4, 3, 3), (5, 2)])
def test_partitions_of_any_world_size_rebuild_the_whole_tensor(world, shape):
    """A checkpoint's EMA is whole; a run at another world size takes its own partitions of it."""
    whole = torch.randn(shape)
    size = -(-whole.numel() // world)  # DeepSpeed pads each parameter to a multiple of the world size
    parts = [partition_of(whole, rank, size) for rank in range(world)]
    assert all(p.numel() == size for p in parts)
    assert torch.equal(whole_from_partitions(parts, torch.Size(shape)), whole)
    assert torch.equal(torch.cat(parts)[whole.numel():], torch.zeros(size * world - whole.numel()))


@pytest.mark.slow
def test_the_sharded_ema_equals_the_gathered_one_under_zero3(ray_session, tmp_path):
    """Two ZeRO-3 workers; both EMAs from the same start, updated alike for a few steps: the
    sharded one (no gather per step) is the whole-model one to 1e-6."""
    from pipeline.benchmarks.ema import parse_args, run

    args = parse_args(["--workers", "2", "--steps", "2", "--block", "1", "--compare-steps", "4", "--batch", "2"])
    metrics = run(args, str(tmp_path))
    assert metrics["params"] > 10**6  # the whole tiny UNet came back, not a partition
    assert metrics["max_abs_diff"] <= 1e-6
