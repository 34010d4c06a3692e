"""Joining Ray, running a Ray Train fit, and the training progress line, shared by the trainers.

Every job starts here: on a cluster (`ray job submit`, RAY_ADDRESS, or `ray_address` in config) it
joins it; otherwise it starts a local Ray instance with this machine's CPUs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import ray
import ray.train
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


# Ray Train's placement-group cleaner asks the state API once a second whether the trainer's
# controller is alive. A local instance started without the dashboard does not serve that API, so
# each ask logs a warning (about 800 lines in a demo run) and is retried; nothing else depends on it.
LOCAL_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_logs_hook(names: tuple[str, ...] = LOCAL_NOISY_LOGGERS) -> Callable[[], None]:
    """A worker setup hook keeping the errors of the `names` loggers, not their warnings.

    A closure, so Ray ships it by value: a worker runs it without importing this module (torch,
    Ray Train), which would add seconds to every Ray Data task worker's start.
    """

    def quiet() -> None:
        import logging

        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)

    return quiet


def init_ray(address: str = "") -> None:
    """Connect to the configured cluster, or start a local Ray instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    # Workers import `pipeline` from the installed package; keep their thread pools modest so
    # several workers and Ray Data tasks share a small machine without oversubscription.
    # Ray Train (2.60) sends a worker's print to its logger and, since Ray's workers wrap stdout, to
    # stdout as well: every progress line reached the driver twice. Off, a print is printed once.
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
                        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env={**env, "worker_process_setup_hook": quiet_logs_hook()},
                 log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


# A driver waiting for a task says so (with Ray's pending demands) this often.
TASK_REPORT_S = 60.0


def run_task(fn: Callable, *args, num_cpus: float = 1.0, num_gpus: float = 0.0, **kwargs):
    """`fn(*args, **kwargs)` as a Ray task with declared resources (a GPU on a cluster), its result.

    The job's driver coordinates, it does not compute: on KubeRay it runs on the head, which holds
    no CPU for work and would be killed for the memory. torch runs `num_cpus` threads in the task.
    A task that waits longer than TASK_REPORT_S says so, with what Ray is waiting for.
    """
    return run_tasks(fn, [(args, kwargs)], num_cpus=num_cpus, num_gpus=num_gpus)[0]


def run_tasks(fn: Callable, calls: list[tuple[tuple, dict]], num_cpus: float = 1.0, num_gpus: float = 0.0) -> list:
    """`run_task` for several `(args, kwargs)` calls of `fn` at once (they run side by side where
    the cluster has the resources); their results in order."""
    from pipeline.training.progress import pending_demands

    threads = max(1, int(num_cpus))

    def call(*a, **k):
        torch.set_num_threads(threads)
        return fn(*a, **k)

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(call).options(name=fn.__name__)
    refs, start = [task.remote(*args, **kwargs) for args, kwargs in calls], time.monotonic()
    while len(ray.wait(refs, num_returns=len(refs), timeout=TASK_REPORT_S)[0]) < len(refs):
        print(f"[{fn.__name__}] still running or waiting after {time.monotonic() - start:.0f} s (each needs "
              f"{num_cpus:g} CPU, {num_gpus:g} GPU); Ray is waiting for: {pending_demands(settle_s=0)}", flush=True)
    return ray.get(refs)


def task_resources(section) -> dict:
    """The resources of a stage's evaluation task, from its training section (use_gpu, cpus_per_worker)."""
    if section.use_gpu:
        return {"num_cpus": 1.0, "num_gpus": 1.0}
    return {"num_cpus": float(section.cpus_per_worker), "num_gpus": 0.0}


def check_cpus_left_for_streaming(ray_address: str, num_workers: int, cpus_per_worker: float, name: str) -> None:
    """Streaming ingest reads with Ray Data tasks while the trainers run, on CPUs the trainers do not
    hold; where there are none it waits forever. A local Ray instance cannot grow, so that is
    refused here, before any work. Against a cluster (an address set) nodes may be added by the
    autoscaler, so nothing is checked."""
    if ray_address or os.environ.get("RAY_ADDRESS"):
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    held = num_workers * cpus_per_worker
    if total - held < 1:
        raise ValueError(
            f"{name}.stream_latents=true reads the latents with Ray Data while the trainers run, which needs a "
            f"CPU the trainers do not hold: this Ray instance has {total:g} CPUs and {name}.num_workers x "
            f"{name}.cpus_per_worker hold {held:g}. Lower those, or set {name}.stream_latents=false (the "
            f"default), which reads the latents before training.")


# How often the Ray Train controller polls its workers (seconds; RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
# Ray's default 2 s). A worker's `ray.train.report` waits until the controller has taken the one
# before it, and the poll also paces the fit's start and its noticing the end: a tiny 8-step,
# 2-worker ldm fit with checkpoints every 3 steps took 34-39 s at 2 s and 28-31 s at 0.5 (2026-12-07).
CONTROLLER_POLL_S = 0.5


def fit(
    train_loop: Callable[[dict], None],
    loop_config: dict,
    *,
    name: str,
    storage_path: str | Path,
    num_workers: int,
    use_gpu: bool,
    datasets: dict | None = None,
    max_failures: int = 0,
    cpus_per_worker: float = 1.0,
    num_to_keep: int | None = None,
    split_datasets: bool = True,
    watchdog=None,
) -> ray.train.Result:
    """Run `train_loop` on `num_workers` Ray Train workers (gloo on CPU, NCCL on GPU).

    `split_datasets=False` gives every worker the datasets whole (the caller has split them itself,
    e.g. one fixed part per rank for a reproducible data order). `watchdog`: a
    `pipeline.training.progress.StallWatchdog` that stops a fit whose steps stop completing, which
    then raises its `TrainingStalled` error.
    """
    # Ray Train hands the driver's setting to the controller; a user's own setting is kept.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_S))
    storage_path = str(storage_path)
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
        ),
        datasets=datasets,
        dataset_config=None if split_datasets else ray.train.DataConfig(datasets_to_split=[]),
    )
    # Ray Data's bars are for the driver's reads. The workers' ingest runs each epoch in the split
    # coordinator, with the context the dataset was made with, and its bars never close: a line of
    # every epoch's bar so far, reprinted until the fit ends (tens of KB per line in a demo ldm run).
    for dataset in (datasets or {}).values():
        dataset.context.enable_progress_bars = False
    if watchdog is None:
        return trainer.fit()
    with watchdog:
        try:
            result = trainer.fit()
        except Exception as error:
            watchdog.raise_if_stalled(error)
            raise
    watchdog.raise_if_stalled()
    return result


class ProgressLine:
    """Prints `name step N/T | loss | img/s | ETA` every `every` steps (rank 0 only)."""

    def __init__(self, name: str, total_steps: int, every: int = 25, start_step: int = 0):
        self.name, self.total, self.every = name, total_steps, every
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.last_time, self.images = self.start_time, 0

    def update(self, step: int, batch_images: int, **values: float) -> dict[str, float]:
        """Record one step; returns {'img_per_s': ...} when a line was printed, else {}."""
        self.images += batch_images
        if step % self.every and step != self.total:
            return {}
        now = time.perf_counter()
        rate = self.images / max(now - self.last_time, 1e-9)
        done = step - self.start_step
        eta = (now - self.start_time) / max(done, 1) * (self.total - step)
        fields = " | ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"[{self.name}] step {step}/{self.total} | {fields} | {rate:.1f} img/s | ETA {eta:.0f}s",
              flush=True)
        self.last_time, self.images = now, 0
        return {"img_per_s": rate}
