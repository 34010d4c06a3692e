"""A user's own small data set through the whole workflow with the default config: a folder of
non-square JPEGs (half 2:1 landscapes, half 1:2 portraits) with free-form captions (no demo
vocabulary), sharded with jobs/make_shards.py's `folder` path, trained at another image size (48)
in aspect-ratio buckets through the real components, some captions longer than any text context, no
prompts given (the samples are of held-out captions). The set is smaller than the default clip and
ldm batches: they shrink to fit instead of waiting forever for a batch. The first stage trains with
the VQGAN objective (`vq.loss=vqgan`), its discriminator starting half way."""

import csv
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data.reader import is_heldout
from pipeline.workflow import run_workflow

pytestmark = pytest.mark.slow  # the whole workflow: `make test-fast` leaves it out

ROOT = Path(__file__).resolve().parent.parent
HELDOUT_FRACTION = load_config(None, []).data.heldout_fraction
PLACES = ["sunset", "forest", "harbour", "mountain", "city street", "meadow", "snowfield", "desert"]


def write_folder(directory: Path, train_count: int) -> None:
    """`train_count` images in the training split, half 100 x 50 landscapes, half 50 x 100 portraits,
    one caption in ten alt-text-long; plus the held-out ones (`data.heldout_fraction`, by key: the
    folder's row index) between them, which the encode stage leaves out."""
    rng = np.random.default_rng(0)
    (directory / "photos").mkdir(parents=True)
    with open(directory / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        i, trained = 0, 0
        while trained < train_count:
            heldout = is_heldout(f"{i:09d}", HELDOUT_FRACTION)  # make_shards' key: the zero-padded row
            n = i if heldout else trained
            # Each orientation in a bucket of its own, uncropped.
            pixels = (rng.random((50, 100, 3) if n % 2 == 0 else (100, 50, 3)) * 255).astype("uint8")
            pixels[:25, :25] = rng.integers(0, 255, 3)
            Image.fromarray(pixels).save(directory / "photos" / f"img{i:03d}.jpg")
            caption = f"a photo of a {PLACES[n % len(PLACES)]}, number {i}"
            if n % 10 == 0:  # one in ten is alt-text-long: more tokens than CLIP's context of 77
                caption += ", seen from the road" + " with hills and trees" * 20
            writer.writerow([f"img{i:03d}.jpg", caption])
            trained += not heldout
            i += 1


def test_own_folder_of_captioned_jpegs_at_another_size_in_buckets(ray_session, tmp_path, free_port, capsys):
    write_folder(tmp_path, 60)
    subprocess.run([sys.executable, str(ROOT / "jobs" / "make_shards.py"), "folder", "--images",
                    str(tmp_path / "photos"), "--captions", str(tmp_path / "captions.csv"),
                    "--out", str(tmp_path / "shards"), "--shard-size", "64"], check=True, cwd=ROOT)
    cfg = load_config(None, [
        f"workdir={tmp_path / 'work'}", f"data.shards={tmp_path / 'shards'}", "data.image_size=48",
        "vq.max_steps=6", "vq.loss=vqgan", "vq.disc_start=3", "clip.max_steps=6", "ldm.epochs=2", "ldm.sample_every=0", "samples.steps=3",
        "samples.num_per_prompt=1", "samples.prompts=[]", "samples.heldout_prompts=2", f"serve.port={free_port}",
    ])
    summary = json.loads(run_workflow(cfg).read_text())
    stages = summary["stages"]
    assert list(stages) == ["vq", "clip", "encode", "ldm", "samples", "evaluate", "promote"]  # no demo shards stage
    assert all(stage["status"] == "ran" for stage in stages.values())
    encode = stages["encode"]["metrics"]
    assert encode["samples"] == 60 and encode["heldout_samples"] > 0 and sum(encode["skipped"].values()) == 0
    # Buckets around 48² pixels: each image in the one of its aspect, none cropped (a square crop would cut half).
    assert encode["buckets"] == {"32x64": 30, "64x32": 30} and encode["crop_max"] == 0.0
    assert 0.0 <= stages["vq"]["metrics"]["codebook_usage"] <= 1.0 and np.isfinite(stages["vq"]["metrics"]["psnr"])
    clip = stages["clip"]["metrics"]
    assert set(clip) == {"retrieval_top1", "model_version", "context_length", "captions_truncated"}  # no demo figures
    # The text context is sized from the captions: more than 1% are long, so CLIP's 77, which cuts
    # only those; the encode stage counts the same captions over the whole set.
    assert clip["context_length"] == 77 and 0.0 < clip["captions_truncated"] < 0.2
    assert stages["encode"]["metrics"]["captions_truncated"] == 0.1
    # ldm.batch_size 64, one worker: a global batch comes from one bucket of 30.
    ldm = stages["ldm"]["metrics"]
    assert ldm["global_batch"] == 30 and ldm["bucket_batches_per_epoch"] == {"32x64": 1, "64x32": 1}
    assert ldm["samples_unused_per_epoch"] == 0
    # The budget in epochs (ldm.max_steps left at 0): 2 passes of 2 global batches, and why.
    assert (ldm["steps"], ldm["epochs"]) == (4, 2)
    from mlflow import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    children = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    vq_run = next(run for run in children if run.data.tags["stage"] == "vq")
    # The discriminator trained (after the warm-up of 3 steps) beside the VQ, under Ray Train.
    d_loss = client.get_metric_history(vq_run.info.run_id, "d_loss")
    assert sorted(m.step for m in d_loss) == [4, 5, 6] and all(np.isfinite(m.value) for m in d_loss)
    assert {"g_loss", "adv_weight", "perceptual_loss"} <= set(vq_run.data.metrics)
    # Every caption its own: the first stage with detail to keep (vq.preset=auto), and why.
    assert vq_run.data.tags["recipe.vq"].startswith("detailed (") and stages["vq"]["metrics"]["num_quantizers"] == 4
    assert "60 distinct captions over 60 samples" in vq_run.data.tags["recipe.vq"]
    ldm_run = next(run for run in children if run.data.tags["stage"] == "ldm")
    assert ldm_run.data.params["ldm.max_steps"] == "4"
    assert ldm_run.data.tags["recipe.ldm"] == "ldm.epochs=2 is set: 4 steps of 2 an epoch"
    assert len(client.get_metric_history(ldm_run.info.run_id, "loss")) == 4
    encode_run = next(run for run in children if run.data.tags["stage"] == "encode")
    assert encode_run.data.metrics["buckets.32x64"] == 30 and encode_run.data.metrics["crop_max"] == 0.0
    assert not any(name.startswith("adherence") for name in stages["samples"]["metrics"])
    # Quality figures on the user's own captions: FD and CLIP score per guidance scale, no demo judge.
    evaluate = stages["evaluate"]["metrics"]
    assert sorted(k for k in evaluate if k.startswith("fd_")) and not any(k.startswith("adherence") for k in evaluate)
    assert all(np.isfinite(v) and v >= 0 for k, v in evaluate.items() if k.startswith(("fd_", "clip_score_")))
    assert summary["promotion"]["decision"] == "promoted"
    # No prompts given: the samples are of held-out captions, the user's own words.
    records = [json.loads(line) for line in (Path(summary["samples_dir"]) / "manifest.jsonl").read_text().splitlines()]
    with open(tmp_path / "captions.csv") as f:
        captions = {row["caption"] for row in csv.DictReader(f)}
    assert len(records) == 2 and all(r["prompt"] in captions for r in records)
    for record in records:  # the default size: the most populated bucket (both hold 30: the first)
        assert Image.open(Path(summary["samples_dir"]) / record["file"]).size == (32, 64)
    # Any of the model's buckets on request; another size is an error listing them.
    main = runpy.run_path(str(ROOT / "jobs" / "sample.py"))["main"]
    args = ["--model", summary["model_uri"], "--tracking-uri", summary["tracking_uri"], f"serve.port={free_port}",
            "--prompt", records[0]["prompt"], "--steps", "2"]
    assert main(args + ["--width", "64", "--height", "32", "--out", str(tmp_path / "wide")]) == 0
    assert Image.open(tmp_path / "wide" / "00000.png").size == (64, 32)
    assert main(args + ["--width", "48", "--height", "48", "--out", str(tmp_path / "square")]) == 2
    assert "32x64, 64x32" in capsys.readouterr().err


def test_batch_size_fits_a_small_data_set_and_too_few_samples_name_the_keys():
    import pytest

    from pipeline.training.first_stage import fit_batch_size

    assert fit_batch_size(1000, 64, 2, "ldm") == 64
    assert fit_batch_size(100, 64, 2, "ldm") == 50
    with pytest.raises(ValueError, match=r"clip\.num_workers=4"):
        fit_batch_size(3, 128, 4, "clip")
