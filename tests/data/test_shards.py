"""WebDataset shards (pipeline/data/shards.py) and the jobs/make_shards.py CLI."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import ray
import webdataset
from PIL import Image

from pipeline.data.demo import demo_sample
from pipeline.data.locate import resolve_shards
from pipeline.data.shards import folder_to_shards, write_demo_shards, write_shards

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray(ray_session):
    """The session's local Ray instance (tests/conftest.py)."""
    yield


def _tar_members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> list[str]:
    out_dir = tmp_path_factory.mktemp("demo_shards")
    return write_demo_shards(out_dir, num_samples=25, image_size=32, seed=4, shard_size=10)


def test_demo_shards_are_numbered_and_hold_shard_size_samples(demo_shards):
    assert [Path(path).name for path in demo_shards] == ["00000.tar", "00001.tar", "00002.tar"]
    member_counts = [len(_tar_members(path)) for path in demo_shards]
    assert member_counts == [30, 30, 15]  # png + txt + json per sample
    names = [name for name, _ in _tar_members(demo_shards[0])[:3]]
    assert names == ["000000000.png", "000000000.txt", "000000000.json"]
    # Nothing but finished shards is left behind.
    assert sorted(path.name for path in Path(demo_shards[0]).parent.iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]


def test_rewriting_the_same_samples_gives_byte_identical_shards(demo_shards, tmp_path):
    rewritten = write_demo_shards(tmp_path, num_samples=25, image_size=32, seed=4, shard_size=10)
    for original, again in zip(demo_shards, rewritten, strict=True):
        assert Path(original).read_bytes() == Path(again).read_bytes()


def _expected_demo_sample(key: str):
    index = int(key)
    image, caption, spec = demo_sample(index, seed=4, image_size=32)
    return np.asarray(image), caption, {**spec.to_dict(), "index": index}


def test_ray_data_reads_back_keys_captions_pixels_and_metadata(local_ray, demo_shards):
    rows = ray.data.read_webdataset(demo_shards).take_all()  # Ray's default decoder
    assert sorted(row["__key__"] for row in rows) == [f"{index:09d}" for index in range(25)]
    for row in rows:
        pixels, caption, meta = _expected_demo_sample(row["__key__"])
        assert np.array_equal(np.asarray(row["png"]), pixels)
        assert row["txt"] == caption
        assert row["json"] == meta


def test_ray_data_without_decoder_yields_the_stored_bytes(local_ray, demo_shards):
    rows = ray.data.read_webdataset(demo_shards, decoder=None).take_all()
    assert len(rows) == 25
    for row in rows:
        pixels, caption, meta = _expected_demo_sample(row["__key__"])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["png"]))), pixels)
        assert row["txt"].decode("utf-8") == caption
        assert json.loads(row["json"]) == meta


def test_webdataset_library_reads_back_the_same_samples(demo_shards):
    dataset = webdataset.WebDataset(demo_shards, shardshuffle=False, empty_check=False)
    samples = list(dataset)
    assert [sample["__key__"] for sample in samples] == [f"{index:09d}" for index in range(25)]
    for sample in samples:
        pixels, caption, meta = _expected_demo_sample(sample["__key__"])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), pixels)
        assert sample["txt"].decode("utf-8") == caption
        assert json.loads(sample["json"]) == meta


@pytest.mark.parametrize("extension", ["png", "jpg", "jpeg", "webp"])
def test_pil_images_are_encoded_in_the_requested_format(tmp_path, extension):
    image = Image.fromarray(
        np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))[..., None].repeat(3, 2)
    )
    [path] = write_shards([("a", image, extension, "gradient", None)], tmp_path)
    [(name, data), (caption_name, _)] = _tar_members(path)
    stored_extension = "jpg" if extension == "jpeg" else extension
    assert (name, caption_name) == (f"a.{stored_extension}", "a.txt")  # no json when meta is None
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[stored_extension]
    difference = np.abs(np.asarray(decoded.convert("RGB"), dtype=int) - np.asarray(image, dtype=int))
    assert difference.max() <= (0 if extension == "png" else 12)


@pytest.mark.parametrize("key", ["a.b", "", "__meta", "dir/key"])
def test_keys_that_readers_would_split_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="key"):
        write_shards([(key, b"bytes", "png", "caption", None)], tmp_path)
    assert not list(tmp_path.iterdir())  # the shard in progress is removed


def test_duplicate_keys_and_unknown_extensions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        write_shards([("a", b"x", "png", "c", None), ("a", b"x", "png", "c", None)], tmp_path)
    with pytest.raises(ValueError, match="gif"):
        write_shards([("a", b"x", "gif", "c", None)], tmp_path)


def _make_image_folder(folder: Path) -> dict[str, bytes]:
    """A few small images in every supported encoding; returns file name -> bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, (name, pil_format) in enumerate(
        [("a.jpg", "JPEG"), ("b.png", "PNG"), ("c.webp", "WEBP"), ("sub/d.jpeg", "JPEG")]
    ):
        image = Image.fromarray(np.full((10, 12, 3), 40 * index, dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format=pil_format)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(buffer.getvalue())
        written[name] = buffer.getvalue()
    return written


CAPTIONS = {
    "a.jpg": "a dark, square photo",
    "b.png": 'a "quoted" caption',
    "c.webp": "ünïcödé",
    "sub/d.jpeg": "d",
}


def _samples_by_key(paths: list[str]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in paths:
        for name, data in _tar_members(path):
            key, extension = name.split(".", 1)
            samples.setdefault(key, {})[extension] = data
    return samples


def _check_folder_shards(paths: list[str], images: dict[str, bytes], extra_meta: dict | None = None):
    samples = _samples_by_key(paths)
    assert len(samples) == len(images)
    for members in samples.values():
        meta = json.loads(members["json"])
        file_name = meta["file"]
        image_extension = next(extension for extension in members if extension not in ("txt", "json"))
        assert members[image_extension] == images[file_name]  # original encoding, byte for byte
        assert image_extension == {"jpeg": "jpg"}.get(
            file_name.rsplit(".", 1)[1], file_name.rsplit(".", 1)[1]
        )
        assert members["txt"].decode("utf-8") == CAPTIONS[file_name]
        if extra_meta:
            assert {name: meta[name] for name in extra_meta} == extra_meta


def test_folder_to_shards_from_csv(tmp_path):
    images = _make_image_folder(tmp_path / "images")
    lines = ["file,caption,source"] + [
        f'{name},"{caption.replace(chr(34), chr(34) * 2)}",web' for name, caption in CAPTIONS.items()
    ]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths = folder_to_shards(
        tmp_path / "images", tmp_path / "captions.csv", tmp_path / "out", shard_size=3
    )
    assert [Path(path).name for path in paths] == ["00000.tar", "00001.tar"]
    _check_folder_shards(paths, images, extra_meta={"source": "web"})


def test_folder_to_shards_from_jsonl(tmp_path):
    images = _make_image_folder(tmp_path / "images")
    lines = [
        json.dumps({"file": name, "caption": caption, "score": 0.5})
        for name, caption in CAPTIONS.items()
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    paths = folder_to_shards(tmp_path / "images", tmp_path / "captions.jsonl", tmp_path / "out")
    assert len(paths) == 1
    _check_folder_shards(paths, images, extra_meta={"score": 0.5})


@pytest.mark.parametrize(
    ("file_name", "content", "error", "message"),
    [
        ("captions.csv", "file,caption\na.jpg,ok\nmissing.png,gone\n", FileNotFoundError, r"captions.csv:3.*missing.png"),
        ("captions.csv", "file,text\na.jpg,ok\n", ValueError, r"captions.csv.*'caption' column"),
        ("captions.csv", "", ValueError, r"captions.csv.*empty"),
        ("captions.csv", "file,caption\nnotes.txt,not an image\n", ValueError, r"captions.csv:2.*notes.txt"),
        ("captions.jsonl", '{"file": "a.jpg", "caption": "ok"}\n{"file": "b.png", caption}\n', ValueError,
         r"captions.jsonl:2.*invalid JSON"),
        ("captions.jsonl", '{"file": "a.jpg"}\n', ValueError, r"captions.jsonl:1.*'caption'"),
        ("captions.jsonl", '["a.jpg", "ok"]\n', ValueError, r"captions.jsonl:1.*JSON object"),
        ("captions.jsonl", '{"file": "nope.jpg", "caption": "x"}\n', FileNotFoundError, r"captions.jsonl:1.*nope.jpg"),
        ("captions.txt", "a.jpg ok\n", ValueError, r"\.csv or \.jsonl"),
    ],
)
def test_bad_captions_files_fail_clearly_before_writing_anything(
    tmp_path, file_name, content, error, message
):
    _make_image_folder(tmp_path / "images")
    (tmp_path / file_name).write_text(content, encoding="utf-8")
    with pytest.raises(error, match=message):
        folder_to_shards(tmp_path / "images", tmp_path / file_name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_captions_file_or_images_dir_is_named(tmp_path):
    _make_image_folder(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        folder_to_shards(tmp_path / "images", tmp_path / "nothere.csv", tmp_path / "out")
    (tmp_path / "c.csv").write_text("file,caption\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="noimages"):
        folder_to_shards(tmp_path / "noimages", tmp_path / "c.csv", tmp_path / "out")


@pytest.fixture()
def shard_dir(tmp_path) -> Path:
    directory = tmp_path / "shards"
    directory.mkdir()
    for index in range(4):
        (directory / f"{index:05d}.tar").write_bytes(b"")
    (directory / "notes.txt").write_text("not a shard")
    (directory / ".00004.tar.partial").write_bytes(b"")  # a shard still being written
    return directory


def test_resolve_shards_accepts_a_directory_glob_and_brace_pattern(shard_dir):
    expected = [str(shard_dir / f"{index:05d}.tar") for index in range(4)]
    assert resolve_shards(str(shard_dir)) == expected
    assert resolve_shards(f"{shard_dir}/") == expected
    assert resolve_shards(f"{shard_dir}/*.tar") == expected
    assert resolve_shards(f"{shard_dir}/{{00000..00003}}.tar") == expected
    assert resolve_shards(f"{shard_dir}/{{00001,00003}}.tar") == [expected[1], expected[3]]
    assert resolve_shards(f"file://{shard_dir}/00002.tar") == [expected[2]]


def test_resolve_shards_returns_absolute_paths(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir.parent)
    assert resolve_shards("shards/0000[01].tar") == [
        str(shard_dir / "00000.tar"),
        str(shard_dir / "00001.tar"),
    ]


@pytest.mark.parametrize(
    "pattern", ["nowhere", "nowhere/*.tar", "shards/{00000..00009}.tar", "shards/*.parquet"]
)
def test_resolve_shards_names_the_spec_when_nothing_or_not_everything_matches(
    shard_dir, monkeypatch, pattern
):
    monkeypatch.chdir(shard_dir.parent)
    with pytest.raises(FileNotFoundError, match=pattern.split("/")[0]):
        resolve_shards(pattern)


def test_a_directory_without_shards_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_shards(str(tmp_path))


def test_remote_brace_patterns_are_expanded_without_listing():
    # No credentials or network here: a listing attempt would fail, so this proves none is made.
    assert resolve_shards("s3://bucket/laion/{000..002}.tar") == [
        "s3://bucket/laion/000.tar",
        "s3://bucket/laion/001.tar",
        "s3://bucket/laion/002.tar",
    ]


def test_remote_directories_and_globs_are_listed_through_fsspec():
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for name in ("00001.tar", "00000.tar", "readme.md"):
        memory.pipe(f"/bucket/corpus/{name}", b"")
    try:
        expected = ["memory:///bucket/corpus/00000.tar", "memory:///bucket/corpus/00001.tar"]
        assert resolve_shards("memory://bucket/corpus/") == expected
        assert resolve_shards("memory://bucket/corpus/*.tar") == expected
        with pytest.raises(FileNotFoundError, match="memory://bucket/empty"):
            resolve_shards("memory://bucket/empty/")
    finally:
        memory.rm("/bucket", recursive=True)


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_shards", REPO_ROOT / "jobs" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_demo_shards_and_reports_where(tmp_path, capsys):
    cli = _load_cli()
    out_dir = tmp_path / "demo"
    code = cli.main(
        ["demo", "--out", str(out_dir), "--num-samples", "12", "--shard-size", "5", "--seed", "1"]
    )
    assert code == 0
    assert sorted(path.name for path in out_dir.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    assert f"wrote 3 shards to {out_dir}" in capsys.readouterr().out


def test_cli_folder_reports_bad_input_without_a_traceback(tmp_path, capsys):
    cli = _load_cli()
    _make_image_folder(tmp_path / "images")
    (tmp_path / "c.csv").write_text("file,caption\nmissing.jpg,x\n", encoding="utf-8")
    code = cli.main(
        [
            "folder",
            "--images",
            str(tmp_path / "images"),
            "--captions",
            str(tmp_path / "c.csv"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "c.csv:2" in capsys.readouterr().err
