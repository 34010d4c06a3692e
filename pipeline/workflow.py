"""The whole workflow: shards (demo) -> vq -> clip -> encode -> ldm -> samples, each stage cached.

One MLflow parent run for the workflow, a child run per stage (params = the stage's config
section, metrics = what it reports). The ldm stage also assembles the pipeline model, logs it as
one MLflow model and registers it. At the end `<workdir>/summary.json` records the model URI, the
MLflow run, the samples directory and per stage {status, seconds, metrics}.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import mlflow

from pipeline.config import PipelineConfig, to_flat_dict, to_yaml
from pipeline.data.shards import resolve_shards, shard_fingerprints, write_demo_shards
from pipeline.ray_runtime import init_ray, run_task
from pipeline.stages.cache import StageResult, content_key, dir_digest, run_stage

def _shard_listing_key(shards: list[str]) -> str:
    """The shards' names, sizes and modification times (an object store's too) as a cache-key
    part; a shard that is missing or cannot be read is an error here, before any stage runs."""
    return content_key(*shard_fingerprints(shards))


def _numeric_metrics(metrics: dict) -> dict:
    """MLflow metrics from a stage's metrics: numbers, and maps of numbers flattened to `name.key`
    (the encode stage's `skipped` -> `skipped.corrupt_image`, ...)."""
    numeric = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            numeric.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            numeric[name] = value
    return numeric


class Workflow:
    """Runs the stages in order inside one MLflow parent run."""

    STAGES = ("shards", "vq", "clip", "encode", "ldm", "samples")

    def __init__(self, cfg: PipelineConfig, until: str | None = None):
        """`until`: stop after this stage (the per-stage jobs); None runs the whole workflow."""
        if until is not None and until not in self.STAGES:
            raise ValueError(f"unknown stage {until!r}; stages: {self.STAGES}")
        self.cfg = cfg
        self.until = until
        self.workdir = Path(cfg.workdir).resolve()
        self.results: dict[str, StageResult] = {}

    def stage(self, name: str, key: str, work) -> StageResult:
        """Run (or find cached) one stage inside its own nested MLflow run."""
        section = getattr(self.cfg, name, None)
        with mlflow.start_run(run_name=name, nested=True) as child:
            if section is not None and hasattr(section, "__dataclass_fields__"):
                mlflow.log_params({f"{name}.{k}": v for k, v in to_flat_dict(section).items()})
            print(f"== stage {name} (key {key}) ==", flush=True)
            result = run_stage(self.workdir, name, key, lambda out: work(out, child.info.run_id))
            mlflow.set_tags({"stage": name, "status": result.status, "cache_key": key})
            numeric = _numeric_metrics(result.metrics)
            if numeric:
                mlflow.log_metrics(numeric)
            mlflow.log_metric("stage_seconds", result.seconds)
        print(f"== stage {name}: {result.status} in {result.seconds:.1f}s {result.metrics} ==", flush=True)
        self.results[name] = result
        if name == self.until:
            raise _StopAfter(result)
        return result

    def run(self) -> dict:
        cfg = self.cfg
        from pipeline.tracking import setup_experiment

        self.workdir.mkdir(parents=True, exist_ok=True)
        init_ray(cfg.ray_address)
        setup_experiment(cfg.tracking_uri, cfg.mlflow.experiment_name, self.workdir)
        with mlflow.start_run(run_name=f"workflow-until-{self.until}" if self.until else "workflow") as parent:
            try:
                return self._run_stages(parent)
            except _StopAfter as stop:
                return {"stage": self.until, "output": str(stop.result.output), "mlflow_run_id": parent.info.run_id,
                        "stages": {name: result.summary() for name, result in self.results.items()}}

    def _run_stages(self, parent) -> dict:
        cfg = self.cfg
        mlflow.log_params(to_flat_dict(cfg))
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        shards = self.shards()
        listing = _shard_listing_key(shards)
        prompts = self.prompts(shards)  # checked before any training
        data_key = content_key(listing, str(cfg.data.image_size), str(cfg.data.heldout_fraction), str(cfg.seed))

        from pipeline.stages.clip import run_clip
        from pipeline.stages.encode import run_encode
        from pipeline.stages.vq import run_vq

        vq = self.stage("vq", content_key("vq", to_yaml(cfg.vq), data_key),
                        lambda out, run_id: self.register("vq", out, run_vq(cfg, shards, out, run_id)))
        clip = self.stage("clip", content_key("clip", to_yaml(cfg.clip), data_key),
                          lambda out, run_id: self.register("clip", out, run_clip(cfg, shards, out, run_id)))
        encoders = content_key(dir_digest(vq.output), dir_digest(clip.output))
        encode = self.stage(
            "encode", content_key("encode", to_yaml(cfg.encode), listing, str(cfg.data.image_size), encoders,
                                  str(cfg.data.max_image_pixels)),
            lambda out, run_id: run_encode(cfg, shards, vq.output, clip.output, out))
        ldm_key = content_key("ldm", to_yaml(cfg.ldm), str(cfg.seed), encode.key)
        ldm = self.stage("ldm", ldm_key, lambda out, run_id: self.train_and_register(
            encode.output, vq.output, clip.output, out, run_id, prompts))
        registered = json.loads((ldm.output / "registered.json").read_text())
        samples = self.stage("samples", content_key("samples", to_yaml(cfg.samples), ldm.key, *prompts),
                             lambda out, run_id: self.sample(registered["model_uri"], prompts, out))
        mlflow.log_artifact(str(samples.output / "grid.png"), "samples")
        summary = {
            "model_uri": registered["model_uri"],
            **{f"{kind}_model_uri": json.loads((result.output / "registered.json").read_text())["model_uri"]
               for kind, result in (("vq", vq), ("clip", clip)) if (result.output / "registered.json").is_file()},
            "tracking_uri": cfg.tracking_uri,
            "mlflow_run_id": parent.info.run_id,
            "mlflow_experiment_id": parent.info.experiment_id,
            "samples_dir": str(samples.output),
            "workdir": str(self.workdir),
            "stages": {name: result.summary() for name, result in self.results.items()},
            "driver": driver_figures(),
        }
        mlflow.log_dict(summary, "summary.json")
        path = self.workdir / "summary.json"
        path.write_text(json.dumps(summary, indent=2))
        return summary

    def register(self, kind: str, out: Path, metrics: dict) -> dict:
        """Log a first-stage model (and the VQ's reconstruction grid) to the stage's MLflow run and
        register it as <registered_model_name>-<kind> (pipeline.components)."""
        from pipeline.components import log_component

        if (out / "recon.png").is_file():
            mlflow.log_artifact(str(out / "recon.png"), "recon")
        registered = log_component(kind, out, self.cfg.mlflow.registered_model_name, self.cfg.mlflow.alias)
        print(f"[{kind}] registered as {registered['model_uri']}", flush=True)
        return {**metrics, "model_version": registered["version"]}

    def shards(self) -> list[str]:
        """The user's shards, or the embedded demo's, generated as the (cached) shards stage."""
        cfg = self.cfg
        if cfg.data.shards:
            return resolve_shards(cfg.data.shards)
        key = content_key("demo-shards", str(cfg.data.demo_num_samples), str(cfg.data.image_size),
                          str(cfg.data.demo_shard_size), str(cfg.seed))

        def work(out: Path, run_id: str) -> dict:
            written = run_task(write_demo_shards, out, cfg.data.demo_num_samples, cfg.data.image_size, cfg.seed,
                               cfg.data.demo_shard_size)
            return {"samples": cfg.data.demo_num_samples, "shards": len(written)}

        result = self.stage("shards", key, work)
        return resolve_shards(str(result.output))

    def train_and_register(self, latents_dir: Path, vq_dir: Path, clip_dir: Path, out: Path, run_id: str,
                           prompts: list[str]) -> dict:
        """Train the UNet, assemble the pipeline model, log it to MLflow and register it."""
        from pipeline.components import log_and_register
        from pipeline.model_package import MLFLOW_ARTIFACT, write_package
        from pipeline.stages.ldm import run_ldm

        cfg = self.cfg
        metrics = run_ldm(cfg, latents_dir, out, run_id, name=f"ldm-{out.name.split('.')[0]}", prompts=prompts)
        meta = json.loads((latents_dir / "metadata.json").read_text())
        package = out / "model"
        sampling = {"guidance_scale": cfg.samples.guidance_scale, "steps": cfg.samples.steps,
                    "sampler": cfg.samples.sampler}
        write_package(package, out, vq_dir, clip_dir, meta, asdict(cfg.ldm.schedule), sampling)
        logged_uri, version = log_and_register("model", Path(__file__).with_name("mlflow_model.py"),
                                               {MLFLOW_ARTIFACT: str(package)}, cfg.mlflow.registered_model_name,
                                               cfg.mlflow.alias)
        model_uri = f"models:/{cfg.mlflow.registered_model_name}/{version}"
        (out / "registered.json").write_text(json.dumps(
            {"model_uri": model_uri, "logged_model_uri": logged_uri, "run_id": run_id, "version": version}))
        return {**metrics, "model_version": int(version)}

    def prompts(self, shards: list[str]) -> list[str]:
        """The samples stage's prompts: `samples.prompts_file`, else `samples.prompts`, else the first
        `samples.heldout_prompts` captions of the held-out split (users' own data)."""
        s = self.cfg.samples
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

        d = self.cfg.data
        heldout = read_captioned_images(shards, d.image_size, "heldout", d.heldout_fraction,
                                        max_image_pixels=d.max_image_pixels)
        captions = [row["caption"] for row in heldout.select_columns(["caption"]).limit(s.heldout_prompts).take_all()]
        if not captions:
            raise ValueError("samples.prompts is empty and the held-out split has no caption to sample: set "
                             "samples.prompts or samples.prompts_file")
        return captions

    def sample(self, model_uri: str, prompts: list[str], out: Path) -> dict:
        """Serve the registered model with Ray Serve and sample the given prompts."""
        from ray import serve

        from pipeline.sample_client import ensure_app, generate_to_dir

        cfg = self.cfg
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


def driver_figures() -> dict:
    """Where the job's driver ran and its peak memory: it coordinates, the work runs in Ray."""
    import resource

    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


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


class _StopAfter(Exception):
    def __init__(self, result: StageResult):
        super().__init__(result.name)
        self.result = result


def run_workflow(cfg: PipelineConfig) -> Path:
    """Run the workflow; returns the path of summary.json."""
    Workflow(cfg).run()
    return Path(cfg.workdir).resolve() / "summary.json"
