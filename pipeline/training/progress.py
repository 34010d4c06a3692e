"""Watching a training run from the driver: how often its worker group started, and no silent hang.

Rank 0 tells a small actor (`TrainingProgress`, pinned to the driver's node, so it outlives any
worker node) when the worker group starts and when a step completes. The driver reads it:

- after the fit, for the number of restarts and the world sizes the run had;
- during the fit, in `StallWatchdog`: when no step has completed for the stage's stall timeout,
  the run is stopped and fails with an error that names what Ray is waiting for (its pending
  resource demands) and the config keys that would free them, instead of waiting forever.
"""

from __future__ import annotations

import threading
import time

import ray

# Rank 0 reports a completed step at most this often (an actor call costs ~0.1 ms).
REPORT_EVERY_S = 1.0
# The driver checks the progress this often.
POLL_S = 2.0


class TrainingProgress:
    """Starts and completed steps of one fit, reported by rank 0 (a Ray actor; see `progress_board`)."""

    def __init__(self):
        self.starts: list[dict] = []
        self.step: int | None = None
        self.last = time.monotonic()

    def started(self, world_size: int, step: int, node_id: str, setup_s: float = 0.0) -> None:
        """The worker group started (or restarted), set up in `setup_s` and resumed at `step`."""
        self.starts.append({"world_size": world_size, "step": step, "node_id": node_id, "time": time.time(),
                            "setup_s": setup_s})
        self.last = time.monotonic()

    def stepped(self, step: int) -> None:
        self.step = step
        self.last = time.monotonic()

    def snapshot(self) -> dict:
        return {"starts": list(self.starts), "step": self.step, "idle_s": time.monotonic() - self.last}


def progress_board():
    """A `TrainingProgress` actor on the driver's node (which outlives the worker nodes), holding no CPU."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(num_cpus=0)(TrainingProgress).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


class StepReporter:
    """Rank 0's side: report starts at once and completed steps at most every REPORT_EVERY_S."""

    def __init__(self, board):
        self.board = board
        self.sent = 0.0

    def started(self, world_size: int, step: int, setup_s: float = 0.0) -> None:
        if self.board is not None:
            ray.get(self.board.started.remote(world_size, step, ray.get_runtime_context().get_node_id(), setup_s))

    def stepped(self, step: int) -> None:
        now = time.monotonic()
        if self.board is not None and now - self.sent >= REPORT_EVERY_S:
            self.board.stepped.remote(step)  # fire and forget
            self.sent = now


class TrainingStalled(RuntimeError):
    """No training step completed within the stall timeout; the message says what Ray waits for."""


def _resources(bundle: dict) -> str:
    shown = {k: v for k, v in bundle.items() if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def _waiting_placement_groups() -> list[str]:
    """Placement groups the GCS has not placed yet, from its own table: the autoscaler's demand
    report lags behind it (seconds, longer on a loaded machine)."""
    from collections import Counter

    parts = []
    for info in ray.util.placement_group_table().values():
        if info.get("state") in ("PENDING", "RESCHEDULING"):
            counts = Counter(_resources(b) for b in info.get("bundles", {}).values())
            parts.append(f"a placement group of {' + '.join(f'{n} x {b}' for b, n in counts.items())} ({info['state']})")
    return parts


def _demands() -> list[str]:
    from ray.autoscaler.v2.sdk import get_cluster_status

    parts = []
    try:
        demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
        for demand in demands.ray_task_actor_demand:
            parts += [f"{b.count} task(s)/actor(s) needing {_resources(b.bundle)}" for b in demand.bundles_by_count]
        groups = [f"a placement group of {' + '.join(f'{b.count} x {_resources(b.bundle)}' for b in g.bundles_by_count)}"
                  f" ({g.state or 'pending'})" for g in demands.placement_group_demand]
        parts += groups or _waiting_placement_groups()
    except Exception as error:  # noqa: BLE001 - the diagnosis must not hide the stall itself
        parts.append(f"(the demands could not be read: {type(error).__name__}: {error})")
    return parts


def pending_demands(settle_s: float = 10.0) -> str:
    """Ray's pending resource demands (tasks, actors, placement groups) and the free resources, in
    words. Nothing pending yet is asked again for up to `settle_s` (a request on its way)."""
    deadline = time.monotonic() + settle_s
    parts = _demands()
    while not parts and time.monotonic() < deadline:
        time.sleep(1.0)
        parts = _demands()
    try:  # task names need the state API (the dashboard); a local instance has none
        from ray.util.state import list_tasks

        names = sorted({t.name for t in list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], limit=50,
                                                   timeout=10)})
        if names:
            parts.append(f"pending tasks: {', '.join(names)}")
    except Exception:  # noqa: BLE001
        pass
    free, total = ray.available_resources(), ray.cluster_resources()
    have = ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if total.get(k))
    return f"{'; '.join(parts) or 'nothing Ray reports as pending'}; free now: {have or 'no CPU or GPU at all'}"


def _kill_train_controllers() -> None:
    """Stop this job's Ray Train run: kill its controller, which owns the worker group."""
    from ray._private.state import actors
    from ray._raylet import ActorID

    job = ray.get_runtime_context().get_job_id()
    core = ray._private.worker.global_worker.core_worker
    for actor_id, info in actors().items():
        if (info.get("ActorClassName") == "TrainController" and info.get("State") != "DEAD"
                and info.get("JobID") == job):
            core.kill_actor(ActorID.from_hex(actor_id), True)


class StallWatchdog:
    """During a fit: stop it when no step completes for `timeout_s` (0: never), naming the wait.

    Use as a context manager around the fit; afterwards `error` holds the message if it tripped
    (the fit then raised because its controller was stopped), and `raise_if_stalled()` raises it.
    """

    def __init__(self, board, timeout_s: float, hint: str):
        self.board, self.timeout_s, self.hint = board, timeout_s, hint
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._groups_before: set[str] = set()

    def __enter__(self) -> "StallWatchdog":
        if self.timeout_s > 0 and self.board is not None:
            self._groups_before = set(ray.util.placement_group_table())
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                snap = ray.get(self.board.snapshot.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a slow answer is not a stall of the training
                continue
            if snap["idle_s"] < self.timeout_s:
                continue
            where = (f"after step {snap['step']}" if snap["step"] is not None
                     else "before the first step" + (" after a restart" if len(snap["starts"]) > 1 else ""))
            self.error = (f"no training step completed for {snap['idle_s']:.0f} s ({where}). Ray is waiting for: "
                          f"{pending_demands()}. {self.hint}")
            print(f"[watchdog] {self.error}", flush=True)
            _kill_train_controllers()
            self._remove_new_placement_groups()
            return

    def _remove_new_placement_groups(self) -> None:
        """Ray Train's placement-group cleaner needs the state API, which a local instance started
        without the dashboard lacks: there the stopped run's groups are removed here (the instance
        is this job's alone). On a cluster the cleaner does it."""
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup

        if ray._private.worker.get_dashboard_url():
            return
        for group_id, info in ray.util.placement_group_table().items():
            if group_id not in self._groups_before and info["state"] != "REMOVED":
                ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group_id)))

    def raise_if_stalled(self, cause: BaseException | None = None) -> None:
        if self.error:
            raise TrainingStalled(self.error) from cause
