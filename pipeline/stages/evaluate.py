"""The evaluate stage (and jobs/evaluate.py): FD and CLIP score of a model per guidance scale.

The prompts are the captions of up to `evaluate.num_images` held-out samples (sorted by key, so the
same in every run), one image each with seed `evaluate.seed + i` at every scale. Their real images'
features are computed once per data version and encoder and cached in the workdir
(`heldout_features/<key>/`). Generation and feature extraction run as Ray tasks, one per guidance
scale, side by side where there is room (a GPU each on a cluster: `evaluate.num_gpus`).

Metrics per scale s: `fd_<encoder>_g<s>`, `clip_score_<encoder>_g<s>`, and on the demo's captions
`adherence_g<s>` (the pixel judge); logged with a plot of FD against CLIP score over the scales
(`evaluate/fd_vs_clip_score.png`), a captioned grid per scale and the prompts with their seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.evaluation import EncoderSpec, fd_of
from pipeline.stages.cache import content_key, run_stage

FEATURES_FILE = "features.safetensors"


def evaluated_scales(cfg: PipelineConfig) -> list[float]:
    """The guidance scales evaluated: `evaluate.guidance_scales` and the one promotion compares at."""
    return sorted({float(s) for s in cfg.evaluate.guidance_scales} | {promotion_scale(cfg)})


def promotion_scale(cfg: PipelineConfig) -> float:
    return float(cfg.promote.guidance_scale or cfg.samples.guidance_scale)


def metric_name(kind: str, encoder: str, scale: float) -> str:
    return f"{kind}_{encoder}_g{scale:g}"


# ---- Ray tasks ----

def real_features_task(spec: EncoderSpec, heldout_ds, batch_size: int) -> dict:
    """The held-out images' FD features, with their keys and captions."""
    import torch

    from pipeline.data.images import images_to_tensor
    from pipeline.evaluation import Encoders

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoders = Encoders(spec, device)
    features, keys, captions = [], [], []
    for batch in heldout_ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        features.append(encoders.fd_features(images_to_tensor(batch["image"])))
        keys += [str(k) for k in batch["key"]]
        captions += [str(c) for c in batch["caption"]]
    return {"features": np.concatenate(features) if features else np.zeros((0, 0), np.float32),
            "keys": keys, "captions": captions}


def generate_task(model_uri: str, tracking_uri: str, spec: EncoderSpec, captions: list[str], seed: int,
                  scale: float, steps: int, sampler: str, batch_size: int, grid_images: int) -> dict:
    """Generate one image per caption (seed + i) at one guidance scale (steps 0 / sampler '': the
    model's defaults) with the model at `model_uri`: `score_generated`'s figures."""
    import torch

    from pipeline.model_package import PipelineModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = PipelineModel.from_uri(model_uri, tracking_uri).to(device)
    return score_generated(model, spec, captions, seed, scale, steps, sampler, batch_size, grid_images)


def score_generated(model, spec: EncoderSpec, captions: list[str], seed: int, scale: float, steps: int,
                    sampler: str, batch_size: int, grid_images: int) -> dict:
    """One image per caption (seed + i) at one guidance scale from `model` (a PipelineModel; steps 0
    / sampler '': its defaults): their FD features, CLIP scores, the first `grid_images` images, and
    the demo judge's verdicts where the captions are the demo's."""
    import torch

    from pipeline.data.demo import caption_to_spec
    from pipeline.data.demo_eval import judge
    from pipeline.data.images import images_to_tensor
    from pipeline.evaluation import Encoders

    encoders = Encoders(spec, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    steps, sampler = steps or int(model.defaults["steps"]), sampler or model.defaults["sampler"]
    features, scores, grid, verdicts = [], [], [], []
    start = time.perf_counter()
    for chunk, images in model.generate_in_chunks(captions, seed, scale, steps, sampler, batch_size):
        x = images_to_tensor(np.stack(images))
        features.append(encoders.fd_features(x))
        scores.append(encoders.clip_scores(x, chunk))
        grid += images[:max(0, grid_images - len(grid))]
        for image, caption in zip(images, chunk):
            demo = caption_to_spec(caption)
            verdicts.append(None if demo is None else judge(image, demo)["ok"])
    seconds = time.perf_counter() - start
    print(f"[evaluate] g{scale:g}: {len(captions)} images in {seconds:.1f}s", flush=True)
    return {"features": np.concatenate(features), "clip_score": float(np.concatenate(scores).mean()),
            "grid": grid, "verdicts": verdicts, "seconds": seconds, "steps": steps,
            "sampler": sampler}


# ---- the driver's side ----

def heldout_features(cfg: PipelineConfig, shards: list[str], listing: str, spec: EncoderSpec) -> dict:
    """The held-out images' features in the encoder's space, from `<workdir>/heldout_features/<key>`
    when a run on the same data and encoder has computed them."""
    from pipeline.config import to_yaml
    from pipeline.data.reader import read_captioned_images
    from pipeline.ray_runtime import run_task

    d = cfg.data
    key = content_key("heldout_features", listing, to_yaml(d), str(cfg.evaluate.num_images), spec.identity)

    def compute(out: Path) -> dict:
        from safetensors.numpy import save_file

        heldout = read_captioned_images(shards, d.image_size, "heldout", d.heldout_fraction,
                                        max_image_pixels=d.max_image_pixels)
        heldout = heldout.sort("key").limit(cfg.evaluate.num_images).materialize()
        real = run_task(real_features_task, spec, heldout, cfg.evaluate.batch_size,
                        num_cpus=cfg.evaluate.num_cpus, num_gpus=cfg.evaluate.num_gpus)
        if len(real["keys"]) < 2:
            raise ValueError(f"the held-out split has {len(real['keys'])} image(s); FD needs at least 2: raise "
                             f"data.heldout_fraction (now {d.heldout_fraction}) or bring more data")
        save_file({"features": real["features"]}, str(out / FEATURES_FILE))
        with open(out / "heldout.jsonl", "w") as f:
            for k, caption in zip(real["keys"], real["captions"]):
                f.write(json.dumps({"key": k, "caption": caption}) + "\n")
        return {"images": len(real["keys"])}

    result = run_stage(cfg.workdir, "heldout_features", key, compute)
    from safetensors.numpy import load_file

    rows = [json.loads(line) for line in (result.output / "heldout.jsonl").read_text().splitlines()]
    print(f"[evaluate] held-out features of {len(rows)} images: {result.status} ({result.output})", flush=True)
    return {"features": load_file(str(result.output / FEATURES_FILE))["features"],
            "captions": [r["caption"] for r in rows], "keys": [r["key"] for r in rows], "dir": str(result.output)}


def checkpoint_eval_plan(cfg: PipelineConfig, shards: list[str], listing: str, spec: EncoderSpec):
    """What the ldm stage's evaluations during training compute (`pipeline.training.checkpoint_eval`),
    or None with `evaluate.every` 0: the first `evaluate.during_images` of the held-out captions
    (their real features computed now, once, and cached for the evaluate stage) at the promotion scale."""
    from pipeline.training.checkpoint_eval import CheckpointEvalPlan

    e = cfg.evaluate
    if not e.every:
        return None
    real, scale = heldout_features(cfg, shards, listing, spec), promotion_scale(cfg)
    return CheckpointEvalPlan(
        every=e.every, spec=spec, features_file=str(Path(real["dir"]) / FEATURES_FILE),
        captions=real["captions"][:e.during_images], seed=e.seed, scale=scale, steps=e.steps or cfg.samples.steps,
        sampler=cfg.samples.sampler, batch_size=e.batch_size, num_cpus=e.num_cpus, num_gpus=e.num_gpus,
        timeout_s=e.during_timeout_s, fd_metric=metric_name("fd", spec.fd_name, scale),
        score_metric=metric_name("clip_score", spec.score_name, scale))


def generate_at_scales(cfg: PipelineConfig, model_uri: str, spec: EncoderSpec, captions: list[str],
                       scales: list[float], steps: int = 0, sampler: str = "") -> list[dict]:
    """`generate_task` for each scale, side by side; steps 0 / sampler '': `evaluate.steps`, else the model's."""
    from pipeline.ray_runtime import run_tasks

    e = cfg.evaluate
    calls = [((model_uri, cfg.tracking_uri, spec, captions, e.seed, scale, steps or e.steps, sampler, e.batch_size,
               e.grid_images), {}) for scale in scales]
    return run_tasks(generate_task, calls, num_cpus=e.num_cpus, num_gpus=e.num_gpus)


def evaluate_model(cfg: PipelineConfig, model_uri: str, spec: EncoderSpec, shards: list[str], listing: str,
                   out: Path) -> dict:
    """FD, CLIP score (and on the demo adherence) per guidance scale of the model at `model_uri`
    (a package directory or an MLflow URI); writes the plot, the grids, prompts.jsonl and
    evaluation.json into `out` and logs them to the active MLflow run. Returns the metrics."""
    import mlflow

    from pipeline.data.images import captioned_tile

    real = heldout_features(cfg, shards, listing, spec)
    captions, scales = real["captions"], evaluated_scales(cfg)
    with open(out / "prompts.jsonl", "w") as f:
        for i, (k, caption) in enumerate(zip(real["keys"], captions)):
            f.write(json.dumps({"key": k, "caption": caption, "seed": cfg.evaluate.seed + i}) + "\n")
    results = generate_at_scales(cfg, model_uri, spec, captions, scales)
    metrics: dict = {"images": len(captions)}
    for scale, result in zip(scales, results):
        metrics[metric_name("fd", spec.fd_name, scale)] = fd_of(result["features"], real["features"])
        metrics[metric_name("clip_score", spec.score_name, scale)] = result["clip_score"]
        judged = [v for v in result["verdicts"] if v is not None]
        if judged and len(judged) == len(result["verdicts"]):
            metrics[f"adherence_g{scale:g}"] = sum(judged) / len(judged)
        grid = captioned_tile(result["grid"], captions[:len(result["grid"])])
        mlflow.log_image(grid, f"evaluate/grid_g{scale:g}.png")
    print("[evaluate] " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    plot_tradeoff(metrics, spec, scales, out / "fd_vs_clip_score.png")
    (out / "evaluation.json").write_text(json.dumps({
        "model_uri": model_uri, "encoder": spec.fd_name, "score_encoder": spec.score_name,
        "scales": scales, "heldout_features": real["dir"], "seed": cfg.evaluate.seed,
        "steps": results[0]["steps"], "sampler": results[0]["sampler"], "metrics": metrics}, indent=2))
    for name in ("fd_vs_clip_score.png", "prompts.jsonl", "evaluation.json"):
        mlflow.log_artifact(str(out / name), "evaluate")
    return metrics


def plot_tradeoff(metrics: dict, spec: EncoderSpec, scales: list[float], path: Path) -> None:
    """FD against CLIP score over the guidance scales: the usual trade-off curve, one labelled point a scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fd = [metrics[metric_name("fd", spec.fd_name, s)] for s in scales]
    score = [metrics[metric_name("clip_score", spec.score_name, s)] for s in scales]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    ax.plot(score, fd, "o-", color="tab:blue")
    for s, x, y in zip(scales, score, fd):
        ax.annotate(f"guidance {s:g}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xlabel(f"CLIP score ({spec.score_name}), higher is better")
    ax.set_ylabel(f"FD ({spec.fd_name}), lower is better")
    ax.set_title(f"FD against CLIP score over guidance scales ({metrics['images']} held-out captions)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
