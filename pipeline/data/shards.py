"""WebDataset shards in the img2dataset layout: writing them, and finding them from `data.shards`.

This is where data enters the flow. Users arrive with shards (or with a folder of images and a
captions file, which `folder_to_shards` turns into shards); the demo writes its own with
`write_demo_shards`. Every stage that reads images starts from `resolve_shards(data.shards)`, the
list of shard URLs handed to `ray.data.read_webdataset`.

Layout per sample: `<key>.jpg|.png|.webp` (the image, in its original encoding), `<key>.txt` (the
caption, UTF-8), optionally `<key>.json` (metadata). Shards are `00000.tar, 00001.tar, ...`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.demo import demo_sample

from braceexpand import braceexpand  # pinned webdataset's own dependency

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
            yield f"{index:09d}", image, "png", caption, {**spec.to_dict(), "index": index}

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


def _expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` alternatives and zero-padded `{000..099}` ranges (braceexpand)."""
    return list(braceexpand(pattern))


def _has_glob(pattern: str) -> bool:
    return any(character in pattern for character in "*?[")


def _resolve_local(spec: str) -> list[str]:
    found: list[str] = []
    unmatched: list[str] = []
    for pattern in _expand_braces(spec):
        pattern = os.path.expanduser(pattern)
        if _has_glob(pattern):
            matches = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
        elif os.path.isdir(pattern):
            matches = sorted(str(path) for path in Path(pattern).glob("*.tar") if path.is_file())
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = []
        if not matches:
            unmatched.append(pattern)
        found.extend(os.path.abspath(path) for path in matches)
    if unmatched:
        # A brace range that names missing shards is a typo or an incomplete copy; training
        # silently on the shards that do exist would hide it.
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise FileNotFoundError(f"data.shards={spec!r}: nothing matches {shown}")
    return found


def _resolve_remote(spec: str) -> list[str]:
    if "{" in spec:
        # Brace patterns are how large remote corpora are named without listing a bucket of
        # millions of objects, so they are expanded, not checked.
        return _expand_braces(spec)
    try:
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(spec)
    except ImportError:
        # No fsspec driver for this scheme (s3fs, gcsfs): pyarrow's own filesystems (S3, GCS,
        # HDFS) can still list, and are what Ray Data reads with anyway.
        return _resolve_remote_pyarrow(spec)
    if _has_glob(path):
        matches = filesystem.glob(path)
    elif filesystem.isdir(path):
        matches = [
            entry["name"]
            for entry in filesystem.ls(path, detail=True)
            if entry["type"] == "file" and entry["name"].endswith(".tar")
        ]
    else:
        matches = [path] if filesystem.isfile(path) else []
    if not matches:
        raise FileNotFoundError(f"data.shards={spec!r}: nothing matches")
    return [filesystem.unstrip_protocol(match) for match in sorted(matches)]


def _resolve_remote_pyarrow(spec: str) -> list[str]:
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(spec)
    scheme = spec.split("://", 1)[0]
    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.Directory:
        listing = filesystem.get_file_info(pyarrow.fs.FileSelector(path))
        matches = [entry.path for entry in listing if entry.is_file and entry.path.endswith(".tar")]
    elif info.type == pyarrow.fs.FileType.File:
        matches = [path]
    else:
        matches = []
    if not matches:
        raise FileNotFoundError(f"data.shards={spec!r}: nothing matches")
    return [f"{scheme}://{match}" for match in sorted(matches)]


def resolve_shards(spec: str) -> list[str]:
    """The shard paths/URLs `data.shards` names, in order.

    `spec` may be a directory (every *.tar in it, sorted), a glob, a brace pattern
    (`shards/{00000..00099}.tar`) or a URL that fsspec/pyarrow can open: a remote brace pattern is
    expanded without listing, a remote directory or glob is listed. Local paths come back absolute.
    Raises FileNotFoundError naming `spec` when nothing (or, for a local brace pattern, not every
    expansion) matches.
    """
    spec = str(spec).strip()
    if not spec:
        raise FileNotFoundError(
            "data.shards is empty; set it to a directory, glob, brace pattern or URL"
        )
    if spec.startswith("file://"):
        spec = spec[len("file://") :]
    if "://" in spec:
        return _resolve_remote(spec)
    return _resolve_local(spec)


# Connecting to an object store that does not answer is retried this many times, backing off.
STORE_ATTEMPTS = 3
STORE_BACKOFF_S = 2.0


def shard_fingerprints(shards: list[str]) -> list[str]:
    """What identifies each shard's content for the stage cache: `path:size:mtime` (for `s3://`
    and other object stores, the listing's size and LastModified, from pyarrow's filesystem).
    Replacing a shard (a re-upload of other bytes) changes it, so the stages downstream rerun.

    Checked before any training: a missing file, object or bucket is a FileNotFoundError naming
    data.shards; credentials the store refuses are a PermissionError naming them; a store that does
    not answer is retried (STORE_ATTEMPTS, backing off) and then an OSError naming its endpoint.
    """
    fingerprints = []
    for shard in shards:
        if "://" not in shard:
            path = Path(shard)
            if not path.is_file():
                raise FileNotFoundError(f"data.shards: no such shard file {shard}")
            stat = path.stat()
            fingerprints.append(f"{shard}:{stat.st_size}:{stat.st_mtime_ns}")
            continue
        info = _remote_info(shard)
        fingerprints.append(f"{shard}:{info.size}:{info.mtime_ns}")
    return fingerprints


def _remote_info(url: str):
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint") if url.startswith("s3://") else url
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
            info = filesystem.get_file_info(path)
            break
        except OSError as error:
            message = str(error)
            if "ACCESS_DENIED" in message or "AccessDenied" in message or "403" in message:
                raise PermissionError(f"data.shards: the object store at {endpoint} refuses the credentials for "
                                      f"{url} (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the pod's role): "
                                      f"{message}") from None
            if attempt == STORE_ATTEMPTS:
                raise OSError(f"data.shards: cannot reach the object store at {endpoint} for {url} after "
                              f"{STORE_ATTEMPTS} attempts (AWS_ENDPOINT_URL, network): {message}") from None
            time.sleep(STORE_BACKOFF_S * attempt)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"data.shards: {url} does not exist (no such object, or no such bucket)")
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"data.shards: {url} is not a file")
    return info
