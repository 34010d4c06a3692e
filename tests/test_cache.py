"""Stage caching: a finished stage is skipped, a failed one leaves nothing that looks finished."""

import pytest

from pipeline.stages.cache import content_key, dir_digest, run_stage


def test_finished_stage_is_cached_with_its_metrics(tmp_path):
    calls = []

    def work(out):
        calls.append(out)
        (out / "result.txt").write_text("done")
        return {"score": 0.5}

    first = run_stage(tmp_path, "demo", "k1", work)
    second = run_stage(tmp_path, "demo", "k1", work)
    assert first.status == "ran" and second.status == "cached"
    assert len(calls) == 1
    assert second.metrics == {"score": 0.5}
    assert (second.output / "result.txt").read_text() == "done"
    assert run_stage(tmp_path, "demo", "k2", work).status == "ran"  # another key runs again


def test_failed_stage_leaves_no_finished_output_and_reruns(tmp_path):
    def crash(out):
        (out / "partial.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "demo", "k", crash)
    assert not (tmp_path / "demo" / "k").exists()
    result = run_stage(tmp_path, "demo", "k", lambda out: {"ok": 1})
    assert result.status == "ran"
    assert not list((tmp_path / "demo").glob("k.tmp-*"))  # the stale temporary directory is gone


def test_keys_change_with_content(tmp_path):
    assert content_key("a", "b") != content_key("ab")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"1")
    before = dir_digest(tmp_path / "m")
    (tmp_path / "m" / "w.bin").write_bytes(b"2")
    assert dir_digest(tmp_path / "m") != before
