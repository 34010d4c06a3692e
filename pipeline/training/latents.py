"""The ldm stage's input: the latent dataset, read by each training worker from its Parquet files,
in one global order that does not depend on the number of workers.

The encode stage writes the latents on storage every node reads (the shared workdir). Each worker
reads them itself, so nothing it needs lives in Ray's object store: when a node is lost, the
restarted workers read the files again and need no CPU beyond the ones they hold (materialised
blocks would die with the node, and re-reading them needs a free CPU the workers hold).

Order: global step s (counting from 0) trains on global batch s, the rows
`permutation(epoch)[j * G:(j + 1) * G]` with `epoch = s // steps_per_epoch`, `j = s % steps_per_epoch`
and G the global batch (micro batch x workers x gradient accumulation); with aspect-ratio buckets,
each bucket's rows in the permutation's order, cut into global batches (`GlobalOrder`). Micro-batch m of rank r
in that step is slice `m * world + r` of it. A resumed run, on any number of workers with the same
global batch, trains on the same samples in the same order, and with the same randomness: what a
sample gets (its conditioning dropout, timestep and noise) is drawn from a generator of its own,
seeded by the step, its position in the global batch and the try (`SampleRandomness`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.conditioning import Conditioning

LATENT_COLUMNS = ["latent", "tokens", "mask", "pooled"]


def parquet_files(data_dir: str) -> list[str]:
    """The Parquet files of a latent dataset directory (local or any pyarrow filesystem URI), sorted."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(data_dir) if "://" in data_dir else (pafs.LocalFileSystem(), data_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(info.path for info in infos if info.type == pafs.FileType.File and info.path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in the latent dataset {data_dir}")
    return files if "://" not in data_dir else [f"{data_dir.split('://')[0]}://{f}" for f in files]


class LatentTable:
    """The latent dataset's training columns, held in this worker's memory as numpy arrays.

    Latents of several aspect-ratio buckets (shapes) are kept per row; `bucket_of_row` numbers each
    row's shape (in the order of `shapes`), so a batch can be drawn from one bucket."""

    def __init__(self, data_dir: str):
        import pyarrow.parquet as pq

        import ray.data  # noqa: F401 - registers the tensor extension types the columns are stored as

        # File by file: a file whose latents share one shape stores them as a fixed-shape column,
        # one with several as a variable-shaped one.
        parts = [pq.read_table(path, columns=LATENT_COLUMNS) for path in parquet_files(data_dir)]
        self.columns = {name: np.concatenate([part.column(name).combine_chunks().to_numpy() for part in parts])
                        for name in LATENT_COLUMNS if name != "latent"}
        latents = [part.column("latent").combine_chunks().to_numpy(zero_copy_only=False) for part in parts]
        self.rows = sum(len(part) for part in latents)
        if all(part.dtype != object for part in latents) and len({part.shape[1:] for part in latents}) == 1:
            self.columns["latent"] = np.concatenate(latents)  # one shape: one dense array
            self.shapes = [tuple(latents[0].shape[1:])]
            self.bucket_of_row = np.zeros(self.rows, dtype=np.int64)
        else:
            column = np.empty(self.rows, dtype=object)
            column[:] = [row for part in latents for row in part]
            self.columns["latent"] = column
            row_shapes = [row.shape for row in column]
            self.shapes = sorted(set(row_shapes), key=lambda shape: (shape[2] / shape[1], shape))
            index = {shape: i for i, shape in enumerate(self.shapes)}
            self.bucket_of_row = np.array([index[shape] for shape in row_shapes], dtype=np.int64)

    def batch(self, rows: np.ndarray, device: torch.device, latent_scale: float) -> tuple[torch.Tensor, Conditioning]:
        """Scaled latents x0 (B, C, H, W) and their text conditions for the given row indices (of one bucket)."""
        c = self.columns
        latents = c["latent"][rows]
        if latents.dtype == object:
            latents = np.stack(list(latents))
        x0 = torch.from_numpy(latents).to(device).float() * latent_scale
        cond = Conditioning(torch.from_numpy(c["tokens"][rows]), torch.from_numpy(c["mask"][rows]),
                            torch.from_numpy(c["pooled"][rows]))
        return x0, cond.to(device, torch.float32)


class GlobalOrder:
    """Which rows each optimizer step trains on, the same for every number of workers.

    With aspect-ratio buckets (`bucket_of_row`), every global batch comes from one bucket: each
    bucket's rows are taken in the order they have in the epoch's permutation, cut into global
    batches (a bucket's last incomplete batch waits for another epoch, with another permutation),
    and the batches of all buckets are trained in the order of their first row's place in the
    permutation, so each bucket's batches are spread over the epoch. With one bucket this is the
    permutation cut into global batches.
    """

    def __init__(self, rows: int, global_batch: int, seed: int, bucket_of_row: np.ndarray | None = None):
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        self.bucket_of_row = None if bucket_of_row is None else np.asarray(bucket_of_row)
        counts = np.bincount(self.bucket_of_row) if self.bucket_of_row is not None else np.array([rows])
        self.batches_per_bucket = counts // global_batch
        if not self.batches_per_bucket.sum():
            where = "" if len(counts) == 1 else f" (in one bucket; the buckets hold {counts.tolist()})"
            raise ValueError(f"a global batch of {global_batch} needs at least that many latents{where}, got "
                             f"{rows if len(counts) == 1 else int(counts.max())}")
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return int(self.batches_per_bucket.sum())

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.rows, self.seed, epoch)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches of an epoch, in training order."""
        if self._epoch is None or self._epoch[0] != epoch:
            order, g = self.permutation(epoch), self.global_batch
            if self.bucket_of_row is None:
                batches = [order[j * g:(j + 1) * g] for j in range(self.steps_per_epoch)]
            else:
                buckets, placed = self.bucket_of_row[order], []
                for bucket, count in enumerate(self.batches_per_bucket):
                    where = np.flatnonzero(buckets == bucket)  # its rows' places in the permutation
                    placed += [(where[j * g], order[where[j * g:(j + 1) * g]]) for j in range(count)]
                batches = [rows for _, rows in sorted(placed, key=lambda item: item[0])]
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def step_rows(self, step: int) -> np.ndarray:
        """The global batch of step `step` (counting from 0): G row indices."""
        return self.batches(self.epoch_of(step))[step % self.steps_per_epoch]

    def micro_batch(self, step: int, micro: int, rank: int, world: int, size: int) -> np.ndarray:
        """Rank `rank`'s micro-batch `micro` (of `size` rows) of step `step`: slice micro * world + rank."""
        where = positions(micro, rank, world, size)
        if where.stop > self.global_batch:
            raise ValueError(f"micro-batch {micro} of rank {rank}/{world} ({size} rows) is outside the global batch "
                             f"of {self.global_batch}")
        return self.step_rows(step)[where.start:where.stop]


@dataclass
class SampleRandomness:
    """What each sample of a micro-batch draws, from its own generator: a Uniform(0, 1) for the
    conditioning dropout, then its timestep, then its noise (in that order)."""

    uniform: torch.Tensor
    """(B,)"""
    t: torch.Tensor
    """(B,) int64 in [0, num_timesteps)"""
    noise: torch.Tensor
    """(B, *latent shape)"""

    @classmethod
    def draw(cls, seed: int, step: int, attempt: int, positions: range, latent_shape, num_timesteps: int,
             device: torch.device) -> "SampleRandomness":
        """For the samples at `positions` of step `step`'s global batch, at try `attempt` (a
        non-finite loss retries the step with new randomness): the same on any world size."""
        uniform, t, noise = [], [], []
        for position in positions:
            state = np.random.SeedSequence([seed, step, attempt, position]).generate_state(2, np.uint32)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            uniform.append(torch.rand(1, generator=gen))
            t.append(torch.randint(0, num_timesteps, (1,), generator=gen))
            noise.append(torch.randn((1, *latent_shape), generator=gen))
        return cls(torch.cat(uniform), torch.cat(t).to(device), torch.cat(noise).to(device))


def positions(micro: int, rank: int, world: int, size: int) -> range:
    """The positions in its step's global batch of rank `rank`'s micro-batch `micro` (see `GlobalOrder`)."""
    k = micro * world + rank
    return range(k * size, (k + 1) * size)


@functools.lru_cache(maxsize=2)  # every step of an epoch reads the same one
def _permutation(rows: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(rows)
    order.flags.writeable = False
    return order


class TableBatches:
    """Micro-batches from the latent table in this worker's memory, in the global order."""

    def __init__(self, loop, rank: int, world: int, device: torch.device):
        self.loop, self.rank, self.world, self.device = loop, rank, world, device
        self.table = LatentTable(str(Path(loop.latents_dir) / "data"))
        buckets = self.table.bucket_of_row if len(self.table.shapes) > 1 else None
        self.order = GlobalOrder(self.table.rows, loop.global_batch(world), loop.seed, buckets)

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, Conditioning]:
        rows = self.order.micro_batch(step, micro, self.rank, self.world, self.loop.batch_size)
        return self.table.batch(rows, self.device, self.loop.latent_scale)


class StreamBatches:
    """`ldm.stream_latents`: this worker's part of Ray Data's streaming split, epoch after epoch.
    A resumed run continues at the right step, but not with the batches it would have had."""

    def __init__(self, loop, rank: int, world: int, device: torch.device):
        import ray.train

        self.loop, self.device = loop, device
        self.shard = ray.train.get_dataset_shard("train")
        self.epoch, self.batches = 0, iter(())

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, Conditioning]:
        for _ in range(2):
            for batch in self.batches:
                x0 = batch["latent"].to(self.device).float() * self.loop.latent_scale
                cond = Conditioning(batch["tokens"], batch["mask"].bool(), batch["pooled"])
                return x0, cond.to(self.device, torch.float32)
            self.batches = iter(self.shard.iter_torch_batches(
                batch_size=self.loop.batch_size, drop_last=True, local_shuffle_buffer_size=8 * self.loop.batch_size,
                local_shuffle_seed=self.loop.seed + 1000 * self.epoch))
            self.epoch += 1
        raise RuntimeError(f"this worker's part of the streamed latents holds no full batch of {self.loop.batch_size}")
