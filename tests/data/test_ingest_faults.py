"""Ingest that survives real shards: every bad sample is skipped and counted by reason, exactly.

Shards are built member by member with `tarfile`: a known number of good samples plus exactly one
instance of each fault. Most tests drive the per-shard parser (`parse_shard`) directly, without
Ray; one test runs the real encode stage (Ray Data read + encoder actor pool + Parquet) on a set of
shards holding every fault.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.data.decode import SKIP_REASONS, SampleError, load_image
from pipeline.data.reader import InSplit, counts_summary, is_heldout, new_counts, parse_shard

IMAGE_SIZE = 16


def _image_bytes(fmt: str, size=(24, 20), seed=0, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


PNG = _image_bytes("PNG")

# Good samples: every decoder, odd sizes (resize + center crop), alpha, captions to clean.
GOOD = {
    "g-png": [("png", PNG), ("txt", b"a red circle"), ("json", b"{}")],
    "g-jpg": [("jpg", _image_bytes("JPEG", (40, 24), 1)), ("txt", b"  a  blue\tsquare \n")],
    "g-jpeg": [("jpeg", _image_bytes("JPEG", (16, 16), 2)), ("txt", "cafe\u0301 au lait".encode())],
    "g-webp": [("webp", _image_bytes("WEBP", (20, 33), 3)), ("txt", b"a green triangle")],
    "g-rgba": [("png", _image_bytes("PNG", (30, 30), 4, "RGBA")), ("txt", b"\xef\xbb\xbfwith a BOM")],
    "g-pngasjpg": [("jpg", _image_bytes("PNG", (17, 18), 5)), ("txt", b"png bytes under .jpg")],
}
CLEAN_CAPTIONS = {
    "g-png": "a red circle",
    "g-jpg": "a blue square",
    "g-jpeg": "caf\u00e9 au lait",
    "g-webp": "a green triangle",
    "g-rgba": "with a BOM",
    "g-pngasjpg": "png bytes under .jpg",
}
# Empty captions are not errors: unconditional samples, kept with caption "".
UNCONDITIONAL = {
    "u-blank": [("png", _image_bytes("PNG", seed=6)), ("txt", b" \n\t ")],
    "u-empty": [("png", _image_bytes("PNG", seed=7)), ("txt", b"")],
}

# One instance of each fault: reason -> tar members, in order. `duplicate_key` repeats a good key
# and `out_of_order` interleaves its own good sample; `truncated_tar` is applied to the whole shard.
FAULTS = {
    "corrupt_image": [("f-corrupt.png", PNG[: len(PNG) // 2]), ("f-corrupt.txt", b"half a png")],
    "zero_byte": [("f-zero.jpg", b""), ("f-zero.txt", b"an empty image member")],
    "not_an_image": [("f-html.jpg", b"<html>403 Forbidden</html>"), ("f-html.txt", b"an error page")],
    "too_many_pixels": [("f-bomb.png", _bomb_png(10_000, 10_000)), ("f-bomb.txt", b"100 megapixels")],
    "missing_image": [("f-noimage.txt", b"a caption alone"), ("f-noimage.json", b"{}")],
    "caption_not_utf8": [("f-latin1.png", PNG), ("f-latin1.txt", "caf\u00e9".encode("latin-1"))],
    "missing_caption": [("f-nocaption.png", PNG), ("f-nocaption.json", b"{}")],
    "out_of_order": [("f-split.png", PNG), ("o-between.png", PNG), ("o-between.txt", b"between"),
                     ("f-split.txt", b"a caption far from its image")],
    "duplicate_key": [("g-png.png", PNG), ("g-png.txt", b"the same key again")],
    "truncated_tar": [],
}
# Good samples that some faults bring along.
EXTRA_GOOD = {"out_of_order": ["o-between"]}


def _members(samples: dict) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for key, members in samples.items() for ext, data in members]


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _truncated(members: list[tuple[str, bytes]], prefix: str = "") -> bytes:
    """The tar of `members` plus one more sample, cut in the middle of that sample's image."""
    lost = (f"{prefix}f-cut.png", _image_bytes("PNG", (64, 64), 9))
    data = _tar_bytes(members + [lost, (f"{prefix}f-cut.txt", b"never arrives")])
    return data[: _offsets(data)[lost[0]][1] + len(lost[1]) // 2]


def _offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its header, offset of its data) in a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: (info.offset, info.offset_data) for info in tar.getmembers()}


def build_shard(faults: list[str], prefix: str = "") -> tuple[bytes, set[str]]:
    """A shard of the good samples, the unconditional ones and the given faults, every member name
    prefixed with `prefix`; returns (tar bytes, keys of the good samples)."""
    members = _members(GOOD) + _members(UNCONDITIONAL)
    good = set(GOOD) | set(UNCONDITIONAL)
    for reason in faults:
        members += FAULTS[reason]
        good |= set(EXTRA_GOOD.get(reason, []))
    members = [(prefix + name, data) for name, data in members]
    data = _truncated(members, prefix) if "truncated_tar" in faults else _tar_bytes(members)
    return data, {prefix + key for key in good}


def parse(data: bytes, max_pixels: int | None = None) -> tuple[list, Counter]:
    counts = new_counts()
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    rows = list(parse_shard(io.BytesIO(data), IMAGE_SIZE, counts, **kwargs))
    return rows, counts


def _expected_skipped(faults: list[str]) -> dict[str, int]:
    return {reason: int(reason in faults) for reason in SKIP_REASONS}


def test_a_clean_shard_gives_every_sample_decoded_cropped_and_captioned():
    data, good = build_shard([])
    rows, counts = parse(data)
    assert [key for key, _, _, _ in rows] == list(GOOD) + list(UNCONDITIONAL)
    assert counts_summary(counts) == {"samples": 8, "unconditional": 2, "other_split": 0,
                                      "skipped": _expected_skipped([])}
    captions = {key: caption for key, caption, _, _ in rows}
    assert {key: captions[key] for key in CLEAN_CAPTIONS} == CLEAN_CAPTIONS
    assert captions["u-blank"] == captions["u-empty"] == ""
    for _, _, image, _ in rows:
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("reason", list(FAULTS))
def test_each_fault_alone_costs_exactly_its_sample(reason):
    data, good = build_shard([reason])
    rows, counts = parse(data)
    keys = [key for key, _, _, _ in rows]
    assert sorted(keys) == sorted(good)  # every good sample exactly once
    assert counts_summary(counts) == {
        "samples": len(good), "unconditional": 2, "other_split": 0, "skipped": _expected_skipped([reason]),
    }


def test_every_fault_in_one_shard_is_counted_once():
    data, good = build_shard(list(FAULTS))
    rows, counts = parse(data)
    assert len(good) == 9
    assert sorted(key for key, _, _, _ in rows) == sorted(good)
    assert counts_summary(counts) == {"samples": 9, "unconditional": 2, "other_split": 0,
                                      "skipped": {r: 1 for r in SKIP_REASONS}}


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_a_split_keeps_its_keys_and_counts_the_others_and_every_fault(split):
    """The train and held-out reads of one shard part its good samples by key, each exactly once;
    a bad sample is counted under its reason in both (it is decoded before the split is asked)."""
    data, good = build_shard(list(FAULTS))
    fraction = 0.5  # both splits non-empty on these few keys
    counts = new_counts()
    rows = list(parse_shard(io.BytesIO(data), IMAGE_SIZE, counts, keep=InSplit(split, fraction)))
    mine = {key for key in good if is_heldout(key, fraction) == (split == "heldout")}
    assert 0 < len(mine) < len(good)
    assert sorted(key for key, _, _, _ in rows) == sorted(mine)
    summary = counts_summary(counts)
    assert (summary["samples"], summary["other_split"]) == (len(mine), len(good) - len(mine))
    assert summary["unconditional"] == len({"u-blank", "u-empty"} & mine)
    assert summary["skipped"] == {r: 1 for r in SKIP_REASONS}


def test_a_split_sample_is_out_of_order_once_and_a_stray_member_after_a_complete_one_too():
    members = [
        # Members sorted by extension, as `tar` of a folder of mixed files sometimes does.
        ("a.png", PNG), ("b.png", PNG), ("a.txt", b"a"), ("b.txt", b"b"),
        # A complete sample, then a stray member of it after another sample.
        ("c.png", PNG), ("c.txt", b"c"), ("d.png", PNG), ("d.txt", b"d"), ("c.json", b"{}"), ("c.cls", b"1"),
    ]
    rows, counts = parse(_tar_bytes(members))
    assert [key for key, _, _, _ in rows] == ["c", "d"]
    assert counts["out_of_order"] == 3  # a, b (dropped), c's stray members (once; c itself is kept)
    assert counts["missing_caption"] == 0 and counts["samples"] == 2


def test_a_repeated_member_within_a_sample_is_a_duplicate_key():
    rows, counts = parse(_tar_bytes([("a.png", PNG), ("a.png", PNG), ("a.txt", b"a")]))
    # "a.png" alone (no caption), then "a.png a.txt" again: the second occurrence is the duplicate.
    assert rows == [] and counts["duplicate_key"] == 1 and counts["missing_caption"] == 1


@pytest.mark.parametrize("cut", ["empty", "inside_header", "at_member_boundary", "no_end_marker", "not_a_tar"])
def test_every_kind_of_truncation_is_truncated_tar(cut):
    members = _members(GOOD)
    whole = _tar_bytes(members)
    offsets = _offsets(whole)
    last_name, last_data = members[-1]
    body = offsets[last_name][1] + -(-len(last_data) // 512) * 512  # the end marker starts here
    last_sample = offsets[members[-2][0]][0]  # the header of the last sample's first member
    data = {
        "empty": b"",
        "inside_header": whole[: last_sample + 100],
        "at_member_boundary": whole[:last_sample],
        "no_end_marker": whole[:body],
        "not_a_tar": b"<html>not found</html>" * 50,
    }[cut]
    rows, counts = parse(data)
    assert counts["truncated_tar"] == 1
    expected = {"empty": 0, "not_a_tar": 0, "no_end_marker": len(GOOD)}.get(cut, len(GOOD) - 1)
    assert counts["samples"] == len(rows) == expected
    assert sum(counts[reason] for reason in SKIP_REASONS) == 1


def test_a_gzipped_shard_reads_and_a_cut_one_is_truncated():
    plain = _tar_bytes(_members(GOOD))
    packed = zlib.compressobj(wbits=31)
    gz = packed.compress(plain) + packed.flush()
    rows, counts = parse(gz)
    assert len(rows) == len(GOOD) and counts["truncated_tar"] == 0
    rows, counts = parse(gz[: len(gz) // 2])
    assert counts["truncated_tar"] == 1 and len(rows) < len(GOOD)


def test_the_pixel_limit_is_configurable_and_checked_before_decoding():
    image = _image_bytes("PNG", (40, 30))
    assert load_image(image, IMAGE_SIZE, max_pixels=1200).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    with pytest.raises(SampleError) as err:
        load_image(image, IMAGE_SIZE, max_pixels=1199)
    assert err.value.reason == "too_many_pixels"
    # Far over PIL's own hard limit too (it refuses before our check): still too_many_pixels.
    with pytest.raises(SampleError) as err:
        load_image(_bomb_png(100_000, 100_000), IMAGE_SIZE)
    assert err.value.reason == "too_many_pixels"
    rows, counts = parse(_tar_bytes(_members(GOOD)), max_pixels=600)
    assert counts["too_many_pixels"] == 3 and len(rows) == 3  # 40x24, 20x33 and 30x30 are over 600


def test_resize_shorter_side_then_center_crop():
    # A 64x32 image, white in the middle (a bit wider than the central 32x32), black at the sides.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 10:54] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    out = load_image(buffer.getvalue(), 16)
    assert out.shape == (16, 16, 3)
    assert out.min() == 255  # the center square, all white


def test_transparent_pixels_become_white():
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    assert load_image(buffer.getvalue(), 16).min() == 255


def test_a_retried_read_rewrites_its_shards_counts_instead_of_adding_to_them(tmp_path):
    from pipeline.data.reader import read_shard_counts, sum_counts, write_shard_counts

    _, counts = parse(build_shard(["corrupt_image"])[0])
    write_shard_counts(str(tmp_path), "/data/00000.tar", dict(counts))
    write_shard_counts(str(tmp_path), "/data/00000.tar", dict(counts))  # the same task, retried
    write_shard_counts(str(tmp_path), "s3://bucket/00001.tar", dict(counts))
    per_shard = read_shard_counts(str(tmp_path))
    assert sorted(per_shard) == ["/data/00000.tar", "s3://bucket/00001.tar"]
    assert counts_summary(sum_counts(per_shard.values()))["skipped"]["corrupt_image"] == 2
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporaries


def test_skipped_maps_become_dotted_mlflow_metrics():
    from pipeline.workflow import _numeric_metrics

    metrics = {"samples": 9, "skipped": {"corrupt_image": 1, "zero_byte": 0}, "note": "text"}
    assert _numeric_metrics(metrics) == {"samples": 9, "skipped.corrupt_image": 1, "skipped.zero_byte": 0}


def test_max_image_pixels_is_a_config_key():
    from pipeline.config import ConfigError, load_config

    assert load_config(None, ["data.max_image_pixels=1000000"]).data.max_image_pixels == 1_000_000
    with pytest.raises(ConfigError, match="max_image_pixels"):
        load_config(None, ["data.max_image_pixels=0"])


# --- the real encode stage (Ray Data), every fault in one run ---------------------------------------


@pytest.mark.slow
def test_encode_stage_counts_every_fault_exactly(ray_session, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.data.locate import resolve_shards
    from pipeline.stages.encode import run_encode
    from pipeline.tiny_models import save_untrained_encoders

    cfg = load_config(None, [f"workdir={tmp_path / 'work'}", f"data.image_size={IMAGE_SIZE}",
                             "vq.hidden_channels=8", "clip.width=32", "clip.layers=1", "clip.context_length=8",
                             "encode.batch_size=4"])
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    good: set[str] = set()
    # One shard holding every fault, a clean one, one with a single fault, and an empty file. Keys
    # are prefixed per shard: duplicate keys are detected within a shard only.
    for index, faults in enumerate([list(FAULTS), [], ["out_of_order"]]):
        data, keys = build_shard(faults, prefix=f"s{index}")
        (shard_dir / f"{index:05d}.tar").write_bytes(data)
        good |= keys
    (shard_dir / "00003.tar").write_bytes(b"")
    shards = resolve_shards(str(shard_dir))
    vq_dir, clip_dir = save_untrained_encoders(cfg, tmp_path)
    out = tmp_path / "encode"
    out.mkdir()
    metrics = run_encode(cfg, shards, vq_dir, clip_dir, out)

    skipped = {reason: 1 for reason in SKIP_REASONS}
    skipped["out_of_order"] = 2
    skipped["truncated_tar"] = 2  # the cut shard and the empty file
    assert 9 + 8 + 9 == len(good)
    # The training split is encoded; the held-out one is counted, left for the evaluate stage.
    train = {key for key in good if not is_heldout(key, cfg.data.heldout_fraction)}
    assert 0 < len(train) < len(good)
    assert metrics["samples"] == len(train) and metrics["heldout_samples"] == len(good) - len(train)
    assert metrics["unconditional"] == sum(key[2:] in UNCONDITIONAL for key in train)
    assert metrics["skipped"] == skipped
    table = pq.read_table(out / "data")
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(train)  # every good training sample encoded exactly once
    captions = dict(zip(keys, table.column("caption").to_pylist()))
    assert all(captions[key] == "" for key in captions if key[2:] in UNCONDITIONAL)
    assert all(captions[key] == CLEAN_CAPTIONS[key[2:]] for key in captions if key[2:] in CLEAN_CAPTIONS)
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["skipped"] == skipped and metadata["samples"] == len(train)
    assert metadata["latent_shape"] == [4, IMAGE_SIZE // 4, IMAGE_SIZE // 4]
    assert len(list((out / "counts").glob("*.json"))) == 4  # one record per shard

