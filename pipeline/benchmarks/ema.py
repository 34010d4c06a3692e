"""Benchmark: the ldm stage's sharded EMA under ZeRO-3 against an EMA that gathers every step.

    python jobs/benchmark.py ema [--preset tiny|medium] [--workers 2] [--steps 30] [--batch 8]

Both EMAs follow the same DeepSpeed ZeRO-3 run of the UNet (Ray Train, gloo on CPU, NCCL on GPU):
`pipeline.training.ema.EMA` averages each rank's own partitions, with no collective; the baseline,
`GatheringEMA`, is what the stage did before: gather every parameter (`GatheredParameters`) at
each step, rank 0 averaging the whole model. Steps alternate in blocks of `--block` between
updating one and the other, and each step's time (forward, backward, optimizer step, EMA update)
is recorded; the result is the ratio of the median step times and of the median EMA update times
(sharded / gathering), and the largest difference between the two averages after a few final
steps that update both from the same start.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch

from pipeline.training.ema import EMA

WARMUP_STEPS = 2
"""Untimed first steps (DeepSpeed's first fetches, allocations)."""


class GatheringEMA:
    """The baseline: at every update, ZeRO-3 gathers every parameter on every rank, and rank 0
    averages the whole model. Every rank must call `update`."""

    def __init__(self, engine, decay: float, rank: int):
        self.decay, self.rank = decay, rank
        with self._gathered(engine) as weights:
            self.shadow = {k: v.detach().float().clone() for k, v in weights.items()} if rank == 0 else {}

    @staticmethod
    @contextlib.contextmanager
    def _gathered(engine):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield dict(engine.module.named_parameters())

    @torch.no_grad()
    def update(self, engine) -> None:
        with self._gathered(engine) as weights:
            for name, value in weights.items() if self.rank == 0 else ():
                self.shadow[name].lerp_(value.detach().float(), 1 - self.decay)


def ema_loop(config: dict) -> None:
    """Ray Train worker: a ZeRO-3 UNet trained on random latents with both EMAs. In the timed
    steps, blocks of `block` steps alternate which EMA is updated; the final `compare_steps` steps
    update both, after both were set equal, so that their difference measures the sharding alone."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from pipeline.conditioning import Conditioning
    from pipeline.models.unet import build_unet

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    model = build_unet(config["preset"], context_dim=config["context_dim"]).use_fused_paths(False).to(device)
    batch, decay = config["batch"], config["decay"]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": batch, "train_batch_size": batch * world,
                "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                "steps_per_print": 1 << 30})
    sharded, gathering = EMA(engine, decay, rank, zero3=True), GatheringEMA(engine, decay, rank)
    gen = torch.Generator().manual_seed(1 + rank)
    side, length = config["latent_side"], 8

    def step(emas) -> tuple[float, float]:
        x = torch.randn(batch, 4, side, side, generator=gen).to(device)
        cond = Conditioning(torch.randn(batch, length, config["context_dim"], generator=gen),
                            torch.ones(batch, length, dtype=torch.bool), torch.zeros(batch, 0)).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        start = time.perf_counter()
        loss = (engine(x, t, cond) - x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        before_ema = time.perf_counter()
        for ema in emas:
            ema.update(engine)
        if device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        return end - start, end - before_ema

    for _ in range(WARMUP_STEPS):
        step([sharded, gathering])
    times = {"sharded": [], "gathering": []}
    emas = {"sharded": sharded, "gathering": gathering}
    for i in range(config["steps"]):
        kind = "sharded" if (i // config["block"]) % 2 == 0 else "gathering"
        times[kind].append(step([emas[kind]]))
    # Both from the same start, then updated alike: any difference is the sharding's.
    start = sharded.full_weights()
    if rank == 0:
        gathering.shadow = {k: v.to(device).float().clone() for k, v in start.items()}
    for _ in range(config["compare_steps"]):
        step([sharded, gathering])
    full = sharded.full_weights()
    metrics = {}
    if rank == 0:
        metrics["max_abs_diff"] = max(float((full[k] - v.cpu()).abs().max()) for k, v in gathering.shadow.items())
        metrics["params"] = sum(v.numel() for v in full.values())
    for kind, pairs in times.items():
        metrics[f"step_s_{kind}"] = statistics.median(p[0] for p in pairs)
        metrics[f"ema_s_{kind}"] = statistics.median(p[1] for p in pairs)
    # Ray Train keeps the metrics reported with a checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py ema", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="UNet preset (pipeline.models.unet.UNET_PRESETS)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="timed steps (half with each EMA)")
    parser.add_argument("--block", type=int, default=5, help="consecutive steps with one EMA")
    parser.add_argument("--compare-steps", type=int, default=5, help="final steps updating both EMAs")
    parser.add_argument("--batch", type=int, default=8, help="micro batch per worker")
    parser.add_argument("--latent-side", type=int, default=8)
    parser.add_argument("--context-dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, storage_path: str) -> dict:
    """One Ray Train fit of `ema_loop`; returns rank 0's metrics."""
    from pipeline.ray_runtime import fit

    config = {"preset": args.preset, "batch": args.batch, "decay": 0.99, "steps": args.steps, "block": args.block,
              "compare_steps": args.compare_steps, "latent_side": args.latent_side, "context_dim": args.context_dim,
              "threads": args.threads}
    result = fit(ema_loop, config, name="bench-ema", storage_path=storage_path, num_workers=args.workers,
                 use_gpu=args.gpu, cpus_per_worker=1.0)
    return result.metrics


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    from pipeline.ray_runtime import init_ray

    init_ray("")
    with tempfile.TemporaryDirectory(prefix="bench-ema-") as storage:
        metrics = run(args, storage)
    return {
        "preset": args.preset, "workers": args.workers, "batch": args.batch, "steps": args.steps,
        "params": metrics["params"],
        "step_ratio_sharded_vs_gathering": round(metrics["step_s_sharded"] / metrics["step_s_gathering"], 4),
        "ema_update_ratio_sharded_vs_gathering": round(metrics["ema_s_sharded"] / metrics["ema_s_gathering"], 4),
        "step_s_sharded": round(metrics["step_s_sharded"], 4), "step_s_gathering": round(metrics["step_s_gathering"], 4),
        "ema_s_sharded": round(metrics["ema_s_sharded"], 5), "ema_s_gathering": round(metrics["ema_s_gathering"], 5),
        "max_abs_diff": metrics["max_abs_diff"],
    }
