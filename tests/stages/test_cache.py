"""Stage caching: a finished stage is skipped, a failed one leaves nothing that looks finished."""

import time

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


WRITER = """
import sys, time
from pathlib import Path
from pipeline.stages.cache import run_stage

workdir, gate = Path(sys.argv[1]), Path(sys.argv[2])

def work(out):
    (out / "started").write_text("1")
    while not gate.exists():  # holds the stage until the test opens the gate
        time.sleep(0.05)
    (out / "result.txt").write_text("from the first run")
    return {"by": "first"}

print(run_stage(workdir, "demo", "k", work).status, flush=True)
"""


def _start_writer(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(tmp_path / "gate")],
                            stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "demo").glob("k.tmp-*/started")):
        assert proc.poll() is None and time.time() < deadline, "the first run did not start its stage"
        time.sleep(0.05)
    return proc


def test_a_second_run_waits_for_the_stage_another_holds_then_finds_it_done(tmp_path, capsys, monkeypatch):
    import threading

    import pipeline.stages.cache as cache

    monkeypatch.setattr(cache, "LOCK_WAIT_REPORT_S", 0.2)
    first = _start_writer(tmp_path)
    threading.Timer(1.5, lambda: (tmp_path / "gate").write_text("open")).start()
    second = run_stage(tmp_path, "demo", "k", lambda out: pytest.fail("the second run must not redo the stage"))
    assert first.communicate(timeout=60)[0].strip() == "ran"
    assert second.status == "cached" and second.metrics == {"by": "first"}
    assert (second.output / "result.txt").read_text() == "from the first run"
    waiting = capsys.readouterr().out
    assert "[demo] waiting for another run to finish this stage" in waiting and f"pid {first.pid}" in waiting


def test_the_lock_of_a_run_that_died_is_taken_over_and_its_directory_removed(tmp_path, capsys):
    import signal

    first = _start_writer(tmp_path)
    left_behind = list((tmp_path / "demo").glob("k.tmp-*"))
    first.send_signal(signal.SIGKILL)  # dies holding the stage, mid-work
    first.wait(timeout=30)
    result = run_stage(tmp_path, "demo", "k", lambda out: {"by": "second"})
    assert result.status == "ran" and result.metrics == {"by": "second"}
    assert left_behind and not any(path.exists() for path in left_behind)
    assert f"taking over from a run that stopped while it held this stage: pid {first.pid}" in capsys.readouterr().out
