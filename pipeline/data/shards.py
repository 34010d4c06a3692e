"""WebDataset shards in the img2dataset layout: writing them.

This is where data enters the flow. Users arrive with shards (or with a folder of images and a
captions file, which `folder_to_shards` turns into shards); the demo writes its own with
`write_demo_shards`. Finding them from `data.shards` (local paths, globs, brace patterns, object
store URLs) is `pipeline.data.locate`.

Layout per sample: `<key>.jpg|.png|.webp` (the image, in its original encoding), `<key>.txt` (the
caption, UTF-8), optionally `<key>.json` (metadata). Shards are `00000.tar, 00001.tar, ...`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.demo import demo_sample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# `.jpeg` members are stored as `.jpg`: same bytes, and `.jpg` is the name every WebDataset reader
# (Ray Data's default decoder included) recognises.
_MEMBER_EXTENSION = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Fixed member metadata, so the same samples always give byte-identical shards (stage caches hash
# their inputs, and a timestamp would change the hash on every rewrite).
_MEMBER_MTIME = 0
_MEMBER_MODE = 0o444

ShardSample = tuple[str, "bytes | Image.Image", str, str, "dict[str, Any] | None"]


def _encode_image(image: bytes | Image.Image, extension: str) -> bytes:
    """The bytes stored for an image: given bytes as they are, a PIL image encoded as `extension`."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected image bytes or a PIL image, got {type(image).__name__}")
    if extension == "jpg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha channel or palette
    buffer = io.BytesIO()
    if extension == "png":
        image.save(buffer, format="PNG")
    else:
        # Quality 95: visually lossless for training data at a fraction of PNG's size.
        image.save(buffer, format=_PIL_FORMAT[extension], quality=95)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MEMBER_MTIME
    info.mode = _MEMBER_MODE
    tar.addfile(info, io.BytesIO(data))


def _check_key(key: str) -> None:
    # WebDataset readers split a member name at the first "." of its base name into key and
    # extension, so a key with a dot would be split into two broken samples.
    if not isinstance(key, str) or not key or "." in key or "/" in key or key.startswith("__"):
        raise ValueError(
            f"sample key {key!r} is not usable in a WebDataset shard: it must be a non-empty string "
            "without '.' or '/' and must not start with '__'"
        )


class _ShardWriter:
    """Writes numbered shards of at most `shard_size` samples, each under a temporary name first."""

    def __init__(self, out_dir: Path, shard_size: int, prefix: str):
        self.out_dir, self.shard_size, self.prefix = out_dir, shard_size, prefix
        self.written: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._temporary_path: Path | None = None
        self._keys_in_shard: set[str] = set()

    def _final_path(self) -> Path:
        return self.out_dir / f"{self.prefix}{len(self.written):05d}.tar"

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            final = self._final_path()
            # A hidden name without the .tar suffix, so no reader or resolve_shards picks up a
            # shard that is still being written.
            self._temporary_path = final.with_name(f".{final.name}.partial")
            self._tar = tarfile.open(self._temporary_path, "w", format=tarfile.PAX_FORMAT)
            self._keys_in_shard = set()
        if key in self._keys_in_shard:
            raise ValueError(f"sample key {key!r} appears twice in shard {self._final_path()}")
        self._keys_in_shard.add(key)
        for extension, data in members:
            _add_member(self._tar, f"{key}.{extension}", data)
        if len(self._keys_in_shard) >= self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self._final_path()
        os.replace(self._temporary_path, final)
        self.written.append(str(final))
        self._tar = None

    def abandon(self) -> None:
        """Remove the shard in progress after an error, keeping the completed ones."""
        if self._tar is not None:
            self._tar.close()
            self._temporary_path.unlink(missing_ok=True)
            self._tar = None


def write_shards(
    samples: Iterable[ShardSample],
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    prefix: str = "",
) -> list[str]:
    """Write `(key, image, ext, caption, meta)` samples into `out_dir/<prefix>00000.tar, ...`.

    `image` is encoded bytes (stored as they are) or a PIL image (encoded as `ext`: jpg/jpeg, png or
    webp). `meta`, when not None, is stored as `<key>.json`. Each shard appears under its final
    name only once complete. Returns the paths of the written shards, in order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_path, shard_size, prefix)
    try:
        for key, image, ext, caption, meta in samples:
            _check_key(key)
            extension = ext.lower().lstrip(".")
            if extension not in _MEMBER_EXTENSION:
                raise ValueError(
                    f"sample {key!r}: image extension {ext!r} is not one of {IMAGE_EXTENSIONS}"
                )
            extension = _MEMBER_EXTENSION[extension]
            if not isinstance(caption, str):
                raise TypeError(f"sample {key!r}: caption must be a str, got {type(caption).__name__}")
            members = [(extension, _encode_image(image, extension)), ("txt", caption.encode("utf-8"))]
            if meta is not None:
                members.append(("json", json.dumps(meta, sort_keys=True).encode("utf-8")))
            writer.add(key, members)
        writer.finish_shard()
    except BaseException:
        writer.abandon()
        raise
    return writer.written


def demo_key(index: int) -> str:
    """The key of demo sample `index`: its zero-padded index."""
    return f"{index:09d}"


def write_demo_shards(
    out_dir: str | os.PathLike,
    num_samples: int,
    image_size: int,
    seed: int,
    shard_size: int,
) -> list[str]:
    """Write demo samples 0..num_samples-1 of data set `seed` as PNG shards; json holds the spec.

    Keys are the zero-padded sample index, so a sample's key names the `demo_sample` call that
    regenerates it.
    """

    def demo_samples() -> Iterator[ShardSample]:
        for index in range(num_samples):
            image, caption, spec = demo_sample(index, seed, image_size)
            yield demo_key(index), image, "png", caption, {**spec.to_dict(), "index": index}

    return write_shards(demo_samples(), out_dir, shard_size=shard_size)


def _read_captions_csv(captions_path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) per data row of a `file,caption` CSV."""
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would rename "file".
    with open(captions_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise ValueError(f"{captions_path}: empty captions file (expected a 'file,caption' header)")
        for column in ("file", "caption"):
            if column not in reader.fieldnames:
                raise ValueError(
                    f"{captions_path}: header {reader.fieldnames} has no {column!r} column "
                    "(expected a 'file,caption' header)"
                )
        rows = []
        for row in reader:
            if None in row or any(row[column] is None for column in ("file", "caption")):
                raise ValueError(
                    f"{captions_path}:{reader.line_num}: row does not have one value per header "
                    f"column {reader.fieldnames}"
                )
            rows.append((reader.line_num, dict(row)))
    return rows


def _read_captions_jsonl(captions_path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) per non-blank line of a JSONL file of {"file", "caption"} objects."""
    rows = []
    with open(captions_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{captions_path}:{line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{captions_path}:{line_number}: expected a JSON object with 'file' and "
                    f"'caption', got {type(record).__name__}"
                )
            for field_name in ("file", "caption"):
                if not isinstance(record.get(field_name), str):
                    raise ValueError(
                        f"{captions_path}:{line_number}: field {field_name!r} is missing or not a string"
                    )
            rows.append((line_number, record))
    return rows


def folder_to_shards(
    images_dir: str | os.PathLike,
    captions_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
) -> list[str]:
    """Shard a folder of images described by a captions file (CSV `file,caption` or JSONL).

    `file` is relative to `images_dir` (or absolute). Images keep their encoding; `.jpeg` files are
    stored as `.jpg` members. Keys are the zero-padded row index; `<key>.json` keeps the original
    `file` and any further columns. Every row is checked before the first shard is written, so a
    bad captions file fails fast and leaves no partial output: a missing file raises
    FileNotFoundError, a malformed row ValueError, both naming the file and line.
    """
    images_path, captions_path = Path(images_dir), Path(captions_file)
    if not images_path.is_dir():
        raise FileNotFoundError(f"images directory {images_path} does not exist")
    if not captions_path.is_file():
        raise FileNotFoundError(f"captions file {captions_path} does not exist")
    suffix = captions_path.suffix.lower()
    if suffix == ".csv":
        rows = _read_captions_csv(captions_path)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = _read_captions_jsonl(captions_path)
    else:
        raise ValueError(f"{captions_path}: captions file must be .csv or .jsonl, not {suffix!r}")

    entries = []
    for line_number, row in rows:
        image_path = images_path / row["file"]
        extension = image_path.suffix.lower().lstrip(".")
        if extension not in IMAGE_EXTENSIONS:
            raise ValueError(
                f"{captions_path}:{line_number}: {row['file']!r} is not an image with one of the "
                f"extensions {IMAGE_EXTENSIONS}"
            )
        if not image_path.is_file():
            raise FileNotFoundError(f"{captions_path}:{line_number}: image {image_path} does not exist")
        entries.append((image_path, extension, row))

    def folder_samples() -> Iterator[ShardSample]:
        for index, (image_path, extension, row) in enumerate(entries):
            meta = {name: value for name, value in row.items() if name != "caption"}
            yield f"{index:09d}", image_path.read_bytes(), extension, row["caption"], meta

    return write_shards(folder_samples(), out_dir, shard_size=shard_size)
