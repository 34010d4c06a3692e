"""Ray Data reading of WebDataset shards into decoded, resized images with clean captions.

The first step of the vq, clip and encode stages: shards -> rows {key, caption, image (S, S, 3)
uint8}. A Ray Data datasource reads each shard in its own task, streaming the tar, so one bad member
costs one sample, not a block, and rows come in blocks of hundreds rather than one by one (Ray's
`read_webdataset` makes a block per sample, which is slow for small images). Samples are split into
train and held-out by a hash of their key, so the split is the same in every stage and every run.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import unicodedata
from collections import Counter
from typing import Iterator

import numpy as np
import ray
from PIL import Image
from ray.data.block import BlockAccessor
from ray.data.datasource import FileBasedDatasource

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Rows per output block: large enough to amortise Ray's per-block cost, small enough to stream.
ROWS_PER_BLOCK = 256
# Decompression-bomb guard: refuse images with more pixels than this (PIL's own default limit).
MAX_IMAGE_PIXELS = 89_478_485


def clean_caption(text: str) -> str:
    """Unicode NFC, strip, collapse runs of whitespace."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def load_image(data: bytes, image_size: int) -> np.ndarray:
    """Decode image bytes, resize the shorter side to `image_size`, center-crop: (S, S, 3) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {img.width}x{img.height} pixels is over the limit")
        img = img.convert("RGB")
        w, h = img.size
        scale = image_size / min(w, h)
        new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        return np.asarray(img, dtype=np.uint8)


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic held-out membership from the sample key."""
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") / 2**32
    return bucket < fraction


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key is the path up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def iter_tar_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar and yield (key, {extension: bytes}) per group of consecutive members."""
    key, members = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, ext = _split_member_name(info.name)
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def decode_sample(members: dict[str, bytes], image_size: int) -> tuple[str, np.ndarray]:
    """(caption, image) from one sample's members; raises ValueError naming what is wrong."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise ValueError("no image member")
    if "txt" not in members:
        raise ValueError("no caption member")
    caption = clean_caption(members["txt"].decode("utf-8"))
    return caption, load_image(members[ext], image_size)


class ShardDatasource(FileBasedDatasource):
    """WebDataset tar shards -> blocks of {key, caption, image}; bad samples are skipped."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: list[str], image_size: int, **kwargs):
        super().__init__(paths, **kwargs)
        self.image_size = image_size

    def _read_stream(self, stream, path: str):
        rows: dict[str, list] = {"key": [], "caption": [], "image": []}
        skipped: Counter = Counter()
        samples = iter_tar_samples(stream)
        while True:
            try:
                key, members = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, OSError, EOFError):
                skipped["truncated_tar"] += 1
                break
            try:
                caption, image = decode_sample(members, self.image_size)
            except Exception:  # noqa: BLE001 - any undecodable sample costs that sample only
                skipped["bad_sample"] += 1
                continue
            rows["key"].append(key)
            rows["caption"].append(caption)
            rows["image"].append(image)
            if len(rows["key"]) >= ROWS_PER_BLOCK:
                yield _to_block(rows)
                rows = {"key": [], "caption": [], "image": []}
        if rows["key"]:
            yield _to_block(rows)


def _to_block(rows: dict[str, list]):
    return BlockAccessor.batch_to_block({
        "key": np.array(rows["key"], dtype=object),
        "caption": np.array(rows["caption"], dtype=object),
        "image": np.stack(rows["image"]),
    })


def read_captioned_images(shards: list[str], image_size: int, split: str | None = None,
                          heldout_fraction: float = 0.0) -> ray.data.Dataset:
    """Shards -> Ray Dataset of {key, caption, image}; `split` is None, "train" or "heldout"."""
    ds = ray.data.read_datasource(ShardDatasource(shards, image_size))
    if split is None:
        return ds
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
    return ds.map_batches(_select_split, batch_format="numpy",
                          fn_kwargs={"fraction": heldout_fraction, "heldout": split == "heldout"})


def _select_split(batch: dict, fraction: float, heldout: bool) -> dict:
    keep = np.array([is_heldout(str(k), fraction) == heldout for k in batch["key"]], dtype=bool)
    return {name: column[keep] for name, column in batch.items()}


def images_to_tensor(images) -> "torch.Tensor":
    """(B, H, W, 3) uint8 (numpy or torch) -> (B, 3, H, W) float in [-1, 1]."""
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
