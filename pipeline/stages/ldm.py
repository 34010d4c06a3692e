"""The ldm stage: train the conditioned latent UNet with Ray Train + DeepSpeed on the latent dataset.

Small named pieces, as in Ray's DeepSpeed example: `deepspeed_config`, `setup_model_and_optimizer`,
`latent_batches`, `save_checkpoint` / `load_checkpoint`, `ldm_train_loop`. Rank 0 logs per-step
metrics to the stage's MLflow run and keeps the EMA of the UNet weights; checkpoints (DeepSpeed's
on every rank, plus EMA and step on rank 0) are reported to Ray Train, which keeps the last few and
resumes from the latest. The stage's output is the EMA UNet (`unet.json` + `unet.safetensors`).
"""

from __future__ import annotations

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
from pipeline.ray_runtime import ProgressLine, fit
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
    """Exponential moving average of the UNet weights, kept in fp32 on rank 0."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, value in model.state_dict().items():
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
        local_shuffle_seed=config["seed"] + epoch,
    )


def save_checkpoint(engine, ema: EMA | None, step: int, epoch: int, directory: str) -> None:
    """DeepSpeed state on every rank; EMA weights and progress on rank 0."""
    engine.save_checkpoint(directory, tag="deepspeed")
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, os.path.join(directory, "ema.safetensors"))
        with open(os.path.join(directory, "progress.json"), "w") as f:
            json.dump({"step": step, "epoch": epoch}, f)


def load_checkpoint(engine, ema: EMA | None, directory: str) -> tuple[int, int]:
    """Restore DeepSpeed and EMA state; returns (step, epoch)."""
    engine.load_checkpoint(directory, tag="deepspeed")
    if ema is not None:
        ema.shadow = load_file(os.path.join(directory, "ema.safetensors"))
    with open(os.path.join(directory, "progress.json")) as f:
        progress = json.load(f)
    return progress["step"], progress["epoch"]


def export_unet(unet_cfg: dict, weights: dict, directory: str) -> None:
    """The served artefact: the UNet's constructor arguments and its (EMA) weights."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "unet.json").write_text(json.dumps(unet_cfg, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "unet.safetensors"))


def ldm_train_loop(config: dict) -> None:
    """Ray Train worker loop: epsilon (or v) loss with conditioning dropout, DeepSpeed steps, EMA."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    engine, scheduler = setup_model_and_optimizer(config, world)
    dtype = DTYPES[config["precision"]]
    schedule = NoiseSchedule(ScheduleConfig(**config["schedule"]))
    null = Conditioning(**{k: torch.tensor(v) for k, v in config["null"].items()})
    null = Conditioning(null.tokens.float(), null.mask.bool(), null.pooled.float())
    ema = EMA(engine.module, config["ema_decay"]) if rank == 0 else None
    step, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            step, epoch = load_checkpoint(engine, ema, directory)
    generator = torch.Generator().manual_seed(config["seed"] * 1000 + rank + 7919 * step)
    logger = MetricLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config["run_id"] else None
    progress = ProgressLine("ldm", config["max_steps"], every=config["log_every"], start_step=step)
    shard = ray.train.get_dataset_shard("train")
    scale = config["latent_scale"]

    def model_fn(z, t, cond):
        return engine(z.to(dtype), t, cond.to(dtype=dtype)).float()

    while step < config["max_steps"]:
        wait_start = time.perf_counter()
        for batch in latent_batches(shard, config, epoch):
            data_wait = time.perf_counter() - wait_start
            step_start = time.perf_counter()
            x0 = batch["latent"].float() * scale
            cond = Conditioning(batch["tokens"].float(), batch["mask"].bool(), batch["pooled"].float())
            cond = drop_to_null(cond, null, config["p_uncond"], generator)
            loss = training_loss(model_fn, schedule, x0, cond, generator=generator)
            engine.backward(loss)
            engine.step()
            if not engine.is_gradient_accumulation_boundary():
                wait_start = time.perf_counter()
                continue
            step += 1
            if ema is not None:
                ema.update(engine.module)
            if rank == 0:
                step_time = time.perf_counter() - step_start
                metrics = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                           "data_wait_frac": data_wait / max(data_wait + step_time, 1e-9)}
                shown = progress.update(step, len(x0) * world, loss=metrics["loss"], lr=metrics["lr"])
                if logger:
                    logger.log({**metrics, **shown}, step)
            if step % config["checkpoint_every"] == 0 or step >= config["max_steps"]:
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(engine, ema, step, epoch, tmp)
                    if step >= config["max_steps"] and ema is not None:
                        export_unet(config["unet"], ema.shadow, tmp)
                    ray.train.report({"step": step, "loss": loss.item()},
                                     checkpoint=ray.train.Checkpoint.from_directory(tmp))
            if step >= config["max_steps"]:
                break
            wait_start = time.perf_counter()
        epoch += 1
    if logger:
        logger.close()


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
    }


def run_ldm(cfg: PipelineConfig, latents_dir: Path, out_dir: Path, run_id: str | None, name: str) -> dict:
    """Train the UNet on the latent dataset; writes the EMA UNet into `out_dir`."""
    loop_config = build_loop_config(cfg, latents_dir, run_id)
    ds = ray.data.read_parquet(str(latents_dir / "data")).select_columns(LATENT_COLUMNS)
    if not cfg.ldm.stream_latents:
        ds = ds.materialize()
    storage = cfg.ldm.storage_path or str(Path(cfg.workdir).resolve() / "ray_results")
    start = time.perf_counter()
    result = fit(
        ldm_train_loop, loop_config, name=name, storage_path=storage, num_workers=cfg.ldm.num_workers,
        use_gpu=cfg.ldm.use_gpu, datasets={"train": ds}, cpus_per_worker=cfg.ldm.cpus_per_worker,
        max_failures=cfg.ldm.max_failures, num_to_keep=cfg.ldm.keep_checkpoints,
    )
    seconds = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError(f"ldm training at {result.path} reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        for name_ in ("unet.json", "unet.safetensors"):
            if not (Path(directory) / name_).is_file():
                raise RuntimeError(f"final ldm checkpoint {result.checkpoint.path} has no {name_}")
            (out_dir / name_).write_bytes((Path(directory) / name_).read_bytes())
    reported = result.metrics or {}
    images = cfg.ldm.max_steps * cfg.ldm.batch_size * cfg.ldm.grad_accum * cfg.ldm.num_workers
    return {"final_loss": float(reported.get("loss", math.nan)), "train_img_per_s": images / seconds,
            "params": sum(v.numel() for v in load_file(str(out_dir / "unet.safetensors")).values())}
