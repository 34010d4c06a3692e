"""Sweeps with Ray Tune (`jobs/sweep.py`): trials that differ in the config keys of `sweep.space`.

The stages every trial shares (vq, clip, encode: those that do not read a swept key) run once, in
the sweep's MLflow run, and every trial finds them in the stage cache. Each trial is a workflow up
to its evaluate stage (no samples): its own ldm, whose checkpoints are evaluated during training
(`evaluate.every`), and those in-training figures are what Tune's ASHA scheduler stops poor trials
on. Every trial is a workflow run, a child of the sweep's run, with its params (the values it drew
among them) and its stages' headline figures, so the MLflow UI compares them side by side. The best
finished trial (by its evaluate stage's figure) then runs the rest of the workflow, samples and
promotion, as the sweep run's last child; `<workdir>/sweeps/<name>/summary.json` has every trial.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import yaml

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.workflow import STAGES, Workflow

# A trial's workflow polls its ldm run for new in-training figures this often.
POLL_S = 5.0
MAX_EVALUATIONS = 100
"""ASHA's bound on a trial's in-training evaluations where its budget is not known before it runs."""
# Keys a trial cannot vary: where things run and are recorded, and the sweep itself.
NOT_SWEPT = ("workdir", "ray_address", "mlflow", "sweep", "serve")


def _distribution(path: str, value):
    from ray import tune

    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"sweep.space.{path} is an empty list")
        return tune.grid_search(list(value))
    match = re.fullmatch(r"\s*(loguniform|uniform|randint|choice)\s*\((.*)\)\s*", str(value))
    if not match:
        raise ConfigError(f"sweep.space.{path}: {value!r} is neither a list nor one of loguniform(a, b), "
                          f"uniform(a, b), randint(a, b), choice(a, b, ...)")
    kind, args = match.group(1), [_scalar(a) for a in match.group(2).split(",")]
    if kind == "choice":
        return tune.choice(args)
    if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
        raise ConfigError(f"sweep.space.{path}: {kind} takes two numbers a < b, got {value!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"sweep.space.{path}: loguniform needs a > 0, got {value!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"sweep.space.{path}: randint takes two integers, got {value!r}")
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*args)


def _scalar(text: str):
    """`1e-4` is a number here (YAML 1.1 would read a string), anything else as YAML reads it."""
    for number in (int, float):
        try:
            return number(text.strip())
        except ValueError:
            pass
    return yaml.safe_load(text)


def flat_space(space: dict, prefix: str = "") -> dict:
    """`sweep.space` (nested, or with dotted keys) as {dotted config key: its values as given}."""
    flat = {}
    for key, value in space.items():
        if isinstance(value, dict):
            flat.update(flat_space(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_override(path: str, value) -> str:
    return f"{path}={value if isinstance(value, str) else json.dumps(value)}"


@dataclass
class SweepPlan:
    """What every trial needs: how to build its config, where to record it."""

    config_file: str
    overrides: list[str]
    sweep_run_id: str
    metric: str
    mode: str

    def trial_config(self, params: dict) -> PipelineConfig:
        return load_config(self.config_file, self.overrides + [as_override(k, v) for k, v in params.items()])


def parse_space(cfg: PipelineConfig, plan_file: str, overrides: list[str]) -> dict:
    """{dotted key: Tune domain}; every key checked to be a config key a trial may vary, with a value
    the config accepts (its first or lowest), so a typo fails before any stage runs."""
    flat = flat_space(cfg.sweep.space)
    if not flat:
        raise ConfigError("sweep.space is empty: give the config keys to vary, e.g. "
                          "sweep.space.ldm.lr='loguniform(1e-4, 3e-3)'")
    space = {}
    for path, value in flat.items():
        if path.split(".")[0] in NOT_SWEPT:
            raise ConfigError(f"sweep.space.{path}: {path.split('.')[0]} is not something a trial can vary")
        domain = space[path] = _distribution(path, value)
        example = (domain["grid_search"][0] if isinstance(domain, dict) else
                   domain.categories[0] if hasattr(domain, "categories") else domain.lower)
        try:
            load_config(plan_file, overrides + [as_override(path, example)])
        except ConfigError as err:
            raise ConfigError(f"sweep.space.{path}: {err}") from None
    return space


def shared_until(cfg: PipelineConfig, swept: list[str]) -> str | None:
    """The last stage before the first one whose key holds a swept key: what runs once for all trials.
    A swept field a stage reads only through a derived value (vq: whether `ldm.epochs` is a short
    budget) does not end the sharing: a trial whose value moves that stage's key runs it itself."""
    last = None
    for stage in STAGES:
        if any(key == read or key.startswith(read + ".") for key in swept for read in stage.reads
               if read not in stage.layout):
            return last
        if stage.name == "ldm":
            return last
        if stage.only_if(cfg):
            last = stage.name
    return last


@ray.remote(num_cpus=0, max_concurrency=2)
class TrialWorkflow:
    """One trial's workflow, up to its evaluate stage, in an actor outside the trial's placement
    group (which holds no CPU: the stages' tasks and trainers take their own resources)."""

    def __init__(self, plan: SweepPlan, params: dict, run_name: str):
        self.workflow = Workflow(plan.trial_config(params), until="evaluate", skip=("samples",),
                                 parent_run_id=plan.sweep_run_id, run_name=run_name)

    def run(self) -> dict:
        return self.workflow.run()

    def ldm_progress(self, kind: str) -> tuple[str, str, list[int]] | None:
        """(the ldm stage's MLflow run, the name of its in-training `kind` metric, the steps it
        evaluates at) once it began."""
        from pipeline.stages.evaluate import metric_name, promotion_scale

        w = self.workflow
        if "ldm" not in w.stage_runs:
            return None
        spec = w.encoder_spec()
        return (w.stage_runs["ldm"], metric_name(kind, spec.fd_name if kind == "fd" else spec.score_name,
                                                 promotion_scale(w.cfg)),
                evaluation_steps(w.cfg))  # its budget resolved from the data (pipeline.recipe)


def run_trial(params: dict, plan: SweepPlan) -> None:
    """The Tune trainable: runs the trial's workflow and reports each in-training evaluation as it
    appears in the ldm run (ASHA's input), then the evaluate stage's figure."""
    from mlflow import MlflowClient
    from ray import tune

    context = tune.get_context()
    name = f"trial-{context.get_trial_id()}"
    expected: list[int] = []
    runner = TrialWorkflow.options(scheduling_strategy="DEFAULT").remote(plan, params, name)
    done = runner.run.remote()
    client, values, reported, last = None, {}, [], None

    def report(step: int) -> None:
        nonlocal last
        reported.append(step)
        last = values[step]
        tune.report({plan.metric: values[step], "step": step})

    while True:
        finished = bool(ray.wait([done], timeout=POLL_S)[0])
        progress = ray.get(runner.ldm_progress.remote(plan.metric))
        if progress:
            run_id, metric, expected = progress
            client = client or MlflowClient(plan_tracking_uri(plan, params))
            values.update({point.step: point.value for point in client.get_metric_history(run_id, metric)})
        # In step order: evaluations may finish out of order (several at once after training, on a
        # machine without spare CPUs), and ASHA's rungs count reports.
        while len(reported) < len(expected) and expected[len(reported)] in values:
            report(expected[len(reported)])
        if finished:
            for step in sorted(set(values) - set(reported)):  # a lost evaluation's successors
                report(step)
            break
    result = ray.get(done)  # the workflow's error, if it failed, fails the trial
    evaluate = result["stages"]["evaluate"]["metrics"]
    _, metric, _ = ray.get(runner.ldm_progress.remote(plan.metric))
    final = evaluate[metric]
    tune.report({plan.metric: last if last is not None else final, f"final_{plan.metric}": final,
                 "step": result["stages"]["ldm"]["metrics"].get("steps", 0),
                 "workflow_run_id": result["mlflow_run_id"],
                 "model_version": result["stages"]["ldm"]["metrics"]["model_version"]})


def plan_tracking_uri(plan: SweepPlan, params: dict) -> str:
    return plan.trial_config(params).tracking_uri


def evaluation_steps(cfg: PipelineConfig) -> list[int]:
    """The steps whose checkpoints are evaluated during training: every `evaluate.every`-th
    checkpoint and the last (as the ldm loop decides)."""
    from pipeline.training.checkpoint_eval import evaluated_at

    c, last = cfg.ldm.checkpoint_every, cfg.ldm.max_steps
    return [step for step in [*range(c, last, c), last] if evaluated_at(step, c, cfg.evaluate.every, last)]


def evaluations_per_trial(cfg: PipelineConfig) -> int:
    """ASHA's rungs: the evaluations of a trial whose ldm budget is known, else a bound (the budget
    comes from the data, and a trial's encode stage is its own when the sweep varies it)."""
    return len(evaluation_steps(cfg)) if cfg.ldm.max_steps else MAX_EVALUATIONS


def close_stopped_runs(tracking_uri: str, sweep_run_id: str) -> list[str]:
    """The MLflow runs of trials that ASHA stopped (their processes ended mid-run) as KILLED, each
    ended at the last metric it logged, so that its span in the MLflow UI is the time it ran."""
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_run(sweep_run_id).info.experiment_id
    killed, parents = [], [sweep_run_id]
    while parents:
        parent = parents.pop()
        for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'"):
            parents.append(run.info.run_id)
            if run.info.status == "RUNNING":
                last = max((m.timestamp for key in run.data.metrics
                            for m in client.get_metric_history(run.info.run_id, key)),
                           default=run.info.start_time)
                client.set_terminated(run.info.run_id, "KILLED", end_time=last)
                killed.append(run.info.run_id)
    return killed


def run_sweep(config_file: str | None, overrides: list[str]) -> Path:
    """The sweep; returns the path of its summary.json."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipeline.config import DEFAULT_CONFIG
    from pipeline.ray_runtime import init_ray
    from pipeline.tracking import setup_experiment

    config_file = str(Path(config_file or DEFAULT_CONFIG).resolve())
    cfg = load_config(config_file, overrides)
    workdir = Path(cfg.workdir).resolve()
    overrides = [*overrides, f"workdir={workdir}"]  # trials start in Tune's trial directories
    space = parse_space(cfg, config_file, overrides)
    s = cfg.sweep
    until = shared_until(cfg, list(space))
    name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray_address)
    setup_experiment(cfg.tracking_uri, cfg.mlflow.experiment_name, workdir)
    start = time.perf_counter()
    with mlflow.start_run(run_name=name) as sweep:
        mlflow.log_params({**{f"sweep.space.{k}": str(v) for k, v in flat_space(s.space).items()},
                           "sweep.num_samples": s.num_samples, "sweep.metric": s.metric,
                           "sweep.shared_stages_until": until or ""})
        cfg_for_rungs = cfg
        if until:  # once, here: every trial then finds them in the cache
            print(f"[sweep] the stages every trial shares, up to {until}", flush=True)
            shared = Workflow(cfg, until=until, parent_run_id=sweep.info.run_id, run_name="shared stages")
            shared.run()
            cfg_for_rungs = shared.cfg  # with the ldm's budget resolved, once encode is shared
        plan = SweepPlan(config_file, overrides, sweep.info.run_id, s.metric, s.mode)
        evaluations = evaluations_per_trial(cfg_for_rungs)
        print(f"[sweep] {s.num_samples} trials over {sorted(space)}, {s.max_concurrent} at a time; ASHA on the "
              f"in-training {s.metric} ({evaluations} evaluations per trial)", flush=True)
        tuner = tune.Tuner(
            # A trial only coordinates: its stages' tasks and trainers hold the CPUs and GPUs.
            tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"memory": 256 * 1024 ** 2}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                # The limit goes to the generator itself: Tune applies `max_concurrent_trials` only
                # to a `Searcher`, and silently runs every variant of this one at once.
                search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=evaluations + 1,
                                        grace_period=min(s.grace_evaluations, evaluations),
                                        reduction_factor=s.reduction_factor)),
            run_config=tune.RunConfig(name=name, storage_path=str(workdir / "sweeps"), verbose=1))
        grid = tuner.fit()
        killed = close_stopped_runs(cfg.tracking_uri, sweep.info.run_id)
        trials = [trial_record(result, s.metric, list(space)) for result in grid]
        finished = [t for t in trials if t[f"final_{s.metric}"] is not None]
        summary = {"name": name, "metric": s.metric, "mode": s.mode, "space": flat_space(s.space),
                   "shared_stages_until": until, "trials": trials, "stopped_runs_closed": len(killed),
                   "mlflow_run_id": sweep.info.run_id, "tracking_uri": cfg.tracking_uri}
        if finished:
            best = (min if s.mode == "min" else max)(finished, key=lambda t: t[f"final_{s.metric}"])
            print(f"[sweep] best trial {best['trial_id']}: {best['params']} with {s.metric} "
                  f"{best[f'final_{s.metric}']:.4g}; its samples and promotion", flush=True)
            mlflow.log_metric(f"best_{s.metric}", best[f"final_{s.metric}"])
            mlflow.set_tags({"sweep.best_trial": best["trial_id"], "sweep.best_params": json.dumps(best["params"])})
            best_cfg = plan.trial_config(best["params"])
            # Every trial registered its ldm version; the best takes the new-version alias (candidate),
            # and its workflow's promote stage decides on production as after any run.
            mlflow.MlflowClient(cfg.tracking_uri).set_registered_model_alias(
                cfg.mlflow.registered_model_name, cfg.mlflow.alias, str(best["model_version"]))
            whole = Workflow(best_cfg, parent_run_id=sweep.info.run_id, run_name=f"best {best['trial_id']}").run()
            summary.update(best=best, best_model_uri=whole["model_uri"], promotion=whole["promotion"],
                           best_summary=str(workdir / "summary.json"))
        else:
            summary["best"] = None
            print(f"[sweep] no trial finished: see {workdir / 'sweeps' / name}", flush=True)
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        mlflow.log_metric("sweep_seconds", summary["wall_s"])
        mlflow.log_dict(summary, "sweep_summary.json")
    path = workdir / "sweeps" / name / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    if summary["best"] is None:
        raise RuntimeError(f"sweep {name}: no trial finished; their errors are in {path.parent}")
    return path


def trial_record(result, metric: str, swept: list[str]) -> dict:
    """What summary.json says of one trial: its values, figures and how it ended."""
    import pandas as pd

    metrics, history = result.metrics or {}, result.metrics_dataframe
    curve = []
    if history is not None and metric in history:  # the in-training reports: those without the final figure
        final_column = history.get(f"final_{metric}", pd.Series(float("nan"), index=history.index))
        curve = [{"step": int(row["step"]), metric: float(row[metric])}
                 for (_, row), final in zip(history.iterrows(), final_column) if pd.isna(final)]
    final = metrics.get(f"final_{metric}")
    return {"trial_id": metrics.get("trial_id") or Path(result.path).name,
            "params": {k: result.config[k] for k in swept},
            "status": "error" if result.error else ("finished" if final is not None else "stopped by ASHA"),
            "error": str(result.error).splitlines()[0] if result.error else None,
            f"final_{metric}": final, "in_training": curve, "evaluations_reported": len(curve),
            "workflow_run_id": metrics.get("workflow_run_id"), "model_version": metrics.get("model_version")}

