"""The whole workflow on a tiny config through the real components (Ray Data, Ray Train + DeepSpeed,
MLflow, Ray Serve), run once for the session (conftest's `demo_run`, whose shared stages
test_sweep's trials reuse); then the cached re-run, jobs/sample.py and the app's answers to bad
requests."""

import dataclasses
import json
import runpy
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import load_config
from pipeline.data.reader import is_heldout
from pipeline.data.shards import demo_key
from pipeline.workflow import run_workflow

pytestmark = pytest.mark.slow  # whole stages, servers or clusters: `make test-fast` leaves them out

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on the left", "a blue square on the right"]


def tiny_overrides(workdir: Path, port: int) -> list[str]:
    return [
        f"workdir={workdir}",
        "data.demo_num_samples=192", "data.demo_shard_size=64",
        "vq.max_steps=8", "vq.batch_size=16",
        "clip.max_steps=8", "clip.batch_size=32",
        "ldm.max_steps=6", "ldm.checkpoint_every=3", "ldm.sample_every=3", "ldm.batch_size=8", "ldm.log_every=2",
        "samples.steps=3", "samples.num_per_prompt=2", "samples.adherence_images=12", f"samples.prompts=[{','.join(PROMPTS)}]",
        f"serve.port={port}",
    ]


def tiny_config(workdir: Path, port: int, *more: str):
    return load_config(None, tiny_overrides(workdir, port) + list(more))


def test_summary_names_every_stage_with_status_time_and_metrics(demo_run):
    cfg, path, summary = demo_run
    assert path == Path(cfg.workdir).resolve() / "summary.json"
    assert list(summary["stages"]) == ["shards", "vq", "clip", "encode", "ldm", "samples", "evaluate", "promote"]
    for name, stage in summary["stages"].items():
        assert stage["status"] == "ran", name
        assert stage["seconds"] > 0
        assert isinstance(stage["metrics"], dict)
    encode = summary["stages"]["encode"]["metrics"]  # the training split; the held-out one is the evaluate stage's
    train = sum(not is_heldout(demo_key(i), cfg.data.heldout_fraction) for i in range(192))
    assert (encode["samples"], encode["heldout_samples"]) == (train, 192 - train) and 0 < train < 192
    assert {"psnr", "codebook_usage", "latent_scale"} <= set(summary["stages"]["vq"]["metrics"])
    clip = summary["stages"]["clip"]["metrics"]  # demo captions: an exact and a same-content figure
    assert 0.0 <= clip["retrieval_top1"] <= clip["retrieval_top1_content"] <= 1.0
    samples = summary["stages"]["samples"]["metrics"]
    for scale in ("g1", "g3"):  # judged from pixels on 12 demo prompts per guidance scale
        assert samples[f"adherence_{scale}_images"] == 12
        assert 0.0 <= samples[f"adherence_{scale}"] <= samples[f"adherence_{scale}_colour"] <= 1.0
        assert 0.0 <= samples[f"adherence_{scale}_new_wording"] <= 1.0  # wordings the data never pairs with that content
    assert summary["model_uri"].startswith("models:/ldm-pipeline/")
    assert summary["tracking_uri"] == cfg.tracking_uri


def test_samples_follow_the_manifest(demo_run):
    _, _, summary = demo_run
    samples = Path(summary["samples_dir"])
    records = [json.loads(line) for line in (samples / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert [r["seed"] for r in records] == [0, 1, 0, 1]
    for record in records:
        assert set(record) == {"file", "prompt", "seed", "guidance_scale", "steps", "sampler"}
        assert record["steps"] == 3
        image = Image.open(samples / record["file"])
        assert image.format == "PNG" and image.size == (32, 32)
    assert Image.open(samples / "grid.png").size[0] > 32


def test_mlflow_has_a_parent_run_a_child_per_stage_and_the_registered_model(demo_run):
    cfg, _, summary = demo_run
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["ldm.max_steps"] == "6"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {run.data.tags["stage"]: run for run in children}
    assert set(by_stage) == {"shards", "vq", "clip", "encode", "ldm", "samples", "evaluate", "promote"}
    ldm = by_stage["ldm"]
    assert ldm.data.params["ldm.p_uncond"] == "0.1"
    # The UNet chosen after the vq stage (ldm.preset=auto), and why, on the workflow and ldm runs.
    assert parent.data.tags["recipe.unet"] == ldm.data.tags["recipe.unet"] == "tiny: ldm.preset=auto: ldm.use_gpu=false: the CPU-sized UNet"
    # rank 0 logged per-step training metrics
    losses = client.get_metric_history(ldm.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    for metric in ("lr", "grad_norm", "data_wait_frac", "nonfinite_steps"):  # (step 0: the stage's total)
        steps = [m.step for m in client.get_metric_history(ldm.info.run_id, metric) if m.step > 0]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6], metric
    # the in-training sample grid of the EMA weights, every ldm.sample_every steps and at the end
    grids = [a.path for a in client.list_artifacts(ldm.info.run_id, "samples")]
    assert grids == ["samples/step_000003.png", "samples/step_000006.png"]
    assert "psnr" in by_stage["vq"].data.metrics
    vq = summary["stages"]["vq"]["metrics"]  # the first stage chosen from the captions it read, and why
    assert f"{vq['distinct_captions']} distinct captions over {vq['train_samples']} samples" in by_stage["vq"].data.tags["recipe.vq"]
    name, version = summary["model_uri"].split("/")[1:]
    model_version = client.get_model_version(name, version)
    assert client.get_model_version_by_alias(name, cfg.mlflow.alias).version == model_version.version
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "samples")]
    assert "samples/grid.png" in artifacts


def test_the_workflow_run_carries_its_stages_headline_figures_in_a_model_training_experiment(demo_run):
    """Two workflow runs compare at the top level of the MLflow UI: their stages' figures are
    columns of the workflow run, and the experiment opens in the model-training view."""
    cfg, _, summary = demo_run
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"]).data.metrics
    stages = summary["stages"]
    for name, stage in stages.items():
        assert parent[f"{name}.seconds"] == pytest.approx(stage["seconds"]), name
    for name, metric in [("vq", "psnr"), ("vq", "codebook_usage"), ("clip", "retrieval_top1"), ("encode", "samples"),
                         ("ldm", "final_loss"), ("ldm", "train_img_per_s"), ("samples", "adherence_g3"),
                         ("samples", "adherence_g1"), ("samples", "grid_adherence_g3"), ("promote", "promoted"),
                         *[("evaluate", f"{kind}_{fd_encoder(summary)}_g{s}") for kind in ("fd", "clip_score")
                           for s in (f"{scale:g}" for scale in cfg.evaluate.guidance_scales)]]:
        assert parent[f"{name}.{metric}"] == pytest.approx(stages[name]["metrics"][metric]), (name, metric)
    experiment = client.get_experiment(summary["mlflow_experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_vq_and_clip_are_registered_and_reload_by_uri(demo_run):
    import base64
    import io

    import mlflow
    import pandas as pd
    import torch

    from pipeline.components import load_text_encoder, load_vq
    from pipeline.models.text import TextEncoder
    from pipeline.models.vq import VQModel

    cfg, _, summary = demo_run
    client = MlflowClient(summary["tracking_uri"])
    stages = summary["stages"]
    vq, meta = load_vq(summary["vq_model_uri"], cfg.tracking_uri)
    local_vq, local_meta = VQModel.load(stages["vq"]["output"])
    assert meta["latent_scale"] == local_meta["latent_scale"] == stages["vq"]["metrics"]["latent_scale"]
    assert all(torch.equal(a, b) for a, b in zip(vq.state_dict().values(), local_vq.state_dict().values()))
    name = f"{cfg.mlflow.registered_model_name}-clip"  # the alias resolves to the same version
    assert summary["clip_model_uri"] == f"models:/{name}/{client.get_model_version_by_alias(name, cfg.mlflow.alias).version}"
    text = load_text_encoder(f"models:/{name}@{cfg.mlflow.alias}", cfg.tracking_uri)
    expected = TextEncoder.load(stages["clip"]["output"]).encode(PROMPTS).pooled
    assert torch.equal(text.encode(PROMPTS).pooled, expected)
    # the pyfunc faces: captions -> pooled embeddings; PNGs -> reconstructions of the same size
    embeddings = mlflow.pyfunc.load_model(summary["clip_model_uri"]).predict(pd.DataFrame({"caption": PROMPTS}))
    assert torch.allclose(torch.tensor(embeddings), expected, atol=1e-6)
    first = Path(summary["samples_dir"], "manifest.jsonl").read_text().splitlines()[0]
    png = Path(summary["samples_dir"], json.loads(first)["file"])
    recon = mlflow.pyfunc.load_model(summary["vq_model_uri"]).predict(
        pd.DataFrame({"image": [base64.b64encode(png.read_bytes()).decode()]}))
    assert Image.open(io.BytesIO(base64.b64decode(recon[0]))).size == Image.open(png).size
    # the reconstruction grid is on the vq stage's run
    vq_run = client.get_run(json.loads((Path(stages["vq"]["output"]) / "registered.json").read_text())["run_id"])
    assert [a.path for a in client.list_artifacts(vq_run.info.run_id, "recon")] == ["recon/recon.png"]


def test_pretrained_clip_file_and_registered_vq_are_loaded_not_trained(demo_run, tmp_path):
    """clip.pretrained: a checkpoint file this test saved (torch state dict, weights_only load);
    vq.pretrained: the VQ registered by the run, by URI. Neither stage trains."""
    import torch

    from pipeline.data.locate import resolve_shards
    from pipeline.models.text import TextEncoder, build_text_encoder
    from pipeline.models.vq import VQModel
    from pipeline.stages.clip import encoder_spec, run_clip
    from pipeline.stages.vq import run_vq

    cfg, _, summary = demo_run
    shards = resolve_shards(summary["stages"]["shards"]["output"])
    torch.manual_seed(123)
    saved = build_text_encoder(encoder_spec(cfg)).clip.state_dict()
    torch.save(saved, tmp_path / "clip.pt")
    pretrained = load_config(None, [f"workdir={cfg.workdir}", f"clip.pretrained={tmp_path / 'clip.pt'}",
                                    f"vq.pretrained={summary['vq_model_uri']}", "data.demo_num_samples=192",
                                    "data.demo_shard_size=64"])
    metrics = run_clip(pretrained, shards, tmp_path / "clip", None)
    assert 0.0 <= metrics["retrieval_top1"] <= 1.0
    loaded = TextEncoder.load(tmp_path / "clip").clip.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    vq_metrics = run_vq(pretrained, shards, tmp_path / "vq", None)
    registered, _ = VQModel.load(summary["stages"]["vq"]["output"])
    loaded_vq, _ = VQModel.load(tmp_path / "vq")
    assert all(torch.equal(a, b) for a, b in zip(registered.state_dict().values(), loaded_vq.state_dict().values()))
    # Nothing trained, nothing counted by the vq stage: where the UNet's choice needs the training
    # set's size (ldm.preset=auto on a GPU), the workflow counts it itself; on CPUs it needs none.
    assert "train_samples" not in vq_metrics
    from pipeline.stages.cache import StageResult
    from pipeline.workflow import Workflow

    loaded = StageResult("vq", "k", tmp_path / "vq", "ran", 0.0, vq_metrics)
    on_gpu = Workflow(dataclasses.replace(pretrained, ldm=dataclasses.replace(pretrained.ldm, use_gpu=True)))
    on_gpu.shards = shards
    trained = summary["stages"]["encode"]["metrics"]["samples"]  # the training split, as encode counted it
    assert on_gpu.unet_inputs(loaded) == (trained, cfg.data.image_size // 4)
    assert Workflow(pretrained).unet_inputs(loaded) == (0, cfg.data.image_size // 4)
    with pytest.raises(FileNotFoundError, match="clip.pretrained"):
        bad = load_config(None, [f"workdir={cfg.workdir}", "clip.pretrained=laion2b_s34b_b79k"])
        run_clip(bad, shards, tmp_path / "clip-bad", None)


def test_a_diffusers_autoencoder_directory_is_the_first_stage_of_the_vq_and_encode_stages(demo_run, tmp_path):
    """vq.pretrained: a diffusers AutoencoderKL directory this test saved (downsampling 4, as the
    demo's VQ). The vq stage measures its latent scale on the data and keeps it in the pipeline's
    layout; the encode stage writes its latents, which decode through it."""
    import diffusers
    import pyarrow.parquet as pq
    import torch

    from pipeline.data.locate import resolve_shards
    from pipeline.models.vq import VQModel
    from pipeline.stages.encode import run_encode
    from pipeline.stages.vq import run_vq

    cfg, _, summary = demo_run
    torch.manual_seed(0)
    autoencoder = diffusers.AutoencoderKL(block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
                                          latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                                          up_block_types=("UpDecoderBlock2D",) * 3).eval()
    autoencoder.save_pretrained(tmp_path / "sd-like" / "vae", safe_serialization=True)
    shards = resolve_shards(summary["stages"]["shards"]["output"])
    pretrained = load_config(None, [f"workdir={cfg.workdir}", f"vq.pretrained={tmp_path / 'sd-like'}",
                                    "data.demo_num_samples=192", "data.demo_shard_size=64"])
    metrics = run_vq(pretrained, shards, tmp_path / "vq", None)
    assert metrics["psnr"] > 0 and "codebook_usage" not in metrics  # no codes in a KL latent space
    assert metrics["latent_scale"] != autoencoder.config.scaling_factor  # measured on the data
    first_stage, meta = VQModel.load(tmp_path / "vq")
    assert meta["latent_scale"] == metrics["latent_scale"]
    encoded = run_encode(pretrained, shards, tmp_path / "vq", summary["stages"]["clip"]["output"], tmp_path / "enc")
    assert encoded["samples"] + encoded["heldout_samples"] == 192 and encoded["heldout_samples"] > 0
    stored = json.loads((tmp_path / "enc" / "metadata.json").read_text())
    assert stored["latent_shape"] == [4, 8, 8] and stored["latent_scale"] == metrics["latent_scale"]
    latents = pq.read_table(str(tmp_path / "enc" / "data"), columns=["latent"]).column("latent")
    latent = torch.from_numpy(latents.combine_chunks().to_numpy()[:2].astype("float32"))
    with torch.no_grad():
        torch.testing.assert_close(first_stage.decode(latent), autoencoder.decode(latent).sample, rtol=0, atol=1e-6)


def test_a_second_run_finds_every_stage_cached(demo_run):
    cfg, _, first = demo_run
    second = json.loads(run_workflow(cfg).read_text())
    assert {s["status"] for s in second["stages"].values()} == {"cached"}
    assert second["model_uri"] == first["model_uri"]
    assert second["stages"]["vq"]["metrics"] == first["stages"]["vq"]["metrics"]


def test_sample_job_writes_pngs_grid_and_manifest_deterministically(demo_run, tmp_path, free_port, monkeypatch):
    cfg, _, summary = demo_run
    main = runpy.run_path(str(ROOT / "jobs" / "sample.py"))["main"]
    args = ["--model", summary["model_uri"], "--tracking-uri", summary["tracking_uri"], f"serve.port={free_port}",
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2", "--num-per-prompt", "2"]
    assert main(args + ["serve.prot=1", "--out", str(tmp_path / "bad")]) == 2  # like every job: a bad key
    assert not (tmp_path / "bad").exists()
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png", "manifest.jsonl"]
    for name in ("00000.png", "00003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "00000.png").read_bytes() != (tmp_path / "a" / "00001.png").read_bytes()
    manifest = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0] == {"file": "00000.png", "prompt": PROMPTS[0], "seed": 0,
                           "guidance_scale": 3.0, "steps": 2, "sampler": "ddim"}


def _post(url: str, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_serve_app_answers_pngs_and_names_bad_fields(demo_run, free_port):
    from ray import serve

    from pipeline.config import ServeConfig
    from pipeline.sample_client import ensure_app

    cfg, _, summary = demo_run
    assert ensure_app(summary["model_uri"], summary["tracking_uri"], ServeConfig(port=free_port))
    url = f"http://127.0.0.1:{free_port}/generate"
    try:
        status, headers, body = _post(url, json.dumps({"prompt": PROMPTS[0], "steps": 2}).encode())
        assert status == 200 and headers["Content-Type"] == "image/png" and body[:4] == b"\x89PNG"
        assert headers["X-Model-Version"] == summary["model_uri"]
        status, _, body = _post(url, json.dumps({"prompt": PROMPTS[0], "steps": 2, "num_images": 2}).encode())
        assert status == 200 and len(json.loads(body)["images"]) == 2
        bad = [
            (b"not json", "body"),
            (json.dumps({"steps": 2}).encode(), "prompt"),
            (json.dumps({"prompt": "x", "steps": 0}).encode(), "steps"),
            (json.dumps({"prompt": "x", "guidance_scale": 31}).encode(), "guidance_scale"),
            (json.dumps({"prompt": "x", "num_images": "2"}).encode(), "num_images"),
            (json.dumps({"prompt": "x", "sampler": "euler"}).encode(), "sampler"),
            (json.dumps({"prompt": "x", "colour": "red"}).encode(), "colour"),
        ]
        for payload, field in bad:
            status, _, body = _post(url, payload)
            assert status == 400, field
            assert json.loads(body)["field"] == field
        status, _, _ = _post(url, json.dumps({"prompt": PROMPTS[1], "steps": 1}).encode())
        assert status == 200  # still up
    finally:
        serve.shutdown()


def test_registered_models_declare_requirements_that_install(demo_run):
    """Every registered model declares the project's pins (what `mlflow models serve` or an
    environment restore installs), never the project itself, which no index serves; its code
    travels inside the model."""
    import tomllib

    import mlflow

    cfg, _, summary = demo_run
    with open(ROOT / "pyproject.toml", "rb") as f:
        pins = set(tomllib.load(f)["project"]["dependencies"])
    for uri in (summary["model_uri"], summary["vq_model_uri"], summary["clip_model_uri"]):
        declared = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
        assert declared and set(declared) <= {p.replace("[train,data,serve]", "[data,serve,train]") for p in pins} | pins
        assert not any(line.startswith("ldm-pipeline") for line in declared), uri
        local = Path(mlflow.artifacts.download_artifacts(uri))
        assert (local / "code" / "pipeline" / "model_package.py").is_file(), sorted(p.name for p in local.iterdir())


def fd_encoder(summary) -> str:
    names = [k[len("fd_"):-len("_g3")] for k in summary["stages"]["evaluate"]["metrics"] if k.startswith("fd_")
             and k.endswith("_g3")]
    assert len(names) == 1, names
    return names[0]


def test_evaluate_reports_fd_and_clip_score_per_guidance_scale_with_its_plot_grids_and_prompts(demo_run):
    _, _, summary = demo_run
    metrics, encoder = summary["stages"]["evaluate"]["metrics"], fd_encoder(summary)
    assert encoder.startswith("clip-")  # the run's own CLIP, named by its weights
    images = metrics["images"]
    assert 2 <= images <= 192 * 0.2  # the held-out split of the 192 demo samples
    scales = [f"{scale:g}" for scale in demo_run[0].evaluate.guidance_scales]
    assert len(scales) >= 2 and "3" in scales  # at least guidance 1 and the promotion scale
    for scale in scales:
        assert metrics[f"fd_{encoder}_g{scale}"] >= 0
        assert 0 <= metrics[f"clip_score_{encoder}_g{scale}"] <= 100
        assert 0 <= metrics[f"adherence_g{scale}"] <= 1  # demo captions: the pixel judge too
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    run = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                             "and tags.stage = 'evaluate'")[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/fd_vs_clip_score.png", "evaluate/prompts.jsonl", "evaluate/evaluation.json",
            *(f"evaluate/grid_g{s}.png" for s in scales)} <= logged
    out = Path(summary["stages"]["evaluate"]["output"])
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [p["seed"] for p in prompts] == list(range(images))  # fixed seeds, logged
    assert [p["key"] for p in prompts] == sorted(p["key"] for p in prompts)  # the same prompts in every run
    assert Image.open(out / "fd_vs_clip_score.png").size[0] >= 400
    grid = Image.open(Path(mlflow_download(summary, run.info.run_id, "evaluate/grid_g3.png")))
    assert min(grid.size) >= 128  # tiles large enough to see, a caption under each
    assert "evaluate/fd_vs_clip_score.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "evaluate")}


def mlflow_download(summary, run_id: str, path: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(summary["tracking_uri"])
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)


def test_the_ldm_run_has_the_fd_curve_of_its_checkpoints_evaluated_beside_training(demo_run):
    """evaluate.every=1: each checkpoint's EMA (steps 3 and 6) is scored in its own task, into the
    ldm run at its step; the curve is in summary.json too."""
    cfg, _, summary = demo_run
    ldm = summary["stages"]["ldm"]["metrics"]
    assert ldm["evaluations"] == 2 and ldm["evaluations_missing"] == 0
    name = f"fd_{fd_encoder(summary)}_g3"
    assert ldm["eval_curve"]["steps"] == [3, 6] and len(ldm["eval_curve"][name]) == 2
    client = MlflowClient(cfg.tracking_uri)
    run = client.search_runs([summary["mlflow_experiment_id"]],
                             f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' and tags.stage = 'ldm'")[0]
    for metric in (name, f"clip_score_{fd_encoder(summary)}_g3"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == [3, 6], metric
        assert all(np.isfinite(m.value) and m.value >= 0 for m in history), metric
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)] == \
        pytest.approx(ldm["eval_curve"][name])


def test_the_first_version_takes_production_and_says_why(demo_run):
    cfg, _, summary = demo_run
    promotion = summary["promotion"]
    assert promotion["decision"] == "promoted" and "no version held 'production'" in promotion["reason"]
    name, version = summary["model_uri"].split("/")[1:]
    assert str(MlflowClient(cfg.tracking_uri).get_model_version_by_alias(name, "production").version) == version
    assert summary["stages"]["promote"]["metrics"]["candidate_fd"] == pytest.approx(
        summary["stages"]["evaluate"]["metrics"][f"fd_{fd_encoder(summary)}_g3"])


def test_the_evaluate_job_gives_the_stages_figures_from_the_cached_heldout_features(demo_run, capsys):
    """The same model, prompts, seeds and encoder: the same figures, by the job users run on any
    registered version; the held-out features are not computed again."""
    cfg, _, summary = demo_run
    main = runpy.run_path(str(ROOT / "jobs" / "evaluate.py"))["main"]
    overrides = tiny_overrides(Path(cfg.workdir), cfg.serve.port)
    assert main(["--model", "models:/ldm-pipeline/nope", *overrides]) == 2  # a clear error, no traceback
    capsys.readouterr()
    assert main(["--model", summary["model_uri"], *overrides]) == 0
    out = capsys.readouterr().out
    assert "held-out features of" in out and ": cached (" in out
    written = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    stage = summary["stages"]["evaluate"]["metrics"]
    assert written["metrics"].keys() == stage.keys()
    for name, value in stage.items():
        assert written["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_a_new_version_takes_production_only_when_its_fd_is_better_or_when_forced(demo_run):
    """A second training (another learning rate) registers version n+1 as candidate; promotion
    samples the production version on the same prompts and seeds and compares the FDs."""
    cfg, _, first = demo_run
    name, first_version = first["model_uri"].split("/")[1:]
    client = MlflowClient(cfg.tracking_uri)
    other = tiny_config(Path(cfg.workdir), cfg.serve.port, "ldm.lr=0.01")
    second = json.loads(run_workflow(other).read_text())
    assert [second["stages"][s]["status"] for s in ("vq", "clip", "encode", "ldm")] == ["cached"] * 3 + ["ran"]
    new_version = second["model_uri"].split("/")[-1]
    assert int(new_version) > int(first_version)
    decision = second["stages"]["promote"]["metrics"]
    assert decision["previous_version"] == int(first_version)
    assert decision["candidate_fd"] == pytest.approx(
        second["stages"]["evaluate"]["metrics"][f"fd_{fd_encoder(second)}_g3"])
    assert decision["production_fd"] == pytest.approx(  # the same prompts, seeds and encoder as the first run's
        first["stages"]["evaluate"]["metrics"][f"fd_{fd_encoder(first)}_g3"], rel=1e-5)
    better = decision["candidate_fd"] < decision["production_fd"]
    assert decision["decision"] == ("promoted" if better else "kept")
    holder = str(client.get_model_version_by_alias(name, "production").version)
    assert holder == (new_version if better else first_version)
    assert str(client.get_model_version_by_alias(name, "candidate").version) == new_version
    run = client.search_runs([second["mlflow_experiment_id"]], f"tags.mlflow.parentRunId = '{second['mlflow_run_id']}' "
                             "and tags.stage = 'promote'")[0]
    assert run.data.tags["promote.decision"] == decision["decision"]
    assert f"version {new_version}" in run.data.tags["promote.reason"] and f"version {first_version}'s" in \
        run.data.tags["promote.reason"]
    # The way past the gate (--force-promote): the version that lost takes the alias all the same.
    loser, loser_version = (cfg, first_version) if better else (other, new_version)
    forced = json.loads(run_workflow(dataclasses.replace(loser, promote=dataclasses.replace(
        loser.promote, force=True))).read_text())
    assert forced["promotion"]["decision"] == "promoted" and forced["promotion"]["reason"].startswith("forced")
    assert forced["stages"]["ldm"]["status"] == "cached" and forced["stages"]["promote"]["status"] == "ran"
    assert str(client.get_model_version_by_alias(name, "production").version) == loser_version


ARTIFACTS = ROOT / "test-artifacts"  # screenshots the browser test keeps (gitignored)


def rendered(url: str, screenshot: Path | None = None, budget_ms: int = 40000, dom: bool = True) -> str:
    """The page's DOM after headless Chromium ran its scripts (and optionally a screenshot of it;
    `dom=False`: only the screenshot, one browser start fewer)."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1200",
            f"--virtual-time-budget={budget_ms}"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    if not dom:
        return ""
    return subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout


def test_the_mlflow_ui_shows_the_runs_their_figures_and_charts_in_a_browser(demo_run, free_port):
    """A real MLflow server on the run's store, opened in headless Chromium as a user would: the
    experiment in its model-training view lists the workflow run; comparing workflow runs shows
    the stages' headline figures (the evaluation's FD and CLIP score among them) and a chart."""
    import subprocess
    import sys

    from pipeline.localservices import _wait_http

    cfg, _, summary = demo_run
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "mlflow-server.log"
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               cfg.tracking_uri, "--host", "127.0.0.1", "--port", str(free_port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{free_port}"
        _wait_http(f"{base}/health", "mlflow server", server, log)
        experiment = summary["mlflow_experiment_id"]
        runs = rendered(f"{base}/#/experiments/{experiment}?workflowType=machine_learning",
                        ARTIFACTS / "mlflow-runs.png")
        assert "Runs - Experiment" in runs and ">workflow<" in runs and "matching runs" in runs
        compared = rendered(f'{base}/#/compare-runs?runs=["{summary["mlflow_run_id"]}"]&experiments=["{experiment}"]',
                            ARTIFACTS / "mlflow-compare.png")
        # The metrics table renders only the rows in view (alphabetical), so ask for early ones.
        for metric in (f"evaluate.fd_{fd_encoder(summary)}_g3", f"evaluate.clip_score_{fd_encoder(summary)}_g1",
                       "clip.retrieval_top1"):
            assert metric in compared, metric
        assert "js-plotly-plot" in compared  # a chart, rendered
        client = MlflowClient(cfg.tracking_uri)
        ldm = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' "
                                 "and tags.stage = 'ldm'")[0]
        rendered(f"{base}/#/experiments/{experiment}/runs/{ldm.info.run_id}/model-metrics?workflowType=machine_learning",
                 ARTIFACTS / "mlflow-ldm-charts.png", dom=False)
        assert (ARTIFACTS / "mlflow-ldm-charts.png").stat().st_size > 20_000  # the loss curve and the rest, drawn
    finally:
        server.terminate()
        server.wait(timeout=60)
