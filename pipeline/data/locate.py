"""Finding the shards `data.shards` names (a directory, a glob, a brace pattern, an object store
URL), and fingerprinting them for the stages' cache keys. Every stage that reads images starts from
`resolve_shards(data.shards)`, the list of shard URLs handed to `ray.data.read_webdataset`."""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

from braceexpand import braceexpand  # pinned webdataset's own dependency


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
