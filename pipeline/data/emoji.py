"""Real captioned images for the quality benchmark: Twitter's emoji set from the npm package
`emoji-datasource-twitter` (16.0.0: 3,786 drawn 64 px RGBA images; the package is MIT, the
Twemoji graphics CC-BY 4.0), captioned with their Unicode names.

Unlike the demo's generated shapes these are drawn by artists, in ~3,800 distinct captions of 1-12
words ("grinning face with smiling eyes", "woman gesturing ok, medium-dark skin tone"), so a model
has to render a specific picture per caption, as on users' own captioned data.

The person and hand emoji come in five skin tones. `composed_pairs` holds out some (emoji, tone)
pairs entirely: each such emoji is seen in training with other tones, each tone with other emoji,
never the two together, which measures whether captions compose.

The package is fetched from the npm registry like any other dependency (`make benchmark-data`,
`python -m pipeline.data.emoji fetch DIR`) and checked against its published integrity hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "emoji-datasource-twitter"
VERSION = "16.0.0"
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
URL = f"https://registry.npmjs.org/{PACKAGE}/-/{TARBALL}"
INTEGRITY = "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="
IMAGE_DIR = "package/img/twitter/64/"
DEFAULT_DIR = Path(os.environ.get("LDM_BENCHMARK_DATA", Path(__file__).resolve().parents[2] / "data"))

SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}


@dataclass(frozen=True)
class Emoji:
    key: str
    """The image's file stem (its code points), a valid shard key."""
    caption: str
    base: str
    """The emoji's name without a skin tone: the concept of a (concept, tone) pair."""
    tone: str
    """'' for the default (yellow) rendering; one of SKIN_TONES' names, or two joined by ' and '."""
    member: str
    """The PNG's path in the tarball."""


def tarball_path(directory: str | os.PathLike = DEFAULT_DIR) -> Path:
    return Path(directory) / TARBALL


def _check_integrity(path: Path) -> None:
    algorithm, expected = INTEGRITY.split("-", 1)
    digest = hashlib.new(algorithm, path.read_bytes()).digest()
    if base64.b64encode(digest).decode() != expected:
        raise ValueError(f"{path}: its {algorithm} is not the published {INTEGRITY} of {PACKAGE}@{VERSION}; "
                         "delete it and fetch it again")


def fetch(directory: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Download the package tarball from the npm registry into `directory` (kept if already there
    and intact); returns its path."""
    path = tarball_path(directory)
    if path.is_file():
        _check_integrity(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with urllib.request.urlopen(URL, timeout=120) as response, partial.open("wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    _check_integrity(partial)
    partial.rename(path)
    return path


def require(directory: str | os.PathLike = DEFAULT_DIR) -> Path:
    """The tarball's path; a clear error when it was never fetched."""
    path = tarball_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: fetch the benchmark's images with `make benchmark-data` "
                                f"(the npm package {PACKAGE}@{VERSION}, 62 MB)")
    return path


def _tone_name(code: str) -> str:
    return " and ".join(f"{SKIN_TONES[part]} skin tone" for part in code.split("-"))


def catalogue(tgz: str | os.PathLike) -> list[Emoji]:
    """Every emoji with a Twitter image, one caption each (lower-cased Unicode name, ', <tone> skin
    tone' for a toned variant); a name that appears twice keeps its first image."""
    with tarfile.open(tgz) as tar:
        entries = json.load(tar.extractfile("package/emoji.json"))
        members = set(tar.getnames())
    out, seen = [], set()

    def add(image: str, caption: str, base: str, tone: str) -> None:
        member = IMAGE_DIR + image
        if member in members and caption not in seen:
            seen.add(caption)
            out.append(Emoji(Path(image).stem, caption, base, tone, member))

    for entry in sorted(entries, key=lambda e: e["sort_order"]):
        if not entry.get("has_img_twitter") or entry["category"] == "Component":
            continue
        base = " ".join(entry["name"].lower().split())
        add(entry["image"], base, base, "")
        for code, variant in sorted((entry.get("skin_variations") or {}).items()):
            if variant.get("has_img_twitter"):
                tone = _tone_name(code)
                add(variant["image"], f"{base}, {tone}", base, tone.removesuffix(" skin tone"))
    return out


def composed_pairs(emoji: list[Emoji], every: int = 4) -> list[Emoji]:
    """The held-out (concept, tone) pairs: for every `every`-th single-toned concept, one tone
    (rotating through the five), so each tone stays in training with most concepts and each chosen
    concept with its four other tones."""
    tones = list(SKIN_TONES.values())
    by_base: dict[str, dict[str, Emoji]] = {}
    for e in emoji:
        if e.tone in tones:
            by_base.setdefault(e.base, {})[e.tone] = e
    held = []
    for i, base in enumerate(b for b, variants in by_base.items() if len(variants) == len(tones)):
        if i % every == 0:
            held.append(by_base[base][tones[(i // every) % len(tones)]])
    return held


def read_images(tgz: str | os.PathLike, emoji: list[Emoji]) -> dict[str, bytes]:
    """key -> the PNG bytes as the package ships them (RGBA; the readers composite onto white)."""
    wanted = {e.member: e.key for e in emoji}
    out = {}
    with tarfile.open(tgz) as tar:
        for member in tar:
            if member.name in wanted:
                out[wanted[member.name]] = tar.extractfile(member).read()
    return out


def write_emoji_shards(tgz: str | os.PathLike, out_dir: str | os.PathLike, shard_size: int = 1000) -> dict:
    """Shards of every emoji except the composed pairs; returns the manifest (also written as
    `<out_dir>/manifest.json`): the shards, the training emoji and the held-out pairs. Shards
    already written from this package are kept: the stage cache knows shards by size and mtime, so
    rewriting them would retrain every stage."""
    from pipeline.data.shards import write_shards

    out = Path(out_dir)
    done = out / "manifest.json"
    if done.is_file() and (manifest := json.loads(done.read_text())).get("package") == f"{PACKAGE}@{VERSION}" \
            and all(Path(shard).is_file() for shard in manifest.get("files", [])) and manifest.get("files"):
        return manifest
    emoji = catalogue(tgz)
    held = {e.key for e in composed_pairs(emoji)}
    images = read_images(tgz, emoji)
    train = [e for e in emoji if e.key not in held]

    def samples() -> Iterator:
        for e in train:
            yield e.key, images[e.key], "png", e.caption, {"base": e.base, "tone": e.tone}

    shards = write_shards(samples(), out / "shards", shard_size=shard_size)
    manifest = {"package": f"{PACKAGE}@{VERSION}", "shards": str(out / "shards"), "files": shards,
                "num_images": len(emoji), "num_composed": len(held), "composed": sorted(held)}
    done.write_text(json.dumps(manifest, indent=1))
    return manifest


def load_gallery(tgz: str | os.PathLike, image_size: int):
    """All emoji (composed pairs included) at `image_size`, decoded as the pipeline's readers do:
    (the catalogue, (N, S, S, 3) uint8)."""
    import numpy as np

    from pipeline.data.decode import load_image

    emoji = catalogue(tgz)
    images = read_images(tgz, emoji)
    return emoji, np.stack([load_image(images[e.key], image_size) for e in emoji])


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "fetch":
        print("usage: python -m pipeline.data.emoji fetch DIR", file=sys.stderr)
        return 2
    print(fetch(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

