"""A user's own small data set through the whole workflow with the default config: a folder of
non-square JPEGs with free-form captions (no demo vocabulary), sharded with jobs/make_shards.py's
`folder` path, trained at another image size (48) through the real components, some captions
longer than any text context, no prompts given (the samples are of held-out captions). The set is smaller than the default clip and ldm batches: they
shrink to fit instead of waiting forever for a batch."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.workflow import run_workflow

pytestmark = pytest.mark.slow  # the whole workflow: `make test-fast` leaves it out

ROOT = Path(__file__).resolve().parent.parent
PLACES = ["sunset", "forest", "harbour", "mountain", "city street", "meadow", "snowfield", "desert"]


def write_folder(directory: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    (directory / "photos").mkdir(parents=True)
    with open(directory / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for i in range(count):
            pixels = (rng.random((30, 50, 3)) * 255).astype("uint8")  # 50 x 30: resized and centre-cropped
            pixels[:, :25] = rng.integers(0, 255, 3)
            Image.fromarray(pixels).save(directory / "photos" / f"img{i:03d}.jpg")
            caption = f"a photo of a {PLACES[i % len(PLACES)]}, number {i}"
            if i % 10 == 0:  # one in ten is alt-text-long: more tokens than CLIP's context of 77
                caption += ", seen from the road" + " with hills and trees" * 20
            writer.writerow([f"img{i:03d}.jpg", caption])


def test_own_folder_of_captioned_jpegs_at_another_size(ray_session, tmp_path, free_port):
    write_folder(tmp_path, 60)
    subprocess.run([sys.executable, str(ROOT / "jobs" / "make_shards.py"), "folder", "--images",
                    str(tmp_path / "photos"), "--captions", str(tmp_path / "captions.csv"),
                    "--out", str(tmp_path / "shards"), "--shard-size", "64"], check=True, cwd=ROOT)
    cfg = load_config(None, [
        f"workdir={tmp_path / 'work'}", f"data.shards={tmp_path / 'shards'}", "data.image_size=48",
        "vq.max_steps=6", "clip.max_steps=6", "ldm.max_steps=4", "ldm.sample_every=0", "samples.steps=3",
        "samples.num_per_prompt=1", "samples.prompts=[]", "samples.heldout_prompts=2", f"serve.port={free_port}",
    ])
    summary = json.loads(run_workflow(cfg).read_text())
    stages = summary["stages"]
    assert list(stages) == ["vq", "clip", "encode", "ldm", "samples"]  # no demo shards stage
    assert all(stage["status"] == "ran" for stage in stages.values())
    assert stages["encode"]["metrics"]["samples"] == 60 and sum(stages["encode"]["metrics"]["skipped"].values()) == 0
    assert 0.0 <= stages["vq"]["metrics"]["codebook_usage"] <= 1.0 and np.isfinite(stages["vq"]["metrics"]["psnr"])
    clip = stages["clip"]["metrics"]
    assert set(clip) == {"retrieval_top1", "model_version", "context_length", "captions_truncated"}  # no demo figures
    # The text context is sized from the captions: more than 1% are long, so CLIP's 77, which cuts
    # only those; the encode stage counts the same captions over the whole set.
    assert clip["context_length"] == 77 and 0.0 < clip["captions_truncated"] < 0.2
    assert stages["encode"]["metrics"]["captions_truncated"] == 0.1
    assert stages["ldm"]["metrics"]["global_batch"] == 60  # ldm.batch_size 64, one worker, 60 latents
    assert not any(name.startswith("adherence") for name in stages["samples"]["metrics"])
    # No prompts given: the samples are of held-out captions, the user's own words.
    records = [json.loads(line) for line in (Path(summary["samples_dir"]) / "manifest.jsonl").read_text().splitlines()]
    with open(tmp_path / "captions.csv") as f:
        captions = {row["caption"] for row in csv.DictReader(f)}
    assert len(records) == 2 and all(r["prompt"] in captions for r in records)
    for record in records:
        assert Image.open(Path(summary["samples_dir"]) / record["file"]).size == (48, 48)


def test_batch_size_fits_a_small_data_set_and_too_few_samples_name_the_keys():
    import pytest

    from pipeline.training.first_stage import fit_batch_size

    assert fit_batch_size(1000, 64, 2, "ldm") == 64
    assert fit_batch_size(100, 64, 2, "ldm") == 50
    with pytest.raises(ValueError, match=r"clip\.num_workers=4"):
        fit_batch_size(3, 128, 4, "clip")
