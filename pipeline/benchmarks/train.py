"""Benchmark: the ldm stage's training loop against a bare torch loop over the same work.

    python jobs/benchmark.py train [--steps 60] [--rows 512] [key=value ...]

The stage is `run_ldm` as the workflow runs it (Ray Train worker group, DeepSpeed engine, the latent
table read from Parquet in the global order, per-sample randomness, EMA, per-step MLflow logging to a
SQLite store, the progress board, a checkpoint at the end) on a latent dataset of the config's shapes
(random latents and conditions: the speed does not depend on their values). The baseline is the
same work with nothing around it, in this process: the same UNet, AdamW and warmup, the same
batches from the same table in the same order, the same loss, dropout, noise, clipping and EMA, the
same threads (`ldm.cpus_per_worker`) and precision (fp32).

Steady state: the median time between consecutive steps over all but the first `--warmup` steps
(the stage's from the timestamps of its logged losses, the bare loop's from its clock); the ratio is
bare / stage (1.0: no overhead; aim >= 0.9). `mean_ratio` is the same of the mean steps, which
count what comes every few steps (metric flushes, progress reports) as throughput does. Fixed start-up, apart: the seconds from calling the fit
to its first step less one steady step, split into the worker group's start (placement group, Ray
Train controller, worker processes, torch.distributed), the worker's setup (DeepSpeed engine, latent
table) and the first step's extra (first batch, first allocation); and the bare loop's own.
The bare loop runs before and after the stage and its median is taken over both (machine drift).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bare_loop(cfg, latents_dir: Path, steps: int) -> dict:
    """The stage's work as a plain loop: returns per-step end times and the start-up seconds."""
    from pipeline.conditioning import drop_to_null
    from pipeline.diffusion import NoiseSchedule, training_loss
    from pipeline.models.unet import UNet, unet_config
    from pipeline.stages.encode import load_null_condition
    from pipeline.training.first_stage import adamw
    from pipeline.training.latents import GlobalOrder, LatentTable, SampleRandomness, positions
    from pipeline.training.ldm_loop import lr_scheduler

    ldm = cfg.ldm
    torch.set_num_threads(max(1, int(ldm.cpus_per_worker)))
    start = time.perf_counter()
    meta = json.loads((latents_dir / "metadata.json").read_text())
    torch.manual_seed(cfg.seed)
    model = UNet(unet_config(ldm.preset, in_channels=meta["latent_shape"][0], context_dim=meta["token_dim"],
                             pooled_dim=meta["pooled_dim"]))
    optimizer = adamw(model.parameters(), ldm.lr, ldm.weight_decay)
    scheduler = lr_scheduler(optimizer, ldm.warmup_steps, ldm.lr_schedule, ldm.max_steps)
    ema = [p.detach().clone() for p in model.parameters()]
    table = LatentTable(str(latents_dir / "data"))
    order = GlobalOrder(table.rows, ldm.batch_size, cfg.seed)
    null = load_null_condition(latents_dir)
    schedule = NoiseSchedule(ldm.schedule)
    setup = time.perf_counter() - start
    ends, losses = [], []
    for step in range(steps):
        x0, cond = table.batch(order.micro_batch(step, 0, 0, 1, ldm.batch_size), torch.device("cpu"),
                               meta["latent_scale"])
        drawn = SampleRandomness.draw(cfg.seed, step, 0, positions(0, 0, 1, len(x0)), x0.shape[1:],
                                      schedule.num_train_timesteps, torch.device("cpu"))
        cond = drop_to_null(cond, null, ldm.p_uncond, uniform=drawn.uniform)
        loss = training_loss(model, schedule, x0, cond, t=drawn.t, noise=drawn.noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ldm.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - ldm.ema_decay)
        losses.append(loss.item())  # the stage reads the loss every step
        ends.append(time.perf_counter())
    return {"ends": ends, "start": start, "setup_s": setup, "losses": losses}


def steady_step(ends: list[float], warmup: int) -> float:
    return statistics.median(b - a for a, b in zip(ends[warmup:], ends[warmup + 1:]))


def mean_step(ends: list[float], warmup: int) -> float:
    """The mean step after the warm-up: what throughput sees, periodic costs (log flushes) included."""
    return (ends[-1] - ends[warmup]) / (len(ends) - 1 - warmup)


def bench_args(prog: str, argv: list[str], steps: int, **more: int) -> argparse.Namespace:
    """The ldm benchmarks' command line: `--steps`, `--warmup` (steps the steady figures leave out),
    `--rows` of the latent dataset, config overrides, and each of `more` (an integer option: its default)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=10)
    for name, default in more.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (default: the demo's)")
    return parser.parse_args(argv)


def bench_config(root: Path, steps: int, checkpoint_every: int, overrides: list[str]):
    """The demo's config for a timed ldm stage: no sample grids, quiet progress, outputs under `root`."""
    from pipeline.config import load_config

    return load_config(None, [f"workdir={root / 'work'}", f"ldm.max_steps={steps}",
                              f"ldm.checkpoint_every={checkpoint_every}", "ldm.sample_every=0", "ldm.log_every=1000",
                              *overrides])


def latent_shape(cfg) -> tuple[int, int, int]:
    """(channels, height, width) of the config's square latents."""
    side = cfg.data.image_size // cfg.vq.downsample
    return cfg.vq.latent_channels, side, side


def bench_latents(cfg, root: Path, rows: int, context: int = 16) -> Path:
    """`rows` random latents and conditions of the config's shapes in `root/latents` (the speed does
    not depend on their values)."""
    from pipeline.tiny_models import write_latent_dataset

    return write_latent_dataset(root / "latents", rows, latent_shape(cfg), context=context, width=cfg.clip.width,
                                image_size=cfg.data.image_size)


def timed_ldm(cfg, latents_dir: Path, out: Path, name: str, run_name: str | None = None, evaluation=None) -> dict:
    """The ldm stage (`run_ldm`) into a new MLflow run and `out`: its run id, result, start (epoch
    seconds, as MLflow's timestamps are) and wall seconds."""
    import mlflow

    from pipeline.stages.ldm import run_ldm

    with mlflow.start_run(run_name=run_name) as run:
        run_id = run.info.run_id
    out.mkdir()
    started, start = time.time(), time.perf_counter()
    result = run_ldm(cfg, latents_dir, out, run_id, name=name, prompts=[], evaluation=evaluation)
    return {"run_id": run_id, "result": result, "started": started, "wall_s": time.perf_counter() - start}


def loss_ends(tracking_uri: str, run_id: str) -> list[float]:
    """When each step of an ldm run ended, from its logged losses' timestamps."""
    from mlflow import MlflowClient

    history = sorted(MlflowClient(tracking_uri).get_metric_history(run_id, "loss"), key=lambda m: m.step)
    return [m.timestamp / 1000 for m in history if m.step > 0]


def main(argv: list[str]) -> dict:
    args = bench_args("benchmark.py train", argv, steps=60)

    import ray

    from pipeline.recipe import with_latents_recipe
    from pipeline.tracking import setup_experiment

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = bench_config(root, args.steps, args.steps, args.overrides)
        if cfg.ldm.num_workers != 1 or cfg.ldm.grad_accum != 1:
            raise SystemExit("benchmark.py train compares one worker without gradient accumulation to a bare loop")
        ray.init(num_cpus=max(2, int(cfg.ldm.cpus_per_worker)), include_dashboard=False, log_to_driver=False)
        try:
            latents_dir = bench_latents(cfg, root, args.rows)
            cfg = with_latents_recipe(cfg, latents_dir)  # the UNet and budget the stage resolves, for both
            before = bare_loop(cfg, latents_dir, args.steps)
            setup_experiment(cfg.tracking_uri, "benchmark-train", root / "work")
            run = timed_ldm(cfg, latents_dir, root / "ldm", "bench")
            after = bare_loop(cfg, latents_dir, args.steps)
        finally:
            ray.shutdown()
        stage_ends = loss_ends(cfg.tracking_uri, run["run_id"])
    result, fit_start = run["result"], run["started"]
    stage = steady_step(stage_ends, args.warmup)
    bare = statistics.median([steady_step(before["ends"], args.warmup), steady_step(after["ends"], args.warmup)])
    stage_mean = mean_step(stage_ends, args.warmup)
    bare_mean = statistics.mean([mean_step(before["ends"], args.warmup), mean_step(after["ends"], args.warmup)])
    parts = result["startup_s"]
    first_step_extra = stage_ends[0] - fit_start - parts["worker_group"] - parts["worker_setup"] - stage
    bare_first = statistics.median([r["ends"][0] - r["start"] - r["setup_s"] for r in (before, after)]) - bare
    return {
        "preset": cfg.ldm.preset, "batch": cfg.ldm.batch_size, "threads": int(cfg.ldm.cpus_per_worker),
        "steps": args.steps, "latent_shape": list(latent_shape(cfg)),
        "stage_step_s": round(stage, 4), "bare_step_s": round(bare, 4),
        "steady_ratio": round(bare / stage, 3),
        "stage_mean_step_s": round(stage_mean, 4), "bare_mean_step_s": round(bare_mean, 4),
        "mean_ratio": round(bare_mean / stage_mean, 3),
        "stage_img_per_s": round(cfg.ldm.batch_size / stage, 1), "bare_img_per_s": round(cfg.ldm.batch_size / bare, 1),
        "stage_startup_s": round(stage_ends[0] - stage - fit_start, 2),
        "stage_startup_parts_s": {**parts, "first_step_extra": round(first_step_extra, 2)},
        "bare_startup_s": round(statistics.median([r["setup_s"] for r in (before, after)]) + max(0.0, bare_first), 2),
        # The same work: the two final losses agree (to float summation order).
        "stage_final_loss": result["final_loss"], "bare_final_loss": after["losses"][-1],
    }
