"""The whole workflow: shards (demo) -> vq -> clip -> encode -> ldm -> samples -> evaluate -> promote, each cached.

Every stage is declared once, in `STAGES`: its name, the config it reads, what else it reads (the
shards, the prompts, earlier stages' outputs) and the function that runs it. From that alone the
runner derives the stage's cache key (`Workflow.key`), owns its MLflow child run (params = the
config it reads, metrics = what it returns), its directory and lock (`run_stage`) and `until`.
Adding a stage is a module with its run function plus one `Stage(...)` line here.

At the end `<workdir>/summary.json` records the model URI, the MLflow run, the samples directory
and per stage {status, seconds, metrics}.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Callable

import mlflow
from omegaconf import OmegaConf

from pipeline.config import PipelineConfig, to_yaml
from pipeline.data.locate import resolve_shards, shard_fingerprints
from pipeline.data.shards import write_demo_shards
from pipeline.ray_runtime import init_ray, run_task
from pipeline.recipe import global_batch, short_ldm_budget, with_ldm_budget, with_unet_preset
from pipeline.stages.cache import StageResult, content_key, dir_digest, run_stage
from pipeline.tracking import to_flat_dict

RunFn = Callable[["Workflow", Path, str], dict]


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    """Config paths (a section, or one field) the stage's result depends on: their values are in its key."""
    inputs: tuple[str, ...]
    """What else it reads: "shards" (the shards' names, sizes and modification times), "prompts"
    (the samples stage's prompts), or an earlier stage, whose key (or, for a `by_content` stage,
    whose output's bytes) is in its key."""
    run: RunFn
    """`run(workflow, out_dir, mlflow_run_id) -> metrics`: write the stage's output into out_dir."""
    by_content: bool = False
    """Later stages key on this stage's output bytes, not its key: a pretrained model file given by
    path may change in place."""
    only_if: Callable[[PipelineConfig], bool] = lambda cfg: True
    layout: tuple[str, ...] = ()
    """Fields under `reads` that say how the work is laid out (workers, micro batches, retries), not
    what it computes: they are not in the key, so a run can resume under another layout; what they
    decide together that does change the result is, as a `derived` value. Also fields a stage reads
    only through a derived value (vq: the ldm's budget, only as whether it is short)."""
    derived: tuple[tuple[str, Callable[[PipelineConfig], object]], ...] = ()
    """(name, function of the config) pairs whose values are in the key."""
    headline: tuple[str, ...] = ()
    """Its metrics (names, or patterns that match whole names) that the workflow run carries too, as
    `<stage>.<metric>`, with `<stage>.seconds`: the columns two workflow runs compare by in the MLflow UI."""


# Config the results do not depend on (where things run, how they are tracked and served), and why.
NOT_IN_ANY_KEY = {
    "workdir": "where the stages' outputs live",
    "ray_address": "where the stages run",
    "mlflow": "where runs and models are recorded, under which names",
    "serve": "how the samples are served; a request's PNG does not depend on its batch",
    "sweep": "what a sweep varies: each trial's config carries the values it drew",
}


def _demo_shards(w: Workflow, out: Path, run_id: str) -> dict:
    d = w.cfg.data
    written = run_task(write_demo_shards, out, d.demo_num_samples, d.image_size, w.cfg.seed, d.demo_shard_size)
    return {"samples": d.demo_num_samples, "shards": len(written)}


def _vq(w: Workflow, out: Path, run_id: str) -> dict:
    from pipeline.stages.vq import run_vq

    return w.register("vq", out, run_vq(w.cfg, w.shards, out, run_id))


def _clip(w: Workflow, out: Path, run_id: str) -> dict:
    from pipeline.stages.clip import run_clip

    return w.register("clip", out, run_clip(w.cfg, w.shards, out, run_id))


def _encode(w: Workflow, out: Path, run_id: str) -> dict:
    from pipeline.stages.encode import run_encode

    return run_encode(w.cfg, w.shards, w.output("vq"), w.output("clip"), out)


def _ldm(w: Workflow, out: Path, run_id: str) -> dict:
    """Train the UNet, assemble the pipeline model, log it to MLflow and register it."""
    from pipeline.components import log_package
    from pipeline.stages.evaluate import checkpoint_eval_plan
    from pipeline.stages.ldm import run_ldm

    key = w.key(STAGE_BY_NAME["ldm"])
    during = checkpoint_eval_plan(w.cfg, w.shards, w.listing, w.encoder_spec()) if run_id else None
    metrics = run_ldm(w.cfg, w.output("encode"), out, run_id, name=f"ldm-{key}", prompts=w.prompts, evaluation=during)
    registered = log_package(out, w.output("encode"), w.output("vq"), w.output("clip"), w.cfg, run_id)
    if run_id:
        client = mlflow.MlflowClient(w.cfg.tracking_uri)
        client.set_tag(run_id, "recipe.ldm", w.budget.reason)
        client.set_tag(run_id, "recipe.unet", w.unet_reason)
    return {**metrics, "steps": w.budget.max_steps, "epochs": w.budget.epochs, "model_version": int(registered["version"])}


def _samples(w: Workflow, out: Path, run_id: str) -> dict:
    from pipeline.stages.samples import run_samples

    return run_samples(w.cfg, w.registered("ldm")["model_uri"], w.prompts, out)


def _evaluate(w: Workflow, out: Path, run_id: str) -> dict:
    from pipeline.stages.evaluate import evaluate_model

    return evaluate_model(w.cfg, str(w.output("ldm") / "model"), w.encoder_spec(), w.shards, w.listing, out)


def _promote(w: Workflow, out: Path, run_id: str) -> dict:
    from pipeline.stages.promote import run_promote

    return run_promote(w.cfg, int(w.registered("ldm")["version"]), w.output("evaluate"), w.encoder_spec(), out)


LDM_LAYOUT = ("ldm.num_workers", "ldm.batch_size", "ldm.grad_accum", "ldm.cpus_per_worker", "ldm.use_gpu",
              "ldm.max_failures", "ldm.stall_timeout_s", "ldm.log_every")


STAGES = (
    Stage("shards", ("data.demo_num_samples", "data.image_size", "data.demo_shard_size", "seed"), (), _demo_shards,
          only_if=lambda cfg: not cfg.data.shards),
    # vq.preset=auto picks the plain first stage for a short ldm budget (pipeline.recipe.vq_preset): the
    # budget is in the key only as that, so another ldm budget finds the first stage cached.
    Stage("vq", ("vq", "data", "seed", "ldm.epochs", "ldm.max_steps"), ("shards",), _vq, by_content=True,
          layout=("ldm.epochs", "ldm.max_steps"), derived=(("short_ldm_budget", short_ldm_budget),),
          headline=("psnr", "codebook_usage")),
    Stage("clip", ("clip", "data", "seed"), ("shards",), _clip, by_content=True, headline=("retrieval_top1",)),
    # The UNet's downsampling decides the buckets' sizes (`ldm.preset`, resolved after the vq stage).
    Stage("encode", ("encode", "data", "ldm.preset"), ("shards", "vq", "clip"), _encode,
          headline=("samples", "crop_mean")),
    # The samples stage's sampling settings are baked into the package as its defaults.
    # The world size and the micro batch are layout: a failed run resumes on more or fewer workers
    # (ZeRO-0), with the same global batch and so the same samples in the same order.
    Stage("ldm", ("ldm", "seed", "samples.guidance_scale", "samples.steps", "samples.sampler"), ("encode",), _ldm,
          layout=LDM_LAYOUT, derived=(("ldm.global_batch", lambda cfg: global_batch(cfg.ldm)),),
          headline=("final_loss", "train_img_per_s")),
    Stage("samples", ("samples",), ("ldm", "prompts"), _samples,
          headline=(r"adherence_g[\d.]+", r"grid_adherence_g[\d.]+")),  # at each guidance scale
    # The held-out images' features are cached apart, per data version and encoder (heldout_features/).
    # Its scales are evaluate.guidance_scales and the one promotion compares at.
    # evaluate.every / during_*: the evaluations during ldm training, which log to the ldm run only.
    Stage("evaluate", ("evaluate", "data", "samples.guidance_scale", "promote.guidance_scale"),
          ("ldm", "shards", "clip"), _evaluate, layout=("evaluate.num_cpus", "evaluate.num_gpus", "evaluate.batch_size",
                                                         "evaluate.every", "evaluate.during_images",
                                                         "evaluate.during_timeout_s"),
          headline=(r"fd_.+_g[\d.]+", r"clip_score_.+_g[\d.]+", r"adherence_g[\d.]+")),
    # The registry's state is not in the key: a decision is made once per candidate and config.
    Stage("promote", ("promote",), ("evaluate", "ldm"), _promote,
          headline=("promoted", "candidate_fd", "production_fd")),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def config_value(cfg: PipelineConfig, path: str):
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def config_key(cfg: PipelineConfig, stage: Stage) -> str:
    """The part of a stage's key that comes from the config it reads (less its layout fields, plus
    its derived values)."""
    parts = []
    for path in stage.reads:
        if path in stage.layout:  # a field read only through a derived value
            continue
        value = config_value(cfg, path)
        if is_dataclass(value):
            left_out = {f[len(path) + 1:] for f in stage.layout if f.startswith(path + ".")}
            value = to_yaml(value) if not left_out else to_yaml(
                {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(value)).items() if k not in left_out})
        else:
            value = json.dumps(value)
        parts.append(f"{path}: {value}")
    parts += [f"{name}: {json.dumps(fn(cfg))}" for name, fn in stage.derived]
    return content_key(*parts)


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


def headline_metrics(stage: Stage, result: StageResult) -> dict:
    """What the workflow run carries of a stage: its headline metrics (those it has) and its time."""
    numeric = _numeric_metrics(result.metrics)
    return {f"{stage.name}.seconds": round(result.seconds, 3),  # as summary.json has it
            **{f"{stage.name}.{name}": value for name, value in numeric.items()
               if any(re.fullmatch(pattern, name) for pattern in stage.headline)}}


class Workflow:
    """Runs the declared stages in order inside one MLflow parent run."""

    def __init__(self, cfg: PipelineConfig, until: str | None = None, skip: tuple[str, ...] = (),
                 parent_run_id: str | None = None, run_name: str | None = None):
        """`until`: stop after this stage (the per-stage jobs); None runs the whole workflow.
        `skip`: stages not to run (none of the stages run may read them; a sweep's trials skip the
        samples). `parent_run_id`: the MLflow run the workflow run is a child of (a sweep's)."""
        for name in (until, *skip):
            if name is not None and name not in STAGE_BY_NAME:
                raise ValueError(f"unknown stage {name!r}; stages: {tuple(STAGE_BY_NAME)}")
        if until is None and skip:
            raise ValueError(f"skipping {list(skip)} needs `until`: the whole workflow's summary has every stage")
        names = list(STAGE_BY_NAME)
        for stage in STAGES[:names.index(until) + 1] if until else ():
            needed = set(stage.inputs) & set(skip)
            if needed and stage.name not in skip:
                raise ValueError(f"stage {stage.name} reads {sorted(needed)}, which would be skipped")
        self.cfg = cfg
        self.until = until
        self.skip = tuple(skip)
        self.parent_run_id, self.run_name = parent_run_id, run_name
        self.budget = None
        """The ldm stage's budget (`pipeline.recipe.Budget`), once the encode stage has run."""
        self.unet_reason = ""
        """Why the ldm's UNet is the one it is (`pipeline.recipe.with_unet_preset`), once the vq stage has run."""
        self.stage_runs: dict[str, str] = {}
        """The MLflow run of each stage begun, as soon as it begins (a sweep reads the ldm run's FD curve)."""
        self.workdir = Path(cfg.workdir).resolve()
        self.results: dict[str, StageResult] = {}
        self.shards: list[str] = []
        self.prompts: list[str] = []
        self.listing = ""

    # ---- what a stage reads ----

    def output(self, name: str) -> Path:
        return self.results[name].output

    def registered(self, name: str) -> dict:
        return json.loads((self.output(name) / "registered.json").read_text())

    def encoder_spec(self):
        """The evaluation's encoder (`evaluate.encoder`), the run's own CLIP being the clip stage's."""
        from pipeline.config.encoder import EncoderSpec

        return EncoderSpec.parse(self.cfg.evaluate.encoder, self.output("clip"))

    def _input_part(self, name: str) -> str:
        if name == "shards":
            return self.listing
        if name == "prompts":
            return content_key(*self.prompts)
        if STAGE_BY_NAME[name].by_content:
            return dir_digest(self.output(name))
        return self.results[name].key

    def key(self, stage: Stage) -> str:
        """The stage's cache key: its name, the config it reads, and what it reads besides."""
        return content_key(stage.name, config_key(self.cfg, stage), *(self._input_part(i) for i in stage.inputs))

    # ---- running ----

    def run(self) -> dict:
        from pipeline.tracking import setup_experiment

        cfg = self.cfg
        self.workdir.mkdir(parents=True, exist_ok=True)
        init_ray(cfg.ray_address)
        setup_experiment(cfg.tracking_uri, cfg.mlflow.experiment_name, self.workdir)
        name = self.run_name or (f"workflow-until-{self.until}" if self.until else "workflow")
        with mlflow.start_run(run_name=name, parent_run_id=self.parent_run_id,
                              nested=self.parent_run_id is not None) as parent:
            mlflow.log_params(to_flat_dict(cfg))
            mlflow.log_text(to_yaml(cfg), "config.yaml")
            if cfg.data.shards:
                self.found_shards(resolve_shards(cfg.data.shards))
            for stage in STAGES:
                if not stage.only_if(cfg) or stage.name in self.skip:
                    continue
                result = self._run(stage)
                mlflow.log_metrics(headline_metrics(stage, result))  # on the workflow run
                if stage.name == "vq":  # the UNet, where the config leaves it to the data
                    self.cfg, self.unet_reason = with_unet_preset(self.cfg, *self.unet_inputs(result))
                    print(f"[recipe] unet: {self.unet_reason}", flush=True)
                    mlflow.set_tag("recipe.unet", self.unet_reason)
                if stage.name == "encode":  # the ldm's budget, where the config leaves it to the data
                    self.cfg, self.budget = with_ldm_budget(self.cfg, result.output)
                    print(f"[recipe] ldm: {self.budget.reason}", flush=True)
                    mlflow.set_tag("recipe.ldm", self.budget.reason)
                if stage.name == "shards":
                    self.found_shards(resolve_shards(str(result.output)))
                if stage.name == self.until:
                    return {"stage": self.until, "output": str(result.output), "mlflow_run_id": parent.info.run_id,
                            "stages": {name: r.summary() for name, r in self.results.items()}}
            return self._summary(parent)

    def unet_inputs(self, vq: StageResult) -> tuple[int, int]:
        """(training samples, latent side) for `with_unet_preset`: the samples the vq stage counted
        (counted here for a pretrained first stage, where the choice needs them: on a GPU)."""
        from pipeline.models.vq import downsample_of

        side = self.cfg.data.image_size // downsample_of(json.loads((vq.output / "model.json").read_text()))
        samples = vq.metrics.get("train_samples")
        if samples is None and self.cfg.ldm.preset == "auto" and self.cfg.ldm.use_gpu:
            from pipeline.stages.vq import training_counts

            samples = training_counts(self.cfg, self.shards)[0]
        return samples or 0, side

    def found_shards(self, shards: list[str]) -> None:
        """The shards are listed (a missing or unreadable one is an error here, before any stage
        runs) and the prompts read: a bad prompts file fails the job before any training."""
        from pipeline.stages.samples import prompts_for

        self.shards = shards
        self.listing = content_key(*shard_fingerprints(shards))
        self.prompts = prompts_for(self.cfg, shards)

    def _run(self, stage: Stage) -> StageResult:
        """Run (or find cached) one stage inside its own nested MLflow run."""
        key = self.key(stage)
        with mlflow.start_run(run_name=stage.name, nested=True, tags={"stage": stage.name}) as child:
            params = {}
            for path in stage.reads:
                value = config_value(self.cfg, path)
                params.update({f"{path}.{k}": v for k, v in to_flat_dict(value).items()} if is_dataclass(value)
                              else {path: str(value)})
            mlflow.log_params(params)
            self.stage_runs[stage.name] = child.info.run_id
            print(f"== stage {stage.name} (key {key}) ==", flush=True)
            result = run_stage(self.workdir, stage.name, key, lambda out: stage.run(self, out, child.info.run_id))
            mlflow.set_tags({"status": result.status, "cache_key": key})
            numeric = _numeric_metrics(result.metrics)
            if numeric:
                mlflow.log_metrics(numeric)
            mlflow.log_metric("stage_seconds", result.seconds)
        print(f"== stage {stage.name}: {result.status} in {result.seconds:.1f}s {result.metrics} ==", flush=True)
        self.results[stage.name] = result
        return result

    def register(self, kind: str, out: Path, metrics: dict) -> dict:
        """Log a first-stage model (and the VQ's reconstruction grid) to the stage's MLflow run and
        register it as <registered_model_name>-<kind> (pipeline.components)."""
        from pipeline.components import log_component

        if (out / "recon.png").is_file():
            mlflow.log_artifact(str(out / "recon.png"), "recon")
        registered = log_component(kind, out, self.cfg.mlflow.registered_model_name, self.cfg.mlflow.alias)
        print(f"[{kind}] registered as {registered['model_uri']}", flush=True)
        return {**metrics, "model_version": registered["version"]}

    def _summary(self, parent) -> dict:
        samples = self.output("samples")
        mlflow.log_artifact(str(samples / "grid.png"), "samples")
        mlflow.log_artifact(str(self.output("evaluate") / "fd_vs_clip_score.png"), "evaluate")
        summary = {
            "model_uri": self.registered("ldm")["model_uri"],
            **{f"{kind}_model_uri": self.registered(kind)["model_uri"]
               for kind in ("vq", "clip") if (self.output(kind) / "registered.json").is_file()},
            "tracking_uri": self.cfg.tracking_uri,
            "mlflow_run_id": parent.info.run_id,
            "mlflow_experiment_id": parent.info.experiment_id,
            "samples_dir": str(samples),
            "workdir": str(self.workdir),
            "stages": {name: result.summary() for name, result in self.results.items()},
            "promotion": {k: self.results["promote"].metrics.get(k)
                          for k in ("decision", "reason", "version", "candidate_fd", "production_fd")},
            "driver": driver_figures(),
        }
        mlflow.log_dict(summary, "summary.json")
        (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def driver_figures() -> dict:
    """Where the job's driver ran and its peak memory: it coordinates, the work runs in Ray."""
    import resource

    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_workflow(cfg: PipelineConfig) -> Path:
    """Run the workflow; returns the path of summary.json."""
    Workflow(cfg).run()
    return Path(cfg.workdir).resolve() / "summary.json"
