"""Ray Data reading of WebDataset shards into decoded, resized images with clean captions.

The first step of the vq, clip and encode stages: shards -> rows {key, caption, image (S, S, 3)
uint8, or (h, w, 3) at the nearest aspect-ratio bucket for the encode stage, `pipeline.data.buckets`;
crop, the fraction of the image cut off}. A Ray Data datasource reads each shard in its own task,
streaming the tar and decoding each sample with `pipeline.data.decode`, so one bad member costs one
sample, not a block, and rows come in blocks of hundreds rather than one by one (Ray's
`read_webdataset` makes a block per sample, which is slow for small images). Samples are split into
train and held-out by a hash of their key, so the split is the same in every stage and every run.

Real shards have bad samples. `parse_shard` skips each one and counts it under one of
`SKIP_REASONS` (no sleeping, no retrying, no crash):

| reason | what |
|---|---|
| `corrupt_image` | a jpg/png/webp that starts like one but does not decode (e.g. cut short) |
| `zero_byte` | the image member is empty |
| `not_an_image` | the image member is not a JPEG, PNG or WebP (text, HTML, GIF, ...) |
| `too_many_pixels` | width x height over `data.max_image_pixels` (decompression bombs) |
| `missing_image` | a caption without an image member |
| `caption_not_utf8` | the `.txt` member is not valid UTF-8 |
| `missing_caption` | an image without a `.txt` member |
| `truncated_tar` | the shard ends early or is not a tar; once per shard (the samples read before the cut count as usual) |
| `out_of_order` | a sample whose members are not contiguous; once per sample, its fragments are dropped |
| `duplicate_key` | a key seen earlier in the same shard; each later occurrence is dropped |

An empty caption (empty or only whitespace) is not an error: it is an unconditional sample, kept
with caption "" and counted as `unconditional`. Duplicate keys are detected within a shard only
(shards are read in parallel; the same key in two shards gives two samples).
"""

from __future__ import annotations

import hashlib
import tarfile
import zlib
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import FileBasedDatasource

from pipeline.data.buckets import Size
from pipeline.data.decode import MAX_IMAGE_PIXELS, SKIP_REASONS, SampleError, decode_caption, load_fitted
from pipeline.data.images import ragged

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Rows per output block: large enough to amortise Ray's per-block cost, small enough to stream.
ROWS_PER_BLOCK = 256
class TruncatedTar(Exception):
    """The tar stream ended before its end-of-archive marker, or is not a tar."""


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


def iter_tar_groups(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar; yield (key, {extension: bytes}) per run of consecutive members of one key.

    A run ends where the key changes or an extension repeats. Directories and hidden files
    (`._name` from macOS tar) are ignored. Every group whose members were read completely is
    yielded; then, if the stream ended early (inside a member, inside a header, or without the
    end-of-archive block) or is not a tar at all, TruncatedTar is raised.
    """
    ended = {"clean": False}

    class _EndAwareTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
                ended["clean"] = True
                raise

    key, members = None, {}
    error: Exception | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndAwareTarInfo) as tar:
            for info in tar:
                tar.members = []  # stream mode keeps every TarInfo otherwise
                if not info.isfile():
                    continue
                member_key, ext = _split_member_name(info.name)
                if info.name.rsplit("/", 1)[-1].startswith("."):
                    continue
                data = tar.extractfile(info).read()
                if member_key != key or ext in members:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                members[ext] = data
    except (tarfile.TarError, EOFError, zlib.error) as err:  # not OSError: I/O errors fail the task
        error = err
    if key is not None:
        yield key, members
    if error is not None or not ended["clean"]:
        raise TruncatedTar(str(error) if error else "no end-of-archive marker")


def _missing_member(members: dict[str, bytes]) -> str | None:
    if not any(ext in members for ext in IMAGE_EXTENSIONS):
        return "missing_image"
    if "txt" not in members:
        return "missing_caption"
    return None


def image_sizes(image_size: int | list[Size]) -> list[Size]:
    """A square side or a list of (width, height) buckets -> the list of sizes images are fitted to."""
    if isinstance(image_size, int):
        return [(image_size, image_size)]
    return [tuple(size) for size in image_size]


def decode_sample(members: dict[str, bytes], image_size: int | list[Size],
                  max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, np.ndarray, float]:
    """(caption, image, crop fraction) from one sample's members; raises SampleError naming the reason.
    `image_size`: a square side, or the buckets (`load_fitted`)."""
    missing = _missing_member(members)
    if missing:
        raise SampleError(missing)
    ext = next(e for e in IMAGE_EXTENSIONS if e in members)
    caption = decode_caption(members["txt"])
    return (caption, *load_fitted(members[ext], image_sizes(image_size), max_pixels))


def new_counts() -> Counter:
    """Counts of one or more shards: `samples`, `unconditional`, `other_split` and every reason, all at 0."""
    return Counter({"samples": 0, "unconditional": 0, "other_split": 0, **{reason: 0 for reason in SKIP_REASONS}})


class InSplit:
    """Whether a sample key is in `split` ("train" or "heldout") at `fraction` held out (`is_heldout`);
    a class, not a closure, so that Ray can ship it to the read tasks."""

    def __init__(self, split: str, fraction: float):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
        self.heldout, self.fraction = split == "heldout", fraction

    def __call__(self, key: str) -> bool:
        return is_heldout(key, self.fraction) == self.heldout


def parse_shard(fileobj, image_size: int | list[Size], counts: Counter, max_pixels: int = MAX_IMAGE_PIXELS,
                keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str, np.ndarray, float]]:
    """Yield (key, caption, image, crop fraction) for every good sample of a tar stream, each key once.
    `image_size`: a square side, or the (width, height) buckets each image goes to the nearest of.
    `keep`: which keys to yield (a split, `InSplit`); the others are decoded all the same, so a bad
    sample is counted under its reason whichever split it is in.

    Adds to `counts`: `samples` (yielded), `unconditional` (yielded with an empty caption),
    `other_split` (good, but not kept) and one count per skipped sample under its reason
    (SKIP_REASONS), plus `truncated_tar` once if the stream ends early. A sample that is incomplete
    where its members end (no caption, no image) is only counted when the shard ends: if a later
    fragment of its key turns up it is `out_of_order`.
    """
    seen: dict[str, set[str]] = {}  # key -> extensions seen so far in this shard
    pending: dict[str, str] = {}  # incomplete samples: key -> reason, unless a fragment turns up
    fragmented: set[str] = set()  # keys already counted as out_of_order
    groups = iter_tar_groups(fileobj)
    while True:
        try:
            key, members = next(groups)
        except StopIteration:
            break
        except TruncatedTar:
            counts["truncated_tar"] += 1
            break
        extensions = set(members)
        if key in seen:
            if extensions & seen[key]:
                counts["duplicate_key"] += 1
            elif key not in fragmented:
                # The sample's members are not contiguous. Either its first part is still pending
                # (now counted here instead) or it was already decoded and this is a stray part.
                pending.pop(key, None)
                fragmented.add(key)
                counts["out_of_order"] += 1
            seen[key] |= extensions
            continue
        seen[key] = extensions
        missing = _missing_member(members)
        if missing:
            pending[key] = missing
            continue
        try:
            caption, image, crop = decode_sample(members, image_size, max_pixels)
        except SampleError as err:
            counts[err.reason] += 1
            continue
        if keep is not None and not keep(key):
            counts["other_split"] += 1
            continue
        counts["samples"] += 1
        if not caption:
            counts["unconditional"] += 1
        yield key, caption, image, crop
    for reason in pending.values():
        counts[reason] += 1


def write_shard_counts(counts_dir: str, shard: str, counts: dict) -> None:
    """Record one shard's counts as `<counts_dir>/<hash of the shard path>.json`, atomically.

    The side channel from the read tasks to the stage: a read task writes its shard's file only
    once it has read the shard to its end, and a retried task rewrites the same file, so each
    sample is counted exactly once however the reads are scheduled (the directory must be visible
    to every node, like the stage's Parquet output).
    """
    import json
    import os
    import uuid

    name = hashlib.sha1(shard.encode()).hexdigest()[:20]
    os.makedirs(counts_dir, exist_ok=True)
    temporary = os.path.join(counts_dir, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(temporary, "w") as handle:
        json.dump({"shard": shard, "counts": counts}, handle, sort_keys=True)
    os.replace(temporary, os.path.join(counts_dir, f"{name}.json"))


def read_shard_counts(counts_dir: str) -> dict[str, dict]:
    """{shard: counts} from the files `write_shard_counts` wrote."""
    import json
    from pathlib import Path

    records = [json.loads(path.read_text()) for path in sorted(Path(counts_dir).glob("*.json"))]
    return {record["shard"]: record["counts"] for record in records}


def sum_counts(per_shard) -> Counter:
    total = new_counts()
    for counts in per_shard:
        total.update(counts)
    return total


def counts_summary(counts: Counter | dict) -> dict:
    """{"samples", "unconditional", "other_split", "skipped": {reason: count for every reason}} from counts."""
    return {
        "samples": int(counts.get("samples", 0)),
        "unconditional": int(counts.get("unconditional", 0)),
        "other_split": int(counts.get("other_split", 0)),
        "skipped": {reason: int(counts.get(reason, 0)) for reason in SKIP_REASONS},
    }


class ShardDatasource(FileBasedDatasource):
    """WebDataset tar shards -> blocks of {key, caption, image, crop}; bad samples are skipped and
    counted. `image_size`: a square side, or (width, height) buckets (then a block's images may
    differ in size: Ray stores them as a variable-shaped tensor column).

    With `counts_dir`, each shard's counts (parse_shard) are written there when the shard has been
    read to its end (write_shard_counts). With `keep` (`InSplit`), only the samples of one split.
    """

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: list[str], image_size: int | list[Size], max_image_pixels: int = MAX_IMAGE_PIXELS,
                 counts_dir: str | None = None, keep: Callable[[str], bool] | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self.keep = keep
        self.image_size = image_size
        self.max_image_pixels = max_image_pixels
        self.counts_dir = counts_dir

    def _read_stream(self, stream, path: str):
        columns = ("key", "caption", "image", "crop")
        rows: dict[str, list] = {name: [] for name in columns}
        counts = new_counts()
        for sample in parse_shard(stream, self.image_size, counts, self.max_image_pixels, self.keep):
            for name, value in zip(columns, sample):
                rows[name].append(value)
            if len(rows["key"]) >= ROWS_PER_BLOCK:
                yield _to_block(rows)
                rows = {name: [] for name in columns}
        if rows["key"]:
            yield _to_block(rows)
        if self.counts_dir is not None:
            write_shard_counts(self.counts_dir, path, dict(counts))


def _to_block(rows: dict[str, list]):
    return BlockAccessor.batch_to_block({
        "key": np.array(rows["key"], dtype=object),
        "caption": np.array(rows["caption"], dtype=object),
        "image": ragged(rows["image"]),  # buckets: images of several sizes
        "crop": np.array(rows["crop"], dtype=np.float32),
    })


def read_captioned_images(shards: list[str], image_size: int | list[Size], split: str | None = None,
                          heldout_fraction: float = 0.0, max_image_pixels: int = MAX_IMAGE_PIXELS,
                          counts_dir: str | None = None) -> ray.data.Dataset:
    """Shards -> Ray Dataset of {key, caption, image, crop}; `split` is None (every sample), "train"
    or "heldout" (`heldout_fraction` of the keys, by hash: `is_heldout`). `image_size`: a square side (resize the shorter side, centre-crop), or (width, height) buckets.

    A shard listed twice is read once. `counts_dir`: where each shard's counts (parse_shard) are
    written once it has been read (write_shard_counts / read_shard_counts).
    """
    shards = list(dict.fromkeys(shards))
    keep = InSplit(split, heldout_fraction) if split is not None else None
    return ray.data.read_datasource(ShardDatasource(shards, image_size, max_image_pixels, counts_dir, keep))
