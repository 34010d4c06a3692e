"""The ldm stage's training loop, run by each Ray Train worker (`pipeline.stages.ldm` starts it).

Shaped like Ray's DeepSpeed example: `setup_model_and_optimizer`, `next_batch`, `train_step`,
`report_metrics_and_save_checkpoint`, `load_checkpoint`, and `ldm_train_loop(config)` tying them
together on each worker. Every worker reads the latents from the shared storage in one global order
(`pipeline.training.latents`), so nothing it needs dies with a node and a resumed run trains on the
same samples, at any world size. Rank 0 logs per-step metrics to the stage's MLflow run, keeps the EMA
of the weights (under ZeRO-3 each rank keeps its partitions' EMA, `pipeline.training.ema`) and tells
the driver's progress board each step.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from pipeline.conditioning import Conditioning, drop_to_null
from pipeline.diffusion import NoiseSchedule, ScheduleConfig, training_loss
from pipeline.models.unet import UNet, UNetConfig
from pipeline.ray_runtime import ProgressLine
from pipeline.tracking import MetricLogger
from pipeline.training.checkpoint import (checkpoint_directory, checkpoint_progress, export_unet, load_checkpoint,
                                         made_once_per_node, save_checkpoint, to_universal)
from pipeline.training.checkpoint_eval import evaluated_at
from pipeline.training.ema import EMA
from pipeline.training.faults import FaultInjection
from pipeline.training.first_stage import adamw, warmup_cosine
from pipeline.training.grids import GridConfig, SampleGrids
from pipeline.training.health import grad_norm, sum_over_ranks, weights_finite
from pipeline.training.latents import SampleRandomness, StreamBatches, TableBatches, positions
from pipeline.training.progress import StepReporter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What rank 0 logs every step; a restarted run does not log a step of these twice.
STEP_METRICS = ("loss", "lr", "grad_norm", "data_wait_frac", "nonfinite_steps", "img_per_s")


@dataclass
class LDMLoopConfig:
    """Everything a training worker needs, built by the driver (`build_loop_config`)."""

    unet: dict
    schedule: dict
    latents_dir: str
    """The encode stage's output: `data/*.parquet` and `null_condition.safetensors` (shared storage)."""
    latent_scale: float
    rows: int
    seed: int
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    """'cosine' (to zero at max_steps) or 'constant' after the warmup."""
    batch_size: int
    """Micro batch per worker."""
    grad_accum: int
    grad_clip: float
    zero_stage: int
    precision: str
    p_uncond: float
    ema_decay: float
    max_steps: int
    checkpoint_every: int
    log_every: int
    max_nonfinite_steps: int
    sample_every: int
    threads: int
    stream: bool = False
    tracking_uri: str = ""
    run_id: str | None = None
    unlogged_path: str | None = None
    grid: GridConfig | None = None
    faults: FaultInjection = field(default_factory=FaultInjection)
    progress: object = None
    """The driver's `TrainingProgress` actor (None: nobody watches)."""
    evaluator: object = None
    """The driver's `CheckpointEvaluator` actor (None: no evaluation during training)."""
    evaluate_every: int = 0
    """Hand every `evaluate_every`-th checkpoint's EMA (and the last) to `evaluator`."""

    def global_batch(self, world: int) -> int:
        return self.batch_size * world * self.grad_accum


@dataclass
class TrainState:
    """The position of a run: what `progress.json` holds in a checkpoint."""

    step: int = 0
    nonfinite_steps: int = 0
    world_sizes: list[int] = field(default_factory=list)
    """The world sizes this run has trained at, in the order they came (any resume may change it)."""


def deepspeed_config(loop: LDMLoopConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config derived from ours: batch sizes, ZeRO stage, precision, clipping;
    `load_universal`: the checkpoint it will load is a universal one (resumed at another world size)."""
    return {
        "train_micro_batch_size_per_gpu": loop.batch_size,
        "gradient_accumulation_steps": loop.grad_accum,
        "train_batch_size": loop.global_batch(world_size),
        # fp32 ZeRO-0: we clip, with the norm we log (DeepSpeed would compute it a second time).
        "gradient_clipping": 0.0 if clips_itself(loop) else loop.grad_clip,
        "zero_optimization": {"stage": loop.zero_stage},
        "bf16": {"enabled": loop.precision == "bf16"},
        "fp16": {"enabled": loop.precision == "fp16", "initial_scale_power": 12},
        # Our optimizer is torch's AdamW (no compiled DeepSpeed op needed on CPU or GPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def clips_itself(loop: LDMLoopConfig) -> bool:
    """Whether the loop clips the gradients itself: fp32 ZeRO-0, where every rank holds them whole
    after the all-reduce (elsewhere DeepSpeed's optimizer wrappers clip what they partition or scale)."""
    return loop.zero_stage == 0 and loop.precision == "fp32"


def setup_model_and_optimizer(loop: LDMLoopConfig, world_size: int, load_universal: bool = False):
    """UNet + AdamW + warmup schedule wrapped in a DeepSpeed engine (on this worker's device)."""
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce op (C++, tens of
    # seconds on a fresh machine) that only its inference path uses; training all-reduces via gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(loop.seed)  # identical initial weights on every rank
    # ZeRO-3 makes a parameter whole only inside its own module's call: no fused paths.
    model = UNet(UNetConfig(**loop.unet)).use_fused_paths(loop.zero_stage != 3).to(ray.train.torch.get_device())
    optimizer = adamw(model.parameters(), loop.lr, loop.weight_decay)
    scheduler = lr_scheduler(optimizer, loop.warmup_steps, loop.lr_schedule, loop.max_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(loop, world_size, load_universal))
    if world_size == 1 and loop.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one worker: its gradients are already the mean
    return engine, scheduler


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, schedule: str, max_steps: int):
    """The linear warmup, then `schedule` (`ldm.lr_schedule`; a function of the optimizer step, so
    exact on resume)."""
    if schedule == "cosine":
        return warmup_cosine(optimizer, warmup_steps, max_steps)
    warmup = max(1, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def next_batch(batches, step: int, micro: int) -> tuple[tuple[torch.Tensor, Conditioning], float]:
    """Micro-batch `micro` of step `step` and the seconds spent waiting for it."""
    start = time.perf_counter()
    batch = batches.get(step, micro)
    return batch, time.perf_counter() - start


class Trainer:
    """One worker's training state and the steps on it (the pieces `ldm_train_loop` calls)."""

    def __init__(self, loop: LDMLoopConfig):
        ctx = ray.train.get_context()
        self.loop, self.rank, self.world = loop, ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank, self.node_rank = ctx.get_local_rank(), ctx.get_node_rank()
        torch.set_num_threads(loop.threads)
        self.device = ray.train.torch.get_device()
        # The checkpoint to resume, if any: written at another world size, its ZeRO-partitioned state
        # is loaded through a universal checkpoint, which the engine must be built to read.
        self.checkpoint = ray.train.get_checkpoint()
        self.resumed = checkpoint_progress(self.checkpoint) if self.checkpoint else None
        self.written_by = (self.resumed or {}).get("world_size", self.world)
        self.universal = self.written_by != self.world and loop.zero_stage > 0
        self.engine, self.scheduler = setup_model_and_optimizer(loop, self.world, self.universal)
        self.dtype = DTYPES[loop.precision]
        self.schedule = NoiseSchedule(ScheduleConfig(**loop.schedule))
        from pipeline.stages.encode import load_null_condition

        self.null = load_null_condition(Path(loop.latents_dir)).to(self.device, torch.float32)
        self.ema = EMA(self.engine, loop.ema_decay, rank=self.rank, zero3=loop.zero_stage == 3)
        self.state = TrainState()
        self.batches = (StreamBatches if loop.stream else TableBatches)(loop, self.rank, self.world, self.device)

    def model_fn(self, z, t, cond):
        return self.engine(z.to(self.dtype), t, cond.to(dtype=self.dtype)).float()

    def micro_loss(self, step: int, micro: int) -> tuple[torch.Tensor, float, float]:
        """The loss of one micro-batch that is finite on every rank, retried with fresh noise and
        dropout while it is not (each try counted in `nonfinite_steps`; too many in a row stop the run).
        Returns (loss, the mean loss over the ranks, data wait seconds)."""
        loop, tries, waited = self.loop, 0, 0.0
        while True:
            (x0, cond), wait = next_batch(self.batches, step, micro)
            waited += wait
            drawn = SampleRandomness.draw(loop.seed, step, tries, positions(micro, self.rank, self.world, len(x0)),
                                          x0.shape[1:], self.schedule.num_train_timesteps, self.device)
            cond = drop_to_null(cond, self.null, loop.p_uncond, uniform=drawn.uniform)
            loss = training_loss(self.model_fn, self.schedule, x0, cond, t=drawn.t, noise=drawn.noise)
            loss = loop.faults.loss(loss, self.rank, step + 1)
            finite = bool(torch.isfinite(loss))
            total, bad = sum_over_ranks([loss.item() if finite else 0.0, 0.0 if finite else 1.0], self.device)
            if bad == 0:
                return loss, total / self.world, waited
            tries += 1
            self.state.nonfinite_steps += 1
            if self.rank == 0:
                print(f"[ldm] non-finite loss before step {step + 1}: retried with new noise ({tries} in a row, "
                      f"{self.state.nonfinite_steps} in all)", flush=True)
            if tries >= loop.max_nonfinite_steps:
                raise RuntimeError(
                    f"ldm: {tries} non-finite losses in a row before step {step + 1} "
                    f"(ldm.max_nonfinite_steps={loop.max_nonfinite_steps}); stopping. The latest "
                    f"checkpoint holds the last finite state; lower ldm.lr or check the latents.")

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its metrics (global mean loss)."""
        step, engine = self.state.step, self.engine
        losses, waited, start, norm = [], 0.0, time.perf_counter(), None
        for micro in range(self.loop.grad_accum):
            loss, mean, wait = self.micro_loss(step, micro)
            losses.append(mean)
            waited += wait
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and self.loop.zero_stage == 0:
                norm = self.clip_gradients() if clips_itself(self.loop) else grad_norm(engine)
            engine.step()
        self.state.step += 1
        self.ema.update(engine)
        norm = norm if norm is not None else engine.get_global_grad_norm()
        elapsed = time.perf_counter() - start
        metrics = {"loss": sum(losses) / len(losses), "lr": self.scheduler.get_last_lr()[0],
                   "data_wait_frac": waited / max(elapsed, 1e-9), "nonfinite_steps": self.state.nonfinite_steps}
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        return metrics

    def clip_gradients(self) -> float:
        """Clip the whole gradients to `grad_clip` (0: no clipping); returns their norm before."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.loop.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.loop.grad_clip, norm)
        return float(norm)

    def load_checkpoint(self) -> bool:
        """Resume from Ray Train's latest checkpoint, if there is one (at any world size)."""
        if not self.checkpoint:
            return False
        progress = self.resumed
        with checkpoint_directory(self.checkpoint, self.node_rank, self.local_rank,
                                  torch.distributed.barrier) as directory:
            if self.universal:
                with self.universal_checkpoint(directory, progress["step"]) as universal:
                    load_checkpoint(self.engine, self.ema, directory, universal)
            else:
                load_checkpoint(self.engine, self.ema, directory)
        self.state = TrainState(step=progress["step"], nonfinite_steps=progress.get("nonfinite_steps", 0),
                                world_sizes=progress.get("world_sizes", [self.written_by]))
        return True

    def universal_checkpoint(self, directory: str, step: int):
        """The checkpoint in `directory` as a universal one, converted once per node (by its local
        rank 0) while the node's other ranks wait."""
        def convert(out: str) -> None:
            seconds = to_universal(directory, out, workers=min(4, self.loop.threads))
            print(f"[ldm] the step-{step} checkpoint of {self.written_by} worker(s) (ZeRO-{self.loop.zero_stage}) "
                  f"converted to a universal one for {self.world} in {seconds:.1f} s", flush=True)

        return made_once_per_node("universal", self.checkpoint.path, self.node_rank, self.local_rank, convert,
                                  torch.distributed.barrier)

    def report_metrics_and_save_checkpoint(self, metrics: dict, logger: MetricLogger | None, final: bool) -> None:
        """Checkpoint every rank's state and report it to Ray Train (with the step's metrics). The
        metrics logged so far are made durable first, so a resumed run has every step before it.
        Rank 0 hands the checkpoint's EMA to the in-training evaluation when one is due."""
        if not weights_finite(self.engine, self.device):  # never persist a non-finite state
            raise RuntimeError(f"ldm: non-finite weights at step {self.state.step}; not writing a checkpoint")
        if logger:
            logger.commit()
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_checkpoint(self.engine, self.ema, asdict(self.state) | {"world_size": self.world}, tmp)
            if final and self.ema.keep:  # the EMA the checkpoint gathered: no second gather
                export_unet(self.loop.unet, weights, tmp)
            ray.train.report({"step": self.state.step, "loss": metrics["loss"],
                              "nonfinite_steps": self.state.nonfinite_steps},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        loop = self.loop
        if loop.evaluator is not None and self.ema.keep and evaluated_at(
                self.state.step, loop.checkpoint_every, loop.evaluate_every, loop.max_steps):
            # Not waited for: the evaluation runs in its own task, beside training where there is room.
            loop.evaluator.submit.remote(self.state.step, {k: v.detach().cpu() for k, v in weights.items()})


def ldm_train_loop(config: dict) -> None:
    """Ray Train worker loop: epsilon (or v) loss with conditioning dropout, DeepSpeed steps, EMA.

    Resume is exact: a checkpoint holds DeepSpeed's state (weights, optimizer, LR schedule), every
    rank's RNG state, the EMA and the step, and the step says which batches come next.
    """
    loop: LDMLoopConfig = config["loop"]
    began = time.time()
    trainer = Trainer(loop)
    resumed = trainer.load_checkpoint()
    if trainer.state.world_sizes[-1:] != [trainer.world]:
        trainer.state.world_sizes.append(trainer.world)
    rank0 = trainer.rank == 0
    if rank0 and resumed:
        print(f"[ldm] resumed from step {trainer.state.step} on {trainer.world} worker(s) "
              f"(world sizes so far: {trainer.state.world_sizes})", flush=True)
    reporter = StepReporter(loop.progress if rank0 else None)
    reporter.started(trainer.world, trainer.state.step, setup_s=time.time() - began)
    logger = None
    if rank0 and loop.run_id:
        logger = MetricLogger(loop.tracking_uri, loop.run_id, fallback_path=loop.unlogged_path, system_metrics=True)
        logger.resume_after(trainer.state.step, STEP_METRICS)
    grids = SampleGrids(loop, logger, trainer.device) if logger and loop.grid else None
    # Decided alike on every rank: reading the EMA is a collective under ZeRO-3.
    grid_steps = bool(loop.grid and loop.run_id)
    progress = ProgressLine("ldm", loop.max_steps, every=loop.log_every, start_step=trainer.state.step)
    try:
        while trainer.state.step < loop.max_steps:
            loop.faults.before_step(trainer.rank, trainer.state.step + 1)
            metrics = trainer.train_step()
            step = trainer.state.step
            reporter.stepped(step)
            if rank0:
                shown = progress.update(step, loop.global_batch(trainer.world), loss=metrics["loss"], lr=metrics["lr"])
                if logger:
                    logger.log({**metrics, **shown}, step)
            if grid_steps and loop.sample_every and step % loop.sample_every == 0 and step < loop.max_steps:
                weights = trainer.ema.full_weights()
                if grids:
                    grids.log(weights, step)
            final = step >= loop.max_steps
            if step % loop.checkpoint_every == 0 or final:
                trainer.report_metrics_and_save_checkpoint(metrics, logger, final)
        if grid_steps:
            weights = trainer.ema.full_weights()
            if grids:
                grids.log(weights, trainer.state.step)
    finally:
        if logger:
            logger.close()
