"""The ldm stage's input: the latent dataset, read by each training worker from its Parquet files,
in one global order that does not depend on the number of workers.

The encode stage writes the latents on storage every node reads (the shared workdir). Each worker
reads them itself, so nothing it needs lives in Ray's object store: when a node is lost, the
restarted workers read the files again and need no CPU beyond the ones they hold (materialised
blocks would die with the node, and re-reading them needs a free CPU the workers hold).

Order: global step s (counting from 0) trains on global batch s, the rows
`permutation(epoch)[j * G:(j + 1) * G]` with `epoch = s // steps_per_epoch`, `j = s % steps_per_epoch`
and G the global batch (micro batch x workers x gradient accumulation). Micro-batch m of rank r
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
    """The latent dataset's training columns, held in this worker's memory as numpy arrays."""

    def __init__(self, data_dir: str):
        import pyarrow.parquet as pq

        import ray.data  # noqa: F401 - registers the tensor extension types the columns are stored as

        table = pq.read_table(parquet_files(data_dir), columns=LATENT_COLUMNS)
        self.columns = {name: table.column(name).combine_chunks().to_numpy() for name in LATENT_COLUMNS}
        self.rows = table.num_rows

    def batch(self, rows: np.ndarray, device: torch.device, latent_scale: float) -> tuple[torch.Tensor, Conditioning]:
        """Scaled latents x0 (B, C, H, W) and their text conditions for the given row indices."""
        c = self.columns
        x0 = torch.from_numpy(c["latent"][rows]).to(device).float() * latent_scale
        cond = Conditioning(torch.from_numpy(c["tokens"][rows]), torch.from_numpy(c["mask"][rows]),
                            torch.from_numpy(c["pooled"][rows]))
        return x0, cond.to(device, torch.float32)


@dataclass(frozen=True)
class GlobalOrder:
    """Which rows each optimizer step trains on, the same for every number of workers."""

    rows: int
    global_batch: int
    seed: int

    def __post_init__(self):
        if self.global_batch > self.rows:
            raise ValueError(f"a global batch of {self.global_batch} needs at least that many latents, got {self.rows}")

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.rows, self.seed, epoch)

    def step_rows(self, step: int) -> np.ndarray:
        """The global batch of step `step` (counting from 0): G row indices."""
        j = step % self.steps_per_epoch
        return self.permutation(self.epoch_of(step))[j * self.global_batch:(j + 1) * self.global_batch]

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
        self.order = GlobalOrder(self.table.rows, loop.global_batch(world), loop.seed)

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
