"""Benchmark: the ldm stage's step time with evaluation during training on, against off.

    python jobs/benchmark.py train_eval [--steps 300] [--checkpoints 3] [--repeats 2] [--spare-cpus 0] [key=value ...]

The same `run_ldm` (the demo's shapes, random latents, untrained encoders: the speed does not
depend on their values) trains twice in one Ray instance: without evaluation, then with
`evaluate.every=1`, each of `--checkpoints` checkpoints' EMA scored (FD and CLIP score on
`evaluate.during_images` captions, `samples.steps` DDIM steps) in a task of `evaluate.num_cpus`.
The Ray instance has the trainer's CPUs plus `--spare-cpus`: with none, the evaluations wait for
training to end (the ratio says training does not wait for them; `eval_after_s` is what they add);
with spare logical CPUs on a machine that has no spare cores (this one has 2), they run beside
training on the same cores, which is what the ratio then measures. On a cluster the spare resources
are other cores or another GPU. Step time: the median and the mean time between consecutive logged
losses after `--warmup` steps; ratio = off / on (1.0: evaluation costs training nothing). The two
alternate over `--repeats` pairs (off-on, on-off, ...) so that drift in the machine's speed falls on
both; the figures are the means over the pairs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path


def main(argv: list[str]) -> dict:
    from pipeline.benchmarks.train import (bench_args, bench_config, bench_latents, loss_ends, mean_step, steady_step,
                                           timed_ldm)

    args = bench_args("benchmark.py train_eval", argv, steps=300, checkpoints=3, repeats=2, spare_cpus=0)

    import numpy as np
    import ray
    import torch
    from mlflow import MlflowClient
    from safetensors.numpy import save_file

    from pipeline.evaluation import EncoderSpec, Encoders
    from pipeline.models.text import TextEncoder
    from pipeline.stages.evaluate import metric_name, promotion_scale
    from pipeline.tiny_models import save_untrained_encoders
    from pipeline.tracking import setup_experiment
    from pipeline.training.checkpoint_eval import CheckpointEvalPlan

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = bench_config(root, args.steps, max(1, args.steps // args.checkpoints),
                           ["clip.context_length=16", *args.overrides])
        trainer_cpus = int(cfg.ldm.cpus_per_worker) * cfg.ldm.num_workers
        ray.init(num_cpus=trainer_cpus + args.spare_cpus, include_dashboard=False, log_to_driver=False)
        try:
            vq_dir, clip_dir = save_untrained_encoders(cfg, root / "encoders")
            latents = bench_latents(cfg, root, args.rows, context=TextEncoder.load(clip_dir).context_length)
            meta = json.loads((latents / "metadata.json").read_text())
            (latents / "metadata.json").write_text(json.dumps({**meta, "vq_dir": str(vq_dir), "clip_dir": str(clip_dir)}))
            spec = EncoderSpec.parse("", clip_dir)
            real = np.random.default_rng(0).uniform(-1, 1, (cfg.evaluate.during_images, 3, cfg.data.image_size,
                                                            cfg.data.image_size)).astype(np.float32)
            save_file({"features": Encoders(spec, torch.device("cpu")).fd_features(torch.from_numpy(real))},
                      str(root / "features.safetensors"))
            scale, e = promotion_scale(cfg), cfg.evaluate
            plan = CheckpointEvalPlan(
                every=1, spec=spec, features_file=str(root / "features.safetensors"),
                captions=[f"caption {i}" for i in range(e.during_images)], seed=0, scale=scale,
                steps=e.steps or cfg.samples.steps, sampler=cfg.samples.sampler, batch_size=e.batch_size,
                num_cpus=e.num_cpus if args.spare_cpus == 0 else min(e.num_cpus, args.spare_cpus),
                num_gpus=0, timeout_s=e.during_timeout_s, fd_metric=metric_name("fd", spec.fd_name, scale),
                score_metric=metric_name("clip_score", spec.score_name, scale))
            setup_experiment(cfg.tracking_uri, "benchmark-train-eval", root / "work")
            runs = {"off": [], "on": []}
            for repeat in range(args.repeats):
                order = (("off", None), ("on", plan)) if repeat % 2 == 0 else (("on", plan), ("off", None))
                for name, evaluation in order:
                    run = timed_ldm(cfg, latents, root / f"{name}-{repeat}", f"bench-{name}-{repeat}",
                                    run_name=f"{name}-{repeat}", evaluation=evaluation)
                    runs[name].append({**run, "ends": loss_ends(cfg.tracking_uri, run["run_id"]),
                                       "eval_s": [m.value for m in MlflowClient(cfg.tracking_uri).get_metric_history(
                                           run["run_id"], "eval_seconds")]})
        finally:
            ray.shutdown()
    def mean(name: str, figure) -> float:
        return statistics.fmean(figure(r) for r in runs[name])

    step = {name: mean(name, lambda r: steady_step(r["ends"], args.warmup)) for name in runs}
    mean_steps = {name: mean(name, lambda r: mean_step(r["ends"], args.warmup)) for name in runs}
    training = {name: mean(name, lambda r: r["ends"][-1] - r["ends"][0]) for name in runs}
    wall = {name: mean(name, lambda r: r["wall_s"]) for name in runs}
    last = runs["on"][-1]["result"]
    return {
        "steps": args.steps, "checkpoints": args.checkpoints, "repeats": args.repeats,
        "ray_cpus": trainer_cpus + args.spare_cpus, "trainer_cpus": trainer_cpus, "eval_cpus": plan.num_cpus,
        "eval_images": len(plan.captions), "eval_sampling_steps": plan.steps,
        "evaluations": [r["result"].get("evaluations") for r in runs["on"]],
        "evaluations_missing": [r["result"].get("evaluations_missing") for r in runs["on"]],
        "eval_task_s": [round(s, 1) for r in runs["on"] for s in r["eval_s"]],
        "step_s_off": round(step["off"], 4), "step_s_on": round(step["on"], 4),
        "steady_ratio": round(step["off"] / step["on"], 3),
        "steady_ratio_per_pair": [round(steady_step(a["ends"], args.warmup) / steady_step(b["ends"], args.warmup), 3)
                                  for a, b in zip(runs["off"], runs["on"])],
        "mean_step_s_off": round(mean_steps["off"], 4), "mean_step_s_on": round(mean_steps["on"], 4),
        "mean_ratio": round(mean_steps["off"] / mean_steps["on"], 3),
        "training_s_off": round(training["off"], 1), "training_s_on": round(training["on"], 1),
        "stage_wall_s_off": round(wall["off"], 1), "stage_wall_s_on": round(wall["on"], 1),
        # What the stage's wall time grows by beyond its training: the evaluations left to run after it.
        "eval_after_s": round((wall["on"] - training["on"]) - (wall["off"] - training["off"]), 1),
        "fd_curve": last.get("eval_curve"),
    }
