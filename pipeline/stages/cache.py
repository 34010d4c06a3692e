"""Stage outputs keyed by content: skip finished stages, never mistake a half-written one for done.

Each stage writes into `<workdir>/<stage>/<key>/`, where the key hashes the stage's config section
and its inputs' keys. Work happens in a temporary sibling directory that is renamed into place only
when complete (with `stage.json` recording status, time and metrics), so a crash leaves at most a
temporary directory, which the next run removes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STAGE_RECORD = "stage.json"


def content_key(*parts: str) -> str:
    """A short stable hash of strings (config YAML, upstream keys, file hashes)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_digest(path: str | Path) -> str:
    """A hash over every file's relative path and bytes in a directory (model directories)."""
    path = Path(path)
    parts = [f"{p.relative_to(path)}:{file_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    return content_key(*parts)


@dataclass
class StageResult:
    """What a stage reports in summary.json."""

    name: str
    key: str
    output: Path
    status: str  # "ran" | "cached"
    seconds: float
    metrics: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "metrics": self.metrics,
            "output": str(self.output),
            "key": self.key,
        }


def stage_output(workdir: str | Path, name: str, key: str) -> Path:
    return Path(workdir).resolve() / name / key


def run_stage(workdir: str | Path, name: str, key: str, work: Callable[[Path], dict]) -> StageResult:
    """Run `work(tmp_dir) -> metrics` unless `<workdir>/<name>/<key>` is already complete.

    `work` writes its outputs into the temporary directory it is given; on success the directory is
    renamed to the final path with a stage.json record. On failure the temporary directory is left
    for inspection and removed by the next run.
    """
    final = stage_output(workdir, name, key)
    record = final / STAGE_RECORD
    if record.is_file():
        saved = json.loads(record.read_text())
        return StageResult(name, key, final, "cached", 0.0, saved.get("metrics", {}))
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.perf_counter()
    metrics = work(tmp) or {}
    seconds = time.perf_counter() - start
    (tmp / STAGE_RECORD).write_text(
        json.dumps({"name": name, "key": key, "seconds": seconds, "metrics": metrics}, indent=2)
    )
    if final.exists():  # an incomplete directory from an older layout: not trusted
        shutil.rmtree(final)
    tmp.rename(final)
    return StageResult(name, key, final, "ran", seconds, metrics)
