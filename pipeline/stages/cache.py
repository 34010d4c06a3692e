"""Stage outputs keyed by content: skip finished stages, never mistake a half-written one for done.

Each stage writes into `<workdir>/<stage>/<key>/`, where the key hashes the stage's config section
and its inputs' keys. Work happens in a temporary sibling directory that is renamed into place only
when complete (with `stage.json` recording status, time and metrics), so a crash leaves at most a
temporary directory, which the next run removes.

One writer per stage output: a run holds `<workdir>/<stage>/<key>.lock` (an exclusive `flock`,
which the kernel releases when its holder dies, also over NFS) while it works on that stage, and the
file names the holder. A second run on the same workdir waits for the lock, saying who holds it and
since when, and then finds the stage finished (or takes it over from a run that died).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# A run waiting for another's stage says so this often.
LOCK_WAIT_REPORT_S = 30.0

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


def _holder() -> dict:
    """Who takes a lock: this process, and the Ray job it runs for, if any."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "job": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or ""}


def _describe(holder: dict) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


@contextlib.contextmanager
def stage_lock(path: Path, stage: str):
    """Hold the exclusive lock at `path` for the block, waiting (and saying so) while another run holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited_since, reported = time.monotonic(), 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - reported >= LOCK_WAIT_REPORT_S:
                    holder = _read_holder(fd)
                    print(f"[{stage}] waiting for another run to finish this stage ({path}): held by "
                          f"{_describe(holder) if holder else 'a run starting up'}; waited "
                          f"{now - waited_since:.0f} s", flush=True)
                    reported = now
                time.sleep(0.5)
        previous = _read_holder(fd)
        if previous:  # a holder that released normally leaves the file empty
            print(f"[{stage}] taking over from a run that stopped while it held this stage: {_describe(previous)}",
                  flush=True)
        _write_holder(fd, json.dumps(_holder()))
        try:
            yield
        finally:
            _write_holder(fd, "")
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return None


def _write_holder(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
    os.fsync(fd)


def _cached(name: str, key: str, final: Path) -> StageResult | None:
    record = final / STAGE_RECORD
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    return StageResult(name, key, final, "cached", 0.0, saved.get("metrics", {}))


def run_stage(workdir: str | Path, name: str, key: str, work: Callable[[Path], dict]) -> StageResult:
    """Run `work(tmp_dir) -> metrics` unless `<workdir>/<name>/<key>` is already complete.

    `work` writes its outputs into the temporary directory it is given; on success the directory is
    renamed to the final path with a stage.json record. On failure the temporary directory is left
    for inspection and removed by the next run. The stage's lock is held throughout, so another run
    on the same workdir waits and then finds it finished, and no run removes a directory that
    another is writing.
    """
    final = stage_output(workdir, name, key)
    cached = _cached(name, key, final)
    if cached:
        return cached
    with stage_lock(final.parent / f"{key}.lock", name):
        return _cached(name, key, final) or _run_locked(name, key, final, work)


def _run_locked(name: str, key: str, final: Path, work: Callable[[Path], dict]) -> StageResult:
    for stale in final.parent.glob(f"{key}.tmp-*"):  # only a run that stopped leaves these: we hold the lock
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
