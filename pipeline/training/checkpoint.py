"""The ldm stage's checkpoints and its exported UNet.

A checkpoint directory holds DeepSpeed's state from every rank (weights, optimizer, LR schedule),
and on rank 0 the whole EMA (of any world size's partitions: every world size can load it) and
`progress.json` (the step, counters, the world size that wrote it). DeepSpeed's ZeRO-1/2/3 state is
partitioned by the ranks that wrote it: resumed at another world size, it is first converted by
DeepSpeed's own tool (`ds_to_universal`) into a universal checkpoint, which any world size loads. The
position in the data is the step: the global order (`pipeline.training.latents`) says what comes next,
and each sample's randomness is a function of the step, so no generator state is kept.
The exported UNet is the served artefact: its constructor arguments and the EMA weights, no pickles.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from safetensors.torch import load_file, save_file

from pipeline.training.ema import EMA

PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.safetensors"
DEEPSPEED_TAG = "deepspeed"


def save_checkpoint(engine, ema: EMA, progress: dict, directory: str) -> dict:
    """DeepSpeed state on every rank; the EMA and progress on rank 0. Every rank calls it
    (DeepSpeed's save and, under ZeRO-3, the EMA's gather are collectives). Returns the whole EMA
    it gathered (rank 0; {} elsewhere), for an export of the same step."""
    engine.save_checkpoint(directory, tag=DEEPSPEED_TAG)
    weights = ema.full_weights()
    if ema.keep:
        save_file(weights, os.path.join(directory, EMA_FILE))
        with open(os.path.join(directory, PROGRESS_FILE), "w") as f:
            json.dump(progress, f)
    return weights


def load_checkpoint(engine, ema: EMA, directory: str, universal_dir: str | None = None) -> None:
    """Restore DeepSpeed's state and the EMA (at this run's world size, whichever wrote them):
    DeepSpeed's from `universal_dir` when given (`to_universal`; the engine built to load it)."""
    engine.load_checkpoint(universal_dir or directory, tag=DEEPSPEED_TAG)
    if ema.shadow:  # rank 0, or under ZeRO-3 every rank (its partitions)
        ema.load_full(load_file(os.path.join(directory, EMA_FILE)))


@contextlib.contextmanager
def made_once_per_node(kind: str, key: str, node_rank: int, local_rank: int, make: Callable[[str], object],
                       barrier: Callable[[], object]) -> Iterator[str]:
    """A directory of this node's temporary space, made by `make(path)` on the node's local rank 0
    while the node's other ranks wait at `barrier` (every rank calls it); removed once every rank is
    done with it. `kind` and `key` name it (with the node's rank: nodes may share a file system)."""
    out = Path(tempfile.gettempdir()) / f"ldm-{kind}" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}-node{node_rank}"
    if local_rank == 0:
        shutil.rmtree(out, ignore_errors=True)  # a copy a crashed attempt left
        make(str(out))
    barrier()
    try:
        yield str(out)
    finally:
        barrier()
        if local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def checkpoint_directory(checkpoint, node_rank: int, local_rank: int, barrier: Callable[[], object]) -> Iterator[str]:
    """A Ray Train checkpoint as a local directory for every rank: its own path on a local file
    system, else downloaded once per node (`made_once_per_node`). Not Ray's `Checkpoint.as_directory`:
    there a rank that comes to the node's copy after another has downloaded it downloads it again,
    in place, over files that rank may be reading (a resume on a node of several workers then
    fails with "PytorchStreamReader failed reading file")."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with made_once_per_node("checkpoint", checkpoint.path, node_rank, local_rank, checkpoint.to_directory,
                            barrier) as directory:
        yield directory


def to_universal(directory: str, out: str, workers: int = 1) -> float:
    """Convert the DeepSpeed state of the checkpoint in `directory` (ZeRO-partitioned by the ranks
    that wrote it) into a universal checkpoint in `out` with DeepSpeed's `ds_to_universal`, using
    `workers` processes; returns the seconds it took. Its step-by-step output is shown only if it fails."""
    from deepspeed.checkpoint import ds_to_universal

    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=os.path.join(directory, DEEPSPEED_TAG),
                              output_folder=os.path.join(out, DEEPSPEED_TAG), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our checkpoints do not record DeepSpeed's universal info
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:
        raise RuntimeError(f"DeepSpeed's ds_to_universal could not convert the checkpoint in {directory} "
                           f"({type(e).__name__}: {e}); its output ends:\n{log.getvalue()[-2000:]}") from e
    return time.perf_counter() - start


def checkpoint_progress(checkpoint) -> dict:
    """The progress record of a Ray Train checkpoint, read from its storage without copying the rest."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{PROGRESS_FILE}") as f:
        return json.loads(f.read())


def read_progress(directory: str) -> dict:
    """The progress record of a checkpoint: step, counters, the world sizes it was trained at."""
    with open(os.path.join(directory, PROGRESS_FILE)) as f:
        return json.load(f)


def export_unet(unet_cfg: dict, weights: dict, directory: str) -> None:
    """The served artefact: the UNet's constructor arguments and its (EMA) weights."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "unet.json").write_text(json.dumps(unet_cfg, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "unet.safetensors"))


def count_parameters(safetensors_path: str | Path) -> int:
    """Elements in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(safetensors_path), framework="pt") as f:
        total = 0
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            n = 1
            for dim in shape:
                n *= dim
            total += n
    return total
