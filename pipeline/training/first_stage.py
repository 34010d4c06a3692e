"""The training loop of the small first-stage models (vq, clip), in the shape of Ray Train's examples.

A stage brings a `FirstStageFit`: how to build its model on a worker, the loss of one batch and
how to save the result. Everything else is the same for both and written once here: the typed loop
config, the optimizer and its warmup-cosine schedule, the epochs over the worker's dataset shard,
rank 0's progress line and MLflow metrics, and the final checkpoint reported to Ray Train.

A worker whose share of the training set fits in `IN_MEMORY_BYTES` (every CPU-sized data set, and
50,000 images up to about 400 px) reads it once and draws each epoch as a seeded permutation of
all of it: a full shuffle, without Ray Data re-streaming the set every epoch beside the trainer
(on the quality benchmark's emoji that streaming took a fifth of the vq stage's two cores, and its
128-row shuffle buffer left each epoch in nearly the order of the last). Larger shares stream.

    fit_small_model(VQFit, model_config, cfg.vq, ...)   # driver: one Ray Train fit, checkpoint -> out_dir
      -> first_stage_train_loop(config)                 # every worker
           setup_model_and_optimizer -> train_step per batch -> report_final_model
"""

from __future__ import annotations

import abc
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import ray.train
import torch
from ray.data.dataset import MaterializedDataset

from pipeline.ray_runtime import ProgressLine, fit
from pipeline.tracking import MetricLogger

IN_MEMORY_BYTES = 2 << 30
"""The largest share of the training set a worker holds in memory (see the module doc)."""


class FirstStageFit(abc.ABC):
    """A first-stage model as `first_stage_train_loop` trains it; built on every worker from the
    stage's `model_config` (rank, world size and device given).

    Subclasses set `name` and `weight_decay` and, in `__init__`, `self.model`: the module the
    optimizer steps, wrapped by `ray.train.torch.prepare_model`."""

    name = ""
    weight_decay = 0.01
    """AdamW's weight decay (torch's default)."""
    model: torch.nn.Module

    @abc.abstractmethod
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        """The loss of one numpy batch of the shard, the metrics to log beside it, and its image count."""

    def after_step(self) -> dict[str, float] | None:
        """Called after each optimizer step (e.g. to clamp a parameter, or to step a second model);
        may return more metrics of the step."""

    @abc.abstractmethod
    def save(self, directory: str) -> None:
        """Write the trained model into `directory` (rank 0, once, at the end)."""


@dataclass
class FirstStageLoopConfig:
    """What every worker of a first-stage fit is given (Ray ships it as a dict)."""

    fit_class: type[FirstStageFit]
    model_config: dict
    """The stage's own description of its model, handed to `fit_class`."""
    seed: int
    lr: float
    warmup_steps: int
    batch_size: int
    """Per worker."""
    max_steps: int
    threads: int
    """torch intra-op threads of each worker."""
    tracking_uri: str
    run_id: str | None
    """The stage's MLflow run, which rank 0 logs to; None logs nothing."""
    in_memory: bool = True
    """Each worker holds its share in memory and shuffles it whole every epoch; False streams it."""


def setup_model_and_optimizer(loop: FirstStageLoopConfig, rank: int, world_size: int):
    """The stage's model on this worker's device, AdamW and the warmup-cosine schedule."""
    import ray.train.torch

    torch.set_num_threads(loop.threads)
    torch.manual_seed(loop.seed + rank)
    model = loop.fit_class(loop.model_config, rank, world_size, ray.train.torch.get_device())
    optimizer = adamw(model.model.parameters(), loop.lr, model.weight_decay)
    return model, optimizer, warmup_cosine(optimizer, loop.warmup_steps, loop.max_steps)


def train_step(model: FirstStageFit, optimizer, scheduler, batch: dict) -> tuple[float, dict[str, float], int]:
    """One optimizer step on one batch; returns the loss, the stage's metrics and the image count."""
    loss, metrics, count = model.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    more = model.after_step()
    return loss.item(), {**metrics, **(more or {})}, count


def first_stage_train_loop(config: dict) -> None:
    """Ray Train worker loop: `train_step` over the 'train' shard for `max_steps`, then the model."""
    loop = FirstStageLoopConfig(**config)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model, optimizer, scheduler = setup_model_and_optimizer(loop, rank, ctx.get_world_size())
    logger = MetricLogger(loop.tracking_uri, loop.run_id) if rank == 0 and loop.run_id else None
    progress = ProgressLine(model.name, loop.max_steps)
    step = 0
    shard = ray.train.get_dataset_shard("train")
    batches = (shuffled_epochs(shard, loop.batch_size, loop.max_steps, loop.seed + rank) if loop.in_memory
               else batches_until(shard, loop.batch_size, loop.max_steps))
    for step, batch in batches:
        loss, metrics, count = train_step(model, optimizer, scheduler, batch)
        if rank == 0:
            shown = progress.update(step, count, loss=loss, **metrics)
            if logger:
                logger.log({"loss": loss, **metrics, "lr": scheduler.get_last_lr()[0], **shown}, step)
    if logger:
        logger.close()
    report_final_model(model.save, step)


def fit_small_model(fit_class: type[FirstStageFit], model_config: dict, section, *, seed: int, tracking_uri: str,
                    run_id: str | None, train_ds, out_dir: Path, workdir: str | Path) -> None:
    """Fit a first-stage model by its config section's training fields (`section` is a
    `pipeline.config.training.FirstStageTraining`: vq's or clip's) and copy its final checkpoint
    into `out_dir`.

    The training set is materialised first, so the trainers can hold every CPU of a small machine
    without starving Ray Data's read tasks.
    """
    if not isinstance(train_ds, MaterializedDataset):
        train_ds = train_ds.limit(section.max_train_images).materialize()
    name = fit_class.name
    loop = FirstStageLoopConfig(
        fit_class=fit_class, model_config=model_config, seed=seed, lr=section.lr, warmup_steps=section.warmup_steps,
        batch_size=fit_batch_size(train_ds.count(), section.batch_size, section.num_workers, name),
        max_steps=section.max_steps, threads=max(1, int(section.cpus_per_worker)), tracking_uri=tracking_uri,
        run_id=run_id, in_memory=(train_ds.size_bytes() or 0) <= IN_MEMORY_BYTES * section.num_workers,
    )
    result = fit(
        first_stage_train_loop, asdict(loop), name=f"{name}-{out_dir.name}",
        storage_path=Path(workdir) / "ray_results", num_workers=section.num_workers, use_gpu=section.use_gpu,
        datasets={"train": train_ds}, cpus_per_worker=section.cpus_per_worker,
    )
    copy_checkpoint(result, out_dir)


def fit_batch_size(rows: int, batch_size: int, workers: int, section: str) -> int:
    """The per-worker batch size for `rows` training samples split over `workers`.

    Batches are full (drop_last), so a worker whose share is smaller than the configured batch would
    never get one: on a small data set the batch shrinks to the share, and says so. Fewer samples
    than workers is an error naming the keys.
    """
    share = rows // max(1, workers)
    if share < 1:
        raise ValueError(f"{rows} training samples cannot be split over {section}.num_workers={workers} workers; "
                         f"use fewer workers or more data")
    if share < batch_size:
        print(f"[{section}] {section}.batch_size={batch_size} is more than each worker's {share} training samples "
              f"({rows} over {workers} workers): using batches of {share}", flush=True)
        return share
    return batch_size


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW as one fused kernel over all parameters, for every stage's fit (CPU and CUDA;
    torch's default on the CPU steps the tensors one by one). Its step alone, one thread, the two
    interleaved in one process: the tiny CLIP (7.2M parameters, 62 tensors) 10.3 ms against 53.9,
    the vq (0.6M, 52 tensors) 0.75 ms against 3.3; on the ldm's tiny UNet (1M parameters, batch 32
    of 4x8x8 latents) clipping and the step take 5.6 ms against 11.2 with `foreach=True`, the
    training step 1.07x as fast. DeepSpeed runs it under every ZeRO stage and precision (its
    bf16/fp16 wrappers step it on fp32 master weights)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup over `warmup_steps`, then cosine decay to zero at `total_steps` (step per batch)."""

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def shuffled_epochs(shard, batch_size: int, max_steps: int, seed: int) -> Iterator[tuple[int, dict]]:
    """Yield (step, numpy batch) until max_steps from a Ray Train dataset shard read into memory
    once: every epoch a permutation of all of it (drawn from `seed`), in full batches."""
    parts = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
    rows = {name: np.concatenate([part[name] for part in parts]) for name in (parts[0] if parts else {})}
    count = len(next(iter(rows.values()))) if rows else 0
    if count < batch_size:
        raise RuntimeError(f"this worker's dataset shard holds no full batch of {batch_size} samples ({count} rows)")
    rng, step = np.random.default_rng(seed), 0
    while True:
        order = rng.permutation(count)
        for start in range(0, count - batch_size + 1, batch_size):
            step += 1
            yield step, {name: column[order[start:start + batch_size]] for name, column in rows.items()}
            if step >= max_steps:
                return


def batches_until(shard, batch_size: int, max_steps: int):
    """Yield (step, numpy batch) from a Ray Train dataset shard, epoch after epoch, until max_steps,
    streamed (shares too large for memory: shuffled only within a local buffer)."""
    step = 0
    while step < max_steps:
        epoch_start = step
        for batch in shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * batch_size):
            step += 1
            yield step, batch
            if step >= max_steps:
                return
        if step == epoch_start:  # would loop forever
            raise RuntimeError(f"this worker's dataset shard holds no full batch of {batch_size} samples")


def report_final_model(save: Callable[[str], None], step: int) -> None:
    """Every rank reports once; rank 0 attaches a checkpoint written by `save(directory)`."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": step}, checkpoint=checkpoint)


def copy_checkpoint(result: ray.train.Result, dest: str | Path) -> None:
    """Copy the files of the run's latest checkpoint into `dest`."""
    if result.checkpoint is None:
        raise RuntimeError(f"training run {result.path} reported no checkpoint")
    with result.checkpoint.as_directory() as src:
        shutil.copytree(src, dest, dirs_exist_ok=True)
