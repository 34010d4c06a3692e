"""The samples stage: the registered model served with Ray Serve, its prompts sampled to PNGs and a
grid, and on the demo the adherence judge at guidance 1 and `samples.guidance_scale`."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow

from pipeline.config import PipelineConfig
from pipeline.ray_runtime import run_task


def prompts_for(cfg: PipelineConfig, shards: list[str]) -> list[str]:
    """The stage's prompts: `samples.prompts_file`, else `samples.prompts`, else the first
    `samples.heldout_prompts` captions of the held-out split (users' own data). Read before any
    training, so a bad prompts file fails the job at once."""
    s = cfg.samples
    if s.prompts_file:
        path = Path(s.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"samples.prompts_file={s.prompts_file}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"samples.prompts_file={s.prompts_file} holds no prompt")
        return prompts
    if s.prompts:
        return list(s.prompts)
    from pipeline.data.reader import read_captioned_images

    d = cfg.data
    heldout = read_captioned_images(shards, d.image_size, "heldout", d.heldout_fraction,
                                    max_image_pixels=d.max_image_pixels)
    captions = [row["caption"] for row in heldout.select_columns(["caption"]).limit(s.heldout_prompts).take_all()]
    if not captions:
        raise ValueError("samples.prompts is empty and the held-out split has no caption to sample: set "
                         "samples.prompts or samples.prompts_file")
    return captions


def run_samples(cfg: PipelineConfig, model_uri: str, prompts: list[str], out: Path) -> dict:
    """Serve the registered model with Ray Serve and sample the given prompts into `out`."""
    from ray import serve

    from pipeline.sample_client import ensure_app, generate_to_dir

    s = cfg.samples
    started = ensure_app(model_uri, cfg.tracking_uri, cfg.serve, cfg.ray_address)
    try:
        start = time.perf_counter()
        records = generate_to_dir(prompts, out, base_url=f"http://{cfg.serve.host}:{cfg.serve.port}",
                                  guidance_scale=s.guidance_scale, steps=s.steps, sampler=s.sampler, seed=s.seed,
                                  num_per_prompt=s.num_per_prompt, concurrency=cfg.serve.max_batch_size)
        seconds = time.perf_counter() - start
    finally:
        if started:
            serve.shutdown()
    mlflow.log_artifact(str(out / "grid.png"), "samples")
    metrics = {"images": len(records), "img_per_s": len(records) / seconds}
    metrics.update(demo_adherence(out, records))
    if not cfg.data.shards and s.adherence_images > 0:
        metrics.update(run_task(demo_adherence_at_scales, model_uri, cfg.tracking_uri, s,
                                num_cpus=cfg.serve.num_cpus, num_gpus=cfg.serve.num_gpus))
    return metrics


def demo_adherence(out: Path, records) -> dict:
    """On the demo's prompts: the fraction of images that show what the prompt names."""
    from PIL import Image

    from pipeline.data.demo import caption_to_spec
    from pipeline.data.demo_eval import adherence_of, judge

    judged = []
    for record in records:
        spec = caption_to_spec(record.prompt)
        if spec is None:
            return {}
        judged.append(judge(Image.open(out / record.file).convert("RGB"), spec))
    if not judged:
        return {}
    return {f"grid_adherence_g{records[0].guidance_scale:g}": adherence_of(judged)["all"]}


def demo_adherence_at_scales(model_uri: str, tracking_uri: str, s) -> dict:
    """A Ray task (`run_task`): adherence at guidance 1 and `samples.guidance_scale` (SamplesConfig `s`)."""
    import torch

    from pipeline.model_package import PipelineModel

    model = PipelineModel.from_uri(model_uri, tracking_uri)
    if torch.cuda.is_available():
        model.to("cuda")
    metrics = {}
    for scale in dict.fromkeys([1.0, float(s.guidance_scale)]):
        metrics.update(evaluate_demo_adherence(model, s.adherence_images, scale, s.steps, s.sampler, s.seed))
    return metrics


def evaluate_demo_adherence(model, images: int, guidance_scale: float, steps: int, sampler: str, seed: int,
                            batch: int = 60) -> dict:
    """Prompt adherence on the demo: `images` prompts cycling through every shape x colour x position
    (and caption wording), one seed each, sampled in-process in batches and judged from pixels.
    Returns adherence_g<scale> (all three right), its shape/colour/position parts, and
    adherence_g<scale>_new_wording: on the prompts worded unlike any training caption of their
    content (the demo data words each content one way), how well the text generalises."""
    from pipeline.data.demo import (CAPTION_TEMPLATES, DEMO_COLOURS, DEMO_POSITIONS, DEMO_SHAPES, DemoSpec,
                                    caption_template, spec_to_caption)
    from pipeline.data.demo_eval import adherence_of, judge
    from pipeline.model_package import GenerationRequest

    combos = [DemoSpec(s, c, p) for s in DEMO_SHAPES for c in DEMO_COLOURS for p in DEMO_POSITIONS]
    specs = [combos[i % len(combos)] for i in range(images)]
    templates = [i % len(CAPTION_TEMPLATES) for i in range(images)]
    requests = [GenerationRequest(spec_to_caption(spec, template), seed + i, guidance_scale)
                for i, (spec, template) in enumerate(zip(specs, templates))]
    start = time.perf_counter()
    generated = []
    for i in range(0, len(requests), batch):
        generated += model.generate(requests[i:i + batch], steps, sampler)
    verdicts = [judge(image, spec) for image, spec in zip(generated, specs, strict=True)]
    scores = adherence_of(verdicts)
    name = f"adherence_g{guidance_scale:g}"
    print(f"[samples] {name} {scores['all']:.3f} (shape {scores['shape']:.3f}, colour {scores['colour']:.3f}, "
          f"position {scores['position']:.3f}) on {images} images in {time.perf_counter() - start:.1f}s", flush=True)
    metrics = {name: scores["all"], **{f"{name}_{part}": scores[part] for part in ("shape", "colour", "position")},
               f"{name}_images": images}
    new = [i for i, (spec, template) in enumerate(zip(specs, templates)) if template != caption_template(spec)]
    if new:
        metrics[f"{name}_new_wording"] = adherence_of([verdicts[i] for i in new])["all"]
    return metrics
