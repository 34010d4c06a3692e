"""The ldm stage's data order and per-sample randomness: defined globally, the same for every world size."""

import numpy as np
import pytest
import torch

from pipeline.training.latents import GlobalOrder, SampleRandomness, positions

ROWS, GLOBAL_BATCH = 50, 8  # 6 steps an epoch; 2 rows left out of each epoch


def rows_seen(order: GlobalOrder, steps: range, world: int, accum: int) -> list[int]:
    size = GLOBAL_BATCH // (world * accum)
    return [int(row) for step in steps for micro in range(accum) for rank in range(world)
            for row in order.micro_batch(step, micro, rank, world, size)]


@pytest.mark.parametrize("layouts", [[(1, 1), (2, 1)], [(2, 1), (1, 1)], [(1, 1), (4, 2), (2, 2)]])
def test_an_epoch_sees_each_of_its_samples_once_whatever_the_world_sizes_along_it(layouts):
    """(world, grad_accum) changing every few steps, as resumes on other clusters would: each epoch
    trains on its permutation's first steps x G rows, none twice, in the same steps as one layout."""
    order = GlobalOrder(ROWS, GLOBAL_BATCH, seed=3)
    per_epoch = order.steps_per_epoch
    changes = np.linspace(0, 2 * per_epoch, len(layouts) + 1).astype(int)  # two epochs, split among layouts
    seen = []
    for (world, accum), start, stop in zip(layouts, changes[:-1], changes[1:]):
        seen += rows_seen(order, range(start, stop), world, accum)
    for epoch in range(2):
        rows = seen[epoch * per_epoch * GLOBAL_BATCH:(epoch + 1) * per_epoch * GLOBAL_BATCH]
        assert len(set(rows)) == len(rows) == per_epoch * GLOBAL_BATCH
        assert set(rows) == set(order.permutation(epoch)[:per_epoch * GLOBAL_BATCH].tolist())
        assert sorted(rows) == sorted(rows_seen(order, range(epoch * per_epoch, (epoch + 1) * per_epoch), 1, 1))
    assert set(order.permutation(0)[:per_epoch * GLOBAL_BATCH]) != set(order.permutation(1)[:per_epoch * GLOBAL_BATCH])


def test_a_sample_draws_the_same_dropout_timestep_and_noise_on_any_world_size():
    def drawn(world, rank, size, micro=0, step=7, attempt=0):
        return SampleRandomness.draw(0, step, attempt, positions(micro, rank, world, size), (4, 2, 2), 1000,
                                     torch.device("cpu"))

    whole = drawn(1, 0, GLOBAL_BATCH)
    halves = [drawn(2, rank, GLOBAL_BATCH // 2) for rank in range(2)]
    quarters = [drawn(2, rank, GLOBAL_BATCH // 4, micro) for micro in range(2) for rank in range(2)]
    for parts in (halves, quarters):
        for field in ("uniform", "t", "noise"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field)), field
    assert not torch.equal(drawn(1, 0, GLOBAL_BATCH, step=8).noise, whole.noise)
    assert not torch.equal(drawn(1, 0, GLOBAL_BATCH, attempt=1).noise, whole.noise)  # a retry draws anew
    assert whole.t.min() >= 0 and whole.t.max() < 1000 and len(set(whole.t.tolist())) > 1
