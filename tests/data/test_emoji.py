"""The quality benchmark's real images (`make benchmark-data`): one caption each, the composed pairs held out."""

from __future__ import annotations

import tarfile
from pathlib import Path

from pipeline.data import emoji as E


def test_catalogue_has_one_caption_per_image_and_composed_pairs_that_compose():
    emoji = E.catalogue(E.require())
    assert len(emoji) > 3000
    assert len({e.caption for e in emoji}) == len(emoji) == len({e.key for e in emoji})
    held = E.composed_pairs(emoji)
    assert len(held) > 50
    held_keys = {e.key for e in held}
    train = [e for e in emoji if e.key not in held_keys]
    for e in held:
        assert e.tone in E.SKIN_TONES.values() and e.caption == f"{e.base}, {e.tone} skin tone"
        # The concept is seen with other tones and the tone with other concepts, never the two together.
        assert sum(t.base == e.base and t.tone in E.SKIN_TONES.values() for t in train) == 4
        assert sum(t.tone == e.tone and t.base != e.base for t in train) > 100


def test_shards_leave_the_composed_pairs_out(tmp_path):
    manifest = E.write_emoji_shards(E.require(), tmp_path, shard_size=2000)
    keys = set()
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {name.split(".")[0] for name in tar.getnames()}
    assert len(keys) == manifest["num_images"] - manifest["num_composed"]
    assert not keys & set(manifest["composed"])
    # Written once: the stage cache knows shards by size and mtime, so a rewrite would retrain everything.
    mtimes = {shard: Path(shard).stat().st_mtime_ns for shard in manifest["files"]}
    assert E.write_emoji_shards(E.require(), tmp_path, shard_size=2000) == manifest
    assert {shard: Path(shard).stat().st_mtime_ns for shard in manifest["files"]} == mtimes
