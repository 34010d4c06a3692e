"""The vq and clip stages' batches: a share that fits in memory is read once and shuffled whole each
epoch (every sample once per epoch, a new order each time, the same for the same seed)."""

import numpy as np
import pytest
import ray

from pipeline.training.first_stage import shuffled_epochs


def shard(rows: int):
    """A Ray Data iterator over `rows` samples, as a worker's dataset shard is."""
    return ray.data.from_items([{"id": i, "image": np.full((2, 2, 3), i, np.uint8)} for i in range(rows)]).iterator()


def test_each_epoch_is_a_new_permutation_of_the_whole_shard_in_full_batches(ray_session):
    batches = list(shuffled_epochs(shard(50), batch_size=8, max_steps=18, seed=3))
    assert [step for step, _ in batches] == list(range(1, 19))  # stops at max_steps
    assert all(len(batch["id"]) == 8 for _, batch in batches)
    assert all((batch["image"][:, 0, 0, 0] == batch["id"]).all() for _, batch in batches)  # columns stay aligned
    epochs = [np.concatenate([b["id"] for _, b in batches[i:i + 6]]) for i in (0, 6, 12)]  # 6 full batches of 50
    for ids in epochs:
        assert len(set(ids.tolist())) == 48  # no sample twice in an epoch; 2 wait for the next
    assert not np.array_equal(epochs[0], epochs[1])  # shuffled anew, not the last epoch's order
    # Far from the stored order (a small shuffle buffer would keep neighbours together).
    assert np.corrcoef(epochs[0], np.arange(48))[0, 1] < 0.5
    again = list(shuffled_epochs(shard(50), batch_size=8, max_steps=18, seed=3))
    assert all(np.array_equal(a["id"], b["id"]) for (_, a), (_, b) in zip(batches, again))


def test_a_shard_smaller_than_a_batch_is_an_error_not_a_loop(ray_session):
    with pytest.raises(RuntimeError, match="no full batch of 8 samples"):
        next(shuffled_epochs(shard(5), batch_size=8, max_steps=3, seed=0))
