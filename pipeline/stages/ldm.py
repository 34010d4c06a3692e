"""The ldm stage: train the conditioned latent UNet with Ray Train + DeepSpeed on the latent dataset.

The driver's side: the workers' typed config from ours and the latents' metadata
(`build_loop_config`), the fit (`run_ldm`), its stall watchdog and its result. The loop each worker
runs is `pipeline.training.ldm_loop`. The driver stops a run whose steps stop
(`ldm.stall_timeout_s`) with an error naming what Ray waits for. Checkpoints are reported to Ray
Train, which keeps the last few and resumes from the latest after a worker or node failure. The
stage's output is the EMA UNet (`unet.json` + `unet.safetensors`) and `sizes.json`, the aspect-ratio
buckets it trained on (the sizes the model samples at; the default is the most populated).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import ray

from pipeline.config import PipelineConfig
from pipeline.data.buckets import latent_buckets, main_bucket, trained_sizes
from pipeline.models.unet import unet_config
from pipeline.ray_runtime import check_cpus_left_for_streaming, fit
from pipeline.recipe import micro_batch, with_latents_recipe
from pipeline.tracking import replay_when_back
from pipeline.training.checkpoint import count_parameters, read_progress
from pipeline.training.checkpoint_eval import CheckpointEvalPlan, CheckpointEvaluator, summarize
from pipeline.training.faults import FaultInjection
from pipeline.training.grids import GridConfig, model_parts
from pipeline.training.latents import LATENT_COLUMNS
from pipeline.training.ldm_loop import LDMLoopConfig, ldm_train_loop
from pipeline.training.progress import StallWatchdog, progress_board


def build_loop_config(cfg: PipelineConfig, latents_dir: Path, run_id: str | None, unlogged_path: str | None,
                      rows: int, prompts: list[str]) -> LDMLoopConfig:
    """The workers' config from ours and the latent dataset's metadata (tensors stay in files)."""
    meta = json.loads((latents_dir / "metadata.json").read_text())
    unet = unet_config(cfg.ldm.preset, in_channels=meta["latent_shape"][0], context_dim=meta["token_dim"],
                       pooled_dim=meta["pooled_dim"])
    buckets = latent_buckets(meta)
    for name, bucket in buckets.items():
        if any(side % unet.downsample_factor for side in bucket["latent_shape"][1:]):
            raise ValueError(
                f"the latents of bucket {name} are {bucket['latent_shape'][2]}x{bucket['latent_shape'][1]}, not "
                f"multiples of the '{cfg.ldm.preset}' UNet's downsampling factor {unet.downsample_factor}")
    ldm = cfg.ldm
    prompts = list(prompts)[:16]
    grid = None
    if run_id and prompts and meta.get("clip_dir") and meta.get("vq_dir"):  # at the size with the most samples
        grid = GridConfig(prompts, meta["clip_dir"], meta["vq_dir"], buckets[main_bucket(buckets)]["latent_shape"],
                          cfg.samples.seed, cfg.samples.guidance_scale, ldm.sample_grid_steps)
    return LDMLoopConfig(
        unet=asdict(unet), schedule=asdict(ldm.schedule), latents_dir=str(latents_dir),
        latent_scale=meta["latent_scale"], rows=rows, seed=cfg.seed, lr=ldm.lr, weight_decay=ldm.weight_decay,
        warmup_steps=ldm.warmup_steps, lr_schedule=ldm.lr_schedule,
        batch_size=micro_batch(ldm, buckets),
        grad_accum=ldm.grad_accum, grad_clip=ldm.grad_clip, zero_stage=ldm.zero_stage, precision=ldm.precision,
        p_uncond=ldm.p_uncond, ema_decay=ldm.ema_decay, max_steps=ldm.max_steps,
        checkpoint_every=ldm.checkpoint_every, log_every=ldm.log_every, max_nonfinite_steps=ldm.max_nonfinite_steps,
        sample_every=ldm.sample_every, threads=max(1, int(ldm.cpus_per_worker)), stream=ldm.stream_latents,
        tracking_uri=cfg.tracking_uri, run_id=run_id, unlogged_path=unlogged_path, grid=grid,
        faults=FaultInjection.from_env(Path(unlogged_path).with_name("injected_failure") if unlogged_path else None))


def start_evaluator(loop: LDMLoopConfig, plan: CheckpointEvalPlan | None, latents_dir: Path, tracking_uri: str,
                    run_id: str | None):
    """The actor the workers hand checkpoints to for evaluation (on the driver's node, which outlives
    the workers'), wired into `loop`; None when there is nothing to evaluate or nowhere to log it."""
    meta = json.loads((latents_dir / "metadata.json").read_text())
    if plan is None or not run_id or not (meta.get("vq_dir") and meta.get("clip_dir")):
        return None
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    buckets = latent_buckets(meta)
    parts = model_parts(loop, meta["vq_dir"], meta["clip_dir"], buckets[main_bucket(buckets)]["latent_shape"])
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    evaluator = CheckpointEvaluator.options(scheduling_strategy=here).remote(plan, parts, tracking_uri, run_id)
    loop.evaluator, loop.evaluate_every = evaluator, plan.every
    print(f"[ldm] evaluating every {plan.every} checkpoint(s) and the last beside training: {plan.fd_metric} and "
          f"{plan.score_metric} on {len(plan.captions)} held-out captions, into the ldm run", flush=True)
    return evaluator


def finish_evaluations(evaluator, plan: CheckpointEvalPlan | None) -> dict:
    """Wait for the evaluations still running (at most `evaluate.during_timeout_s`); their figures."""
    if evaluator is None:
        return {}
    try:
        results = ray.get(evaluator.drain.remote(), timeout=plan.timeout_s + 120)
    except (ray.exceptions.RayError, TimeoutError) as error:  # the evaluator lost: training's result stands
        print(f"[ldm] the evaluations during training are lost: {type(error).__name__}: {error}", flush=True)
        return {"evaluations": 0}
    finally:
        ray.kill(evaluator)
    return summarize(plan, results)


def stall_hint(cfg: PipelineConfig) -> str:
    """What frees a stalled ldm fit, in config keys."""
    ldm = cfg.ldm
    held = f"{ldm.num_workers} x {'1 GPU' if ldm.use_gpu else f'{ldm.cpus_per_worker:g} CPU'}"
    return (f"The trainers ask for ldm.num_workers x ldm.cpus_per_worker{' (ldm.use_gpu)' if ldm.use_gpu else ''} = "
            f"{held}{'; streamed latents (ldm.stream_latents=true) also need a CPU the trainers do not hold' if ldm.stream_latents else ''}. "
            f"Lower those, add nodes, or raise ldm.stall_timeout_s={ldm.stall_timeout_s:g} (0 waits forever).")


def run_ldm(cfg: PipelineConfig, latents_dir: Path, out_dir: Path, run_id: str | None, name: str,
            prompts: list[str] | None = None, evaluation: CheckpointEvalPlan | None = None) -> dict:
    """Train the UNet on the latent dataset; writes the EMA UNet into `out_dir`. `prompts`: those of
    the in-training sample grids (default `samples.prompts`); `evaluation`: what to evaluate of the
    checkpoints beside training (`pipeline.training.checkpoint_eval`), logged to the run `run_id`.

    Re-running with the same `name` and storage resumes from the run's latest checkpoint. By default
    every worker reads the latents from their files in the global order (exact resume);
    `ldm.stream_latents` streams them with Ray Data's dynamic split instead (latent sets larger
    than a worker's memory; resumes at the right step, not with the same batches).
    """
    cfg = with_latents_recipe(cfg, latents_dir)  # what the data decides, where the workflow has not
    ldm, workers = cfg.ldm, cfg.ldm.num_workers
    datasets = None
    buckets = latent_buckets(json.loads((latents_dir / "metadata.json").read_text()))
    if ldm.stream_latents and len(buckets) > 1:
        raise ValueError(f"ldm.stream_latents=true streams batches of any shape, but the latents are in "
                         f"{len(buckets)} aspect-ratio buckets ({', '.join(buckets)}): set ldm.stream_latents=false "
                         f"(each worker reads the latents, one bucket per batch) or data.buckets=square")
    if ldm.stream_latents:
        check_cpus_left_for_streaming(cfg.ray_address, workers, ldm.cpus_per_worker, "ldm")
        ds = ray.data.read_parquet(str(latents_dir / "data"))
        rows = ds.count()  # of the bare read: from the Parquet metadata, without reading the latents
        datasets = {"train": ds.select_columns(LATENT_COLUMNS)}
    else:
        rows = json.loads((latents_dir / "metadata.json").read_text())["samples"]
    storage = ldm.storage_path or str(Path(cfg.workdir).resolve() / "ray_results")
    # Kept on the workdir (shared by the nodes) even when checkpoints go to an object store.
    unlogged = str(Path(cfg.workdir).resolve() / "ray_results" / name / "unlogged_metrics.jsonl")
    loop = build_loop_config(cfg, latents_dir, run_id, unlogged, rows,
                             cfg.samples.prompts if prompts is None else prompts)
    loop.progress = progress_board()
    evaluator = start_evaluator(loop, evaluation, latents_dir, cfg.tracking_uri, run_id)
    start, started_at = time.perf_counter(), time.time()
    result = fit(
        ldm_train_loop, {"loop": loop}, name=name, storage_path=storage, num_workers=workers,
        use_gpu=ldm.use_gpu, datasets=datasets, cpus_per_worker=ldm.cpus_per_worker,
        max_failures=ldm.max_failures, num_to_keep=ldm.keep_checkpoints, split_datasets=True,
        watchdog=StallWatchdog(loop.progress, ldm.stall_timeout_s, f"ldm: {stall_hint(cfg)}"),
    )
    seconds = time.perf_counter() - start
    during = finish_evaluations(evaluator, evaluation)
    if run_id:  # rank 0 kept metrics it could not send (the tracking server away at the end)
        replay_when_back(cfg.tracking_uri, unlogged, run_id, wait_s=cfg.mlflow.outage_wait_s)
    starts = ray.get(loop.progress.snapshot.remote())["starts"]
    if result.checkpoint is None:
        raise RuntimeError(f"ldm training at {result.path} reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        for name_ in ("unet.json", "unet.safetensors"):
            if not (Path(directory) / name_).is_file():
                raise RuntimeError(f"final ldm checkpoint {result.checkpoint.path} has no {name_}")
            (out_dir / name_).write_bytes((Path(directory) / name_).read_bytes())
        progress = read_progress(directory)
    global_batch = loop.global_batch(workers)
    sizes = trained_sizes(buckets, global_batch)
    (out_dir / "sizes.json").write_text(json.dumps({"sizes": sizes["sizes"], "default_size": sizes["default_size"]}))
    trained = ldm.max_steps - (starts[0]["step"] if starts else 0)
    return {"final_loss": float((result.metrics or {}).get("loss", math.nan)),
            "train_img_per_s": trained * global_batch / seconds,
            "global_batch": global_batch,
            "nonfinite_steps": int(progress.get("nonfinite_steps", 0)),
            "worker_group_restarts": max(0, len(starts) - 1),
            "world_sizes": progress.get("world_sizes") or sorted({s["world_size"] for s in starts}),
            "bucket_batches_per_epoch": sizes["bucket_batches_per_epoch"],
            "samples_unused_per_epoch": sizes["samples_unused_per_epoch"],
            "params": count_parameters(out_dir / "unet.safetensors"),
            **during,
            # The fixed cost of the (last) start: Ray Train's worker group, then each worker's setup
            # (DeepSpeed engine, the latents, resuming a checkpoint).
            "startup_s": {"worker_group": round(starts[-1]["time"] - starts[-1]["setup_s"] - started_at, 2)
                          if len(starts) == 1 else None,
                          "worker_setup": round(starts[-1]["setup_s"], 2) if starts else None}}
