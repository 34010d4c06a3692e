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


def test_with_buckets_each_global_batch_is_of_one_bucket_and_an_epoch_sees_each_sample_at_most_once():
    """Three buckets of 30, 17 and 3 rows, G 8: 3 + 2 + 0 batches an epoch; every step one bucket,
    on any world size; the small bucket waits (fewer rows than a batch), the rest differ by epoch."""
    rng = np.random.default_rng(0)
    bucket_of_row = rng.permutation(np.repeat([0, 1, 2], [30, 17, 3]))
    order = GlobalOrder(50, GLOBAL_BATCH, seed=3, bucket_of_row=bucket_of_row)
    assert order.steps_per_epoch == 5 and order.batches_per_bucket.tolist() == [3, 2, 0]
    per_epoch = order.steps_per_epoch
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        rows = [[int(r) for r in order.step_rows(step)] for step in steps]
        assert all(len({int(bucket_of_row[r]) for r in batch}) == 1 for batch in rows)
        assert sorted(int(bucket_of_row[batch[0]]) for batch in rows) == [0, 0, 0, 1, 1]
        flat = [r for batch in rows for r in batch]
        assert len(set(flat)) == len(flat) == per_epoch * GLOBAL_BATCH
        assert rows_seen(order, steps, 2, 2) == rows_seen(order, steps, 1, 1) == flat  # same on any world size
    assert order.step_rows(0).tolist() != order.step_rows(per_epoch).tolist()
    resumed = GlobalOrder(50, GLOBAL_BATCH, seed=3, bucket_of_row=bucket_of_row)  # a restarted worker
    assert all(np.array_equal(resumed.step_rows(s), order.step_rows(s)) for s in range(3 * per_epoch))
    with pytest.raises(ValueError, match=r"in one bucket; the buckets hold \[30, 17, 3\]"):
        GlobalOrder(50, 32, seed=3, bucket_of_row=bucket_of_row)


def test_one_bucket_orders_as_the_permutation_cut_into_batches():
    order = GlobalOrder(ROWS, GLOBAL_BATCH, seed=3)
    bucketed = GlobalOrder(ROWS, GLOBAL_BATCH, seed=3, bucket_of_row=np.zeros(ROWS, dtype=int))
    for step in range(2 * order.steps_per_epoch):
        j = step % order.steps_per_epoch
        expected = order.permutation(order.epoch_of(step))[j * GLOBAL_BATCH:(j + 1) * GLOBAL_BATCH]
        assert np.array_equal(order.step_rows(step), expected)
        assert np.array_equal(bucketed.step_rows(step), expected)


def test_a_latent_table_of_several_shapes_gives_batches_of_one_shape(tmp_path, ray_session):
    """The encode stage's Parquet output with latents of two buckets (a variable-shaped column)."""
    import ray

    from pipeline.data.images import ragged
    from pipeline.training.latents import LatentTable

    shapes = [(4, 6, 12), (4, 12, 6), (4, 6, 12), (4, 6, 12), (4, 12, 6)]
    rows = {"latent": ragged([np.full(shape, i, np.float16) for i, shape in enumerate(shapes)]),
            "tokens": np.zeros((5, 3, 2), np.float16), "mask": np.ones((5, 3), bool),
            "pooled": np.arange(5, dtype=np.float16)[:, None].repeat(2, 1)}
    ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(5)]).write_parquet(str(tmp_path))
    table = LatentTable(str(tmp_path))
    assert table.rows == 5 and table.shapes == [(4, 12, 6), (4, 6, 12)]  # tall first
    tall = np.flatnonzero(table.bucket_of_row == 0)
    x0, cond = table.batch(tall, torch.device("cpu"), 1.0)
    assert x0.shape == (2, 4, 12, 6)
    assert sorted(x0[:, 0, 0, 0].tolist()) == sorted(cond.pooled[:, 0].tolist())  # rows stay together
