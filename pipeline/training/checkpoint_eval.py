"""Evaluation during training, beside it (`evaluate.every`).

Rank 0 hands the EMA weights of every `evaluate.every`-th checkpoint (and of the last) to
`CheckpointEvaluator`, an actor of the driver's that holds no resources. It scores them in a Ray
task on resources training does not hold (`evaluate.num_cpus`, `evaluate.num_gpus`): FD and CLIP
score at the promotion guidance scale on the first `evaluate.during_images` held-out captions,
against the evaluate stage's cached real features, logged to the ldm run at the checkpoint's step,
so the ldm run shows the FD curve over training. Training does not wait for it; where the cluster
has no room beside the trainers the tasks run after them, and the ldm stage waits for them (at
most `evaluate.during_timeout_s`, then it says which steps it gave up on) before it ends. An
evaluation that fails is reported and never fails the training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from pipeline.config.encoder import EncoderSpec


@dataclass
class CheckpointEvalPlan:
    """What every in-training evaluation computes, the same at each step."""

    every: int
    """Evaluate every `every`-th checkpoint (and the last)."""
    spec: EncoderSpec
    features_file: str
    """The held-out images' features (`heldout_features/<key>/features.safetensors`); the first
    `len(captions)` rows are those of the captions."""
    captions: list[str]
    seed: int
    scale: float
    steps: int
    sampler: str
    batch_size: int
    num_cpus: float
    num_gpus: float
    timeout_s: float
    fd_metric: str
    score_metric: str


def evaluate_checkpoint(plan: CheckpointEvalPlan, model_parts: dict, weights: dict, step: int,
                        tracking_uri: str, run_id: str) -> dict:
    """The Ray task: FD and CLIP score of the EMA `weights` of `step`, logged to the ldm run at that step."""
    import mlflow
    import torch
    from safetensors.numpy import load_file

    from pipeline.evaluation import fd_of
    from pipeline.stages.evaluate import score_generated
    from pipeline.training.grids import pipeline_model

    torch.set_num_threads(max(1, int(plan.num_cpus)))
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = pipeline_model(**model_parts).to(device)
    model.unet.load_state_dict(weights)
    result = score_generated(model, plan.spec, plan.captions, plan.seed, plan.scale, plan.steps, plan.sampler,
                             plan.batch_size, 0)
    real = load_file(plan.features_file)["features"][:len(plan.captions)]
    metrics = {plan.fd_metric: fd_of(result["features"], real), plan.score_metric: result["clip_score"],
               "eval_seconds": time.perf_counter() - start}
    client = mlflow.MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()])
    print(f"[ldm] step {step} evaluated beside training: {plan.fd_metric} {metrics[plan.fd_metric]:.4g}, "
          f"{plan.score_metric} {metrics[plan.score_metric]:.4g} ({metrics['eval_seconds']:.1f}s)", flush=True)
    return metrics


def evaluated_at(step: int, checkpoint_every: int, every: int, max_steps: int) -> bool:
    """Whether the checkpoint of `step` is evaluated during training: every `every`-th checkpoint,
    and the last (the ldm loop decides by it; a sweep's trials expect their reports by it)."""
    return step >= max_steps or (step % checkpoint_every == 0 and (step // checkpoint_every) % max(1, every) == 0)


@ray.remote(num_cpus=0)
class CheckpointEvaluator:
    """The driver's: takes checkpoints' EMA weights from rank 0 and scores each in its own task.
    It outlives the training workers (a restarted worker group hands it more), so its tasks do too."""

    def __init__(self, plan: CheckpointEvalPlan, model_parts: dict, tracking_uri: str, run_id: str):
        self.plan, self.model_parts, self.tracking_uri, self.run_id = plan, model_parts, tracking_uri, run_id
        self.pending: dict[int, ray.ObjectRef] = {}

    def submit(self, step: int, weights: dict) -> None:
        if step in self.pending:  # a resumed run reaching a step evaluated before it failed
            return
        task = ray.remote(evaluate_checkpoint).options(
            num_cpus=self.plan.num_cpus, num_gpus=self.plan.num_gpus, max_retries=0, name=f"evaluate_step_{step}")
        self.pending[step] = task.remote(self.plan, self.model_parts, weights, step, self.tracking_uri, self.run_id)

    def drain(self) -> dict:
        """Wait for every evaluation (at most `plan.timeout_s` in all): {step: metrics, or {"error": why}}."""
        refs = list(self.pending.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.plan.timeout_s) if refs else ([], [])
        results = {}
        for step, ref in sorted(self.pending.items()):
            if ref not in ready:
                ray.cancel(ref, force=True)
                results[step] = {"error": f"not finished after evaluate.during_timeout_s={self.plan.timeout_s:g}s "
                                          f"(each needs {self.plan.num_cpus:g} CPU, {self.plan.num_gpus:g} GPU)"}
                continue
            try:
                results[step] = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - reported, never fails the training
                results[step] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        return results


def summarize(plan: CheckpointEvalPlan, results: dict) -> dict:
    """The ldm stage's figures of its in-training evaluations (the curves themselves are on its run)."""
    done = {step: r for step, r in results.items() if "error" not in r}
    for step, r in results.items():
        if "error" in r:
            print(f"[ldm] the in-training evaluation of step {step} is missing: {r['error']}", flush=True)
    return {"evaluations": len(done), "evaluations_missing": len(results) - len(done),
            "eval_curve": {"steps": sorted(done), plan.fd_metric: [done[s][plan.fd_metric] for s in sorted(done)]}}
