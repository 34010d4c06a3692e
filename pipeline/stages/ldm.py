"""The ldm stage: train the conditioned latent UNet with Ray Train + DeepSpeed on the latent dataset.

Small named pieces, as in Ray's DeepSpeed example: `deepspeed_config`, `setup_model_and_optimizer`,
`latent_batches`, `save_checkpoint` / `load_checkpoint`, `ldm_train_loop`. Rank 0 logs per-step
metrics to the stage's MLflow run and keeps the EMA of the UNet weights; checkpoints (DeepSpeed's
on every rank, plus EMA and step on rank 0) are reported to Ray Train, which keeps the last few and
resumes from the latest. The stage's output is the EMA UNet (`unet.json` + `unet.safetensors`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, save_file

from pipeline.conditioning import Conditioning, drop_to_null
from pipeline.config import PipelineConfig
from pipeline.diffusion import NoiseSchedule, ScheduleConfig, training_loss
from pipeline.models.unet import UNet, UNetConfig, unet_config
from pipeline.ray_runtime import ProgressLine, check_cpus_left_for_streaming, fit, fit_batch_size
from pipeline.tracking import MetricLogger

LATENT_COLUMNS = ["latent", "tokens", "mask", "pooled"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(config: dict, world_size: int) -> dict:
    """The DeepSpeed config derived from ours: batch sizes, ZeRO stage, precision, clipping."""
    return {
        "train_micro_batch_size_per_gpu": config["batch_size"],
        "gradient_accumulation_steps": config["grad_accum"],
        "train_batch_size": config["batch_size"] * config["grad_accum"] * world_size,
        "gradient_clipping": config["grad_clip"],
        "zero_optimization": {"stage": config["zero_stage"]},
        "bf16": {"enabled": config["precision"] == "bf16"},
        "fp16": {"enabled": config["precision"] == "fp16", "initial_scale_power": 12},
        # Our optimizer is torch's AdamW (no compiled DeepSpeed op needed on CPU or GPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def setup_model_and_optimizer(config: dict, world_size: int):
    """UNet + AdamW + warmup schedule wrapped in a DeepSpeed engine."""
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce op (C++, tens of
    # seconds on a fresh machine) that only its inference path uses; training all-reduces via gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    model = UNet(UNetConfig(**config["unet"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    warmup = max(1, config["warmup_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, world_size)
    )
    return engine, scheduler


class EMA:
    """Exponential moving average of the UNet weights, kept in fp32 on rank 0.

    Under ZeRO-3 each rank holds only a partition of every parameter, so reading the weights is a
    collective: every rank must call `update` (and the constructor), which gathers the full
    parameters for the moment of the update; only rank 0 (`keep=True`) keeps the average.
    """

    def __init__(self, engine, decay: float, keep: bool, zero3: bool):
        self.decay, self.keep, self.zero3 = decay, keep, zero3
        self.shadow: dict[str, torch.Tensor] = {}
        with self._full_weights(engine) as weights:
            if keep:
                self.shadow = {k: v.detach().float().clone() for k, v in weights.items()}

    @contextlib.contextmanager
    def _full_weights(self, engine):
        """The module's full weights by name; under ZeRO-3 gathered on every rank for the block."""
        module = engine.module
        weights = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        if not self.zero3:
            yield weights
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield weights

    @torch.no_grad()
    def update(self, engine) -> None:
        with self._full_weights(engine) as weights:
            if not self.keep:
                return
            for name, value in weights.items():
                shadow = self.shadow[name]
                if value.is_floating_point():
                    shadow.lerp_(value.detach().float(), 1 - self.decay)
                else:
                    shadow.copy_(value)


def latent_batches(shard, config: dict, epoch: int):
    """One epoch of training batches from this worker's dataset shard, shuffled with a seed."""
    return shard.iter_torch_batches(
        batch_size=config["batch_size"],
        drop_last=True,
        local_shuffle_buffer_size=8 * config["batch_size"],
        local_shuffle_seed=config["seed"] + 1000 * epoch,
    )


def save_checkpoint(engine, ema: EMA, state: dict, generator: torch.Generator, rank: int, directory: str) -> None:
    """DeepSpeed state and this rank's RNG state on every rank; EMA weights and progress on rank 0."""
    engine.save_checkpoint(directory, tag="deepspeed")
    save_file({"state": generator.get_state()}, os.path.join(directory, f"rng_rank{rank}.safetensors"))
    if ema.keep:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, os.path.join(directory, "ema.safetensors"))
        with open(os.path.join(directory, "progress.json"), "w") as f:
            json.dump(state, f)


def load_checkpoint(engine, ema: EMA, generator: torch.Generator, rank: int, directory: str) -> dict:
    """Restore DeepSpeed, EMA and RNG state; returns the progress record (step, epoch, batch)."""
    engine.load_checkpoint(directory, tag="deepspeed")
    if ema.keep:
        ema.shadow = load_file(os.path.join(directory, "ema.safetensors"))
    rng = os.path.join(directory, f"rng_rank{rank}.safetensors")
    if os.path.isfile(rng):
        generator.set_state(load_file(rng)["state"])
    with open(os.path.join(directory, "progress.json")) as f:
        return json.load(f)


def export_unet(unet_cfg: dict, weights: dict, directory: str) -> None:
    """The served artefact: the UNet's constructor arguments and its (EMA) weights."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "unet.json").write_text(json.dumps(unet_cfg, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "unet.safetensors"))


class InjectedFailure(RuntimeError):
    """Raised by rank 0 at step LDM_FAIL_AT_STEP (tests of resume)."""


def injected_faults() -> dict:
    """Faults for tests, read from the driver's environment and passed to the workers in the config:
    LDM_FAIL_AT_STEP=k makes rank 0 raise when about to take step k, once per run;
    LDM_NONFINITE_AT_STEP=k (LDM_NONFINITE_REPEAT=n, default 1) makes rank 0's loss NaN for the first
    n attempts at step k."""
    env = os.environ
    return {"fail_at_step": int(env.get("LDM_FAIL_AT_STEP", 0) or 0),
            "nonfinite_at_step": int(env.get("LDM_NONFINITE_AT_STEP", 0) or 0),
            "nonfinite_repeat": int(env.get("LDM_NONFINITE_REPEAT", 1) or 1)}


def _injected_failure(config: dict, rank: int, step: int) -> None:
    """Raise at the injected step, once: a marker file next to the run's checkpoints remembers it
    across the restart."""
    if rank != 0 or config["inject"]["fail_at_step"] != step or not config.get("fail_marker"):
        return
    marker = Path(config["fail_marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(step))
    raise InjectedFailure(f"LDM_FAIL_AT_STEP={step}: injected failure on rank 0")


def _injected_nonfinite(config: dict, rank: int, step: int, attempts: dict) -> bool:
    inject = config["inject"]
    if rank != 0 or inject["nonfinite_at_step"] != step:
        return False
    attempts[step] = attempts.get(step, 0) + 1
    return attempts[step] <= inject["nonfinite_repeat"]


def _all_finite(flag: bool) -> bool:
    """True when `flag` is true on every rank (one tiny all-reduce), so all ranks skip together."""
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def _weights_finite(engine) -> bool:
    """Whether this rank's (partition of the) weights is finite, agreed across ranks."""
    local = all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters())
    return _all_finite(bool(local))


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else None


def null_condition(config: dict) -> Conditioning:
    """The null condition of classifier-free guidance, as carried in the loop config (plain lists)."""
    null = config["null"]
    return Conditioning(torch.tensor(null["tokens"]).float(), torch.tensor(null["mask"]).bool(),
                        torch.tensor(null["pooled"]).float())


def ldm_train_loop(config: dict) -> None:
    """Ray Train worker loop: epsilon (or v) loss with conditioning dropout, DeepSpeed steps, EMA.

    Resume is exact: a checkpoint holds DeepSpeed's state (weights, optimizer, LR schedule), every
    rank's RNG state, the EMA and the position in the epoch; on resume each rank skips the batches
    of the epoch it had already trained on, so with the same data order the per-step losses match
    an uninterrupted run.
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    engine, scheduler = setup_model_and_optimizer(config, world)
    dtype = DTYPES[config["precision"]]
    schedule = NoiseSchedule(ScheduleConfig(**config["schedule"]))
    null = null_condition(config)
    ema = EMA(engine, config["ema_decay"], keep=rank == 0, zero3=config["zero_stage"] == 3)
    generator = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    state = {"step": 0, "epoch": 0, "batch": 0, "nonfinite_steps": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state.update(load_checkpoint(engine, ema, generator, rank, directory))
        if rank == 0:
            print(f"[ldm] resumed from step {state['step']} (epoch {state['epoch']}, batch {state['batch']})", flush=True)
    logger = None
    if rank == 0 and config["run_id"]:
        logger = MetricLogger(config["tracking_uri"], config["run_id"], fallback_path=config.get("unlogged_path"),
                              system_metrics=True)
    grids = SampleGrids(config, logger) if rank == 0 and logger else None
    try:
        _train(config, engine, scheduler, ema, generator, state, schedule, null, dtype, rank, world, logger, grids)
    finally:
        if logger:
            logger.close()


def _train(config, engine, scheduler, ema, generator, state, schedule, null, dtype, rank, world, logger, grids):
    import ray.train

    progress = ProgressLine("ldm", config["max_steps"], every=config["log_every"], start_step=state["step"])
    shard = ray.train.get_dataset_shard(config["dataset_name"].format(rank=rank))
    scale = config["latent_scale"]
    nonfinite_in_a_row, injected = 0, {}

    def model_fn(z, t, cond):
        return engine(z.to(dtype), t, cond.to(dtype=dtype)).float()

    def checkpoint(final: bool) -> None:
        if not _weights_finite(engine):  # never persist a non-finite state
            raise RuntimeError(f"ldm: non-finite weights at step {state['step']}; not writing a checkpoint")
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(engine, ema, state, generator, rank, tmp)
            if final and ema.keep:
                export_unet(config["unet"], ema.shadow, tmp)
            ray.train.report({"step": state["step"], "loss": last_loss, "nonfinite_steps": state["nonfinite_steps"]},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))

    last_loss = math.nan
    while state["step"] < config["max_steps"]:
        skip = state["batch"]  # batches of this epoch already trained on (after a resume)
        wait_start = time.perf_counter()
        got_a_batch = False
        for index, batch in enumerate(latent_batches(shard, config, state["epoch"])):
            got_a_batch = True
            if index < skip:
                wait_start = time.perf_counter()
                continue
            state["batch"] = index + 1
            data_wait = time.perf_counter() - wait_start
            step_start = time.perf_counter()
            _injected_failure(config, rank, state["step"] + 1)
            x0 = batch["latent"].float() * scale
            cond = Conditioning(batch["tokens"].float(), batch["mask"].bool(), batch["pooled"].float())
            cond = drop_to_null(cond, null, config["p_uncond"], generator)
            loss = training_loss(model_fn, schedule, x0, cond, generator=generator)
            if _injected_nonfinite(config, rank, state["step"] + 1, injected):
                loss = loss * math.nan
            if not _all_finite(bool(torch.isfinite(loss))):
                # Skip the step on every rank: no backward, no optimizer step, no EMA update.
                state["nonfinite_steps"] += 1
                nonfinite_in_a_row += 1
                if rank == 0:
                    print(f"[ldm] non-finite loss before step {state['step'] + 1}: step skipped "
                          f"({nonfinite_in_a_row} in a row, {state['nonfinite_steps']} in all)", flush=True)
                if nonfinite_in_a_row >= config["max_nonfinite_steps"]:
                    raise RuntimeError(
                        f"ldm: {nonfinite_in_a_row} non-finite losses in a row before step {state['step'] + 1} "
                        f"(ldm.max_nonfinite_steps={config['max_nonfinite_steps']}); stopping. The latest "
                        f"checkpoint holds the last finite state; lower ldm.lr or check the latents.")
                wait_start = time.perf_counter()
                continue
            nonfinite_in_a_row = 0
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            norm = _grad_norm(engine) if boundary and config["zero_stage"] == 0 else None
            engine.step()
            if not boundary:
                wait_start = time.perf_counter()
                continue
            state["step"] += 1
            step = state["step"]
            ema.update(engine)
            last_loss = loss.item()
            if rank == 0:
                step_time = time.perf_counter() - step_start
                norm = norm if norm is not None else engine.get_global_grad_norm()
                metrics = {"loss": last_loss, "lr": scheduler.get_last_lr()[0],
                           "data_wait_frac": data_wait / max(data_wait + step_time, 1e-9),
                           "nonfinite_steps": state["nonfinite_steps"]}
                if norm is not None:
                    metrics["grad_norm"] = float(norm)
                shown = progress.update(step, len(x0) * world * config["grad_accum"], loss=last_loss, lr=metrics["lr"])
                if logger:
                    logger.log({**metrics, **shown}, step)
                if grids and config["sample_every"] and step % config["sample_every"] == 0 and step < config["max_steps"]:
                    grids.log(ema.shadow, step)
            final = step >= config["max_steps"]
            if step % config["checkpoint_every"] == 0 or final:
                checkpoint(final)
            if final:
                break
            wait_start = time.perf_counter()
        else:
            if not got_a_batch:  # would loop forever
                raise RuntimeError(f"rank {rank}'s dataset shard holds no full batch of {config['batch_size']} latents")
            state["epoch"] += 1
            state["batch"] = 0
    if grids:
        grids.log(ema.shadow, state["step"])


class SampleGrids:
    """Rank 0: sample grids of fixed prompts and seeds from the EMA weights, logged to MLflow."""

    def __init__(self, config: dict, logger: MetricLogger):
        self.config, self.logger = config, logger
        self.enabled = bool(config.get("grid"))
        self.vq = self.unet = None  # built at the first grid, reused after

    def log(self, weights: dict, step: int) -> None:
        """Never fails the training: a grid that cannot be made or logged is reported and skipped."""
        if not self.enabled:
            return
        try:
            self._log(weights, step)
        except Exception as error:  # noqa: BLE001
            print(f"[ldm] no sample grid for step {step}: {type(error).__name__}: {error}", flush=True)

    @torch.no_grad()
    def _log(self, weights: dict, step: int) -> None:
        from pipeline.models.vq import VQModel
        from pipeline.sampling import guided, randn_per_sample, sample

        grid = self.config["grid"]
        start = time.perf_counter()
        if self.vq is None:
            self.vq = VQModel.load(grid["vq_dir"])[0]
            self.unet = UNet(UNetConfig(**self.config["unet"])).eval()
        unet = self.unet
        unet.load_state_dict(weights)
        cond = Conditioning(torch.tensor(grid["tokens"]).float(), torch.tensor(grid["mask"]).bool(),
                            torch.tensor(grid["pooled"]).float())
        null = null_condition(self.config)
        generators = [torch.Generator().manual_seed(grid["seed"] + i) for i in range(len(cond))]
        x = randn_per_sample((len(cond), *grid["latent_shape"]), generators, torch.device("cpu"), torch.float32)
        schedule = NoiseSchedule(ScheduleConfig(**self.config["schedule"]))
        model_fn = guided(unet, cond, null, grid["guidance_scale"])
        latents = sample("ddim", model_fn, x, schedule, num_steps=grid["steps"], generator=generators)
        images = self.vq.decode(latents / self.config["latent_scale"])
        from torchvision.utils import make_grid

        picture = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=min(8, len(images)), padding=1)
        array = (picture.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        self.logger.client.log_image(self.logger.run_id, array, artifact_file=f"samples/step_{step:06d}.png")
        print(f"[ldm] sample grid of step {step} logged to MLflow as samples/step_{step:06d}.png "
              f"({time.perf_counter() - start:.1f}s)", flush=True)


def build_loop_config(cfg: PipelineConfig, latents_dir: Path, run_id: str | None) -> dict:
    meta = json.loads((latents_dir / "metadata.json").read_text())
    from pipeline.stages.encode import load_null_condition

    null = load_null_condition(latents_dir)
    unet = unet_config(cfg.ldm.preset, in_channels=meta["latent_shape"][0], context_dim=meta["token_dim"],
                       pooled_dim=meta["pooled_dim"])
    side = meta["latent_shape"][1]
    if side % unet.downsample_factor:
        raise ValueError(
            f"latent side {side} (data.image_size {cfg.data.image_size} / vq.downsample {cfg.vq.downsample}) is not a "
            f"multiple of the '{cfg.ldm.preset}' UNet's downsampling factor {unet.downsample_factor}"
        )
    ldm = cfg.ldm
    return {
        "unet": asdict(unet),
        "schedule": asdict(ldm.schedule),
        "seed": cfg.seed,
        "lr": ldm.lr,
        "weight_decay": ldm.weight_decay,
        "warmup_steps": ldm.warmup_steps,
        "batch_size": ldm.batch_size,
        "grad_accum": ldm.grad_accum,
        "grad_clip": ldm.grad_clip,
        "zero_stage": ldm.zero_stage,
        "precision": ldm.precision,
        "p_uncond": ldm.p_uncond,
        "ema_decay": ldm.ema_decay,
        "max_steps": ldm.max_steps,
        "checkpoint_every": ldm.checkpoint_every,
        "log_every": ldm.log_every,
        "latent_scale": meta["latent_scale"],
        "null": {"tokens": null.tokens.tolist(), "mask": null.mask.tolist(), "pooled": null.pooled.tolist()},
        "tracking_uri": cfg.tracking_uri,
        "run_id": run_id,
        "threads": max(1, int(ldm.cpus_per_worker)),
        "max_nonfinite_steps": ldm.max_nonfinite_steps,
        "sample_every": ldm.sample_every,
        "grid": grid_config(cfg, meta) if run_id else None,
        "inject": injected_faults(),
    }


def grid_config(cfg: PipelineConfig, meta: dict) -> dict | None:
    """What rank 0 needs for in-training sample grids: the prompts' encodings, the VQ decoder."""
    from pipeline.models.text import TextEncoder

    prompts = list(cfg.samples.prompts)[:16]
    if not prompts or not meta.get("clip_dir") or not meta.get("vq_dir"):
        return None
    cond = TextEncoder.load(meta["clip_dir"]).encode(prompts)
    return {"tokens": cond.tokens.tolist(), "mask": cond.mask.tolist(), "pooled": cond.pooled.tolist(),
            "vq_dir": meta["vq_dir"], "latent_shape": meta["latent_shape"], "seed": cfg.samples.seed,
            "guidance_scale": cfg.samples.guidance_scale, "steps": cfg.ldm.sample_grid_steps}


def run_ldm(cfg: PipelineConfig, latents_dir: Path, out_dir: Path, run_id: str | None, name: str) -> dict:
    """Train the UNet on the latent dataset; writes the EMA UNet into `out_dir`.

    Re-running with the same `name` and storage resumes from the run's latest checkpoint.
    By default (`ldm.stream_latents=False`) the latents are materialised in order and split into one
    fixed part per worker, so every run sees the same data order and resume is exact; streaming
    uses Ray Data's dynamic split (scales to latent sets larger than the object store, and resumes
    at the right step, but the batches after a resume are not the same as without the failure).
    """
    loop_config = build_loop_config(cfg, latents_dir, run_id)
    workers = cfg.ldm.num_workers
    if cfg.ldm.stream_latents:
        check_cpus_left_for_streaming(cfg.ray_address, workers, cfg.ldm.cpus_per_worker, "ldm")
        ds = ray.data.read_parquet(str(latents_dir / "data"))
        rows = ds.count()  # of the bare read: from the Parquet metadata, without reading the latents
        datasets, split = {"train": ds.select_columns(LATENT_COLUMNS)}, True
        loop_config["dataset_name"] = "train"
    else:
        # A Dataset copies the DataContext when it is created: order is preserved from the read on.
        ctx = ray.data.DataContext.get_current()
        order, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
        try:
            ds = ray.data.read_parquet(str(latents_dir / "data")).select_columns(LATENT_COLUMNS)
            parts = ds.materialize().split(workers, equal=True)
        finally:
            ctx.execution_options.preserve_order = order
        datasets, split = {f"train_{rank}": part for rank, part in enumerate(parts)}, False
        loop_config["dataset_name"] = "train_{rank}"
        rows = sum(part.count() for part in parts)
    loop_config["batch_size"] = fit_batch_size(rows, cfg.ldm.batch_size, workers, "ldm")
    storage = cfg.ldm.storage_path or str(Path(cfg.workdir).resolve() / "ray_results")
    if "://" not in storage:
        loop_config["fail_marker"] = str(Path(storage) / name / "injected_failure")
        loop_config["unlogged_path"] = str(Path(storage) / name / "unlogged_metrics.jsonl")
    start = time.perf_counter()
    result = fit(
        ldm_train_loop, loop_config, name=name, storage_path=storage, num_workers=workers,
        use_gpu=cfg.ldm.use_gpu, datasets=datasets, cpus_per_worker=cfg.ldm.cpus_per_worker,
        max_failures=cfg.ldm.max_failures, num_to_keep=cfg.ldm.keep_checkpoints, split_datasets=split,
    )
    seconds = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError(f"ldm training at {result.path} reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        for name_ in ("unet.json", "unet.safetensors"):
            if not (Path(directory) / name_).is_file():
                raise RuntimeError(f"final ldm checkpoint {result.checkpoint.path} has no {name_}")
            (out_dir / name_).write_bytes((Path(directory) / name_).read_bytes())
        progress = json.loads((Path(directory) / "progress.json").read_text())
    ldm = cfg.ldm
    global_batch = loop_config["batch_size"] * ldm.grad_accum * workers
    return {"final_loss": float((result.metrics or {}).get("loss", math.nan)),
            "train_img_per_s": ldm.max_steps * global_batch / seconds,
            "global_batch": global_batch,
            "nonfinite_steps": int(progress.get("nonfinite_steps", 0)),
            "params": sum(v.numel() for v in load_file(str(out_dir / "unet.safetensors")).values())}
