"""The promote stage: the newly registered version takes `promote.alias` (production) only when its
FD beats the current holder's, on the same held-out prompts, seeds, sampling steps and encoder.

The candidate's figure is the evaluate stage's; the current production version is sampled here at
the same guidance scale (`promote.guidance_scale`, default samples.guidance_scale) and scored
against the same cached held-out features. No holder yet: the candidate takes it.
`promote.force` (`--force-promote`) promotes whatever the figures say. The decision, both figures
and the reason are the stage's metrics (summary.json) and tags on its MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.evaluation import EncoderSpec, fd_of
from pipeline.stages.evaluate import FEATURES_FILE, generate_at_scales, metric_name, promotion_scale


def current_holder(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:  # no version holds the alias (or the model has none)
        return None


def run_promote(cfg: PipelineConfig, candidate: int, evaluation_dir: Path, spec: EncoderSpec, out: Path) -> dict:
    import mlflow
    from safetensors.numpy import load_file

    name, alias, scale = cfg.mlflow.registered_model_name, cfg.promote.alias, promotion_scale(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    evaluation = json.loads((evaluation_dir / "evaluation.json").read_text())
    fd_name = metric_name("fd", evaluation["encoder"], scale)
    candidate_fd = evaluation["metrics"][fd_name]
    holder = current_holder(client, name, alias)
    figures: dict = {"candidate_version": candidate, "previous_version": holder or 0, "candidate_fd": candidate_fd,
                     "fd_metric": fd_name}
    if holder == candidate:
        promote, reason = True, f"version {candidate} already holds {alias!r}"
    elif holder is None:
        promote, reason = True, f"no version held {alias!r}"
    else:
        real = load_file(str(Path(evaluation["heldout_features"]) / FEATURES_FILE))["features"]
        captions = [json.loads(line)["caption"] for line in (evaluation_dir / "prompts.jsonl").read_text().splitlines()]
        held = generate_at_scales(cfg, f"models:/{name}/{holder}", spec, captions, [scale],
                                  steps=evaluation["steps"], sampler=evaluation["sampler"])[0]
        figures["production_fd"] = production_fd = fd_of(held["features"], real)
        promote = candidate_fd < production_fd
        reason = (f"{fd_name} of version {candidate} is {candidate_fd:.4g}, version {holder}'s (holding {alias!r}) "
                  f"{production_fd:.4g}, on the same {len(captions)} prompts and seeds: "
                  + ("better, so it takes the alias" if promote else "not better, so the alias stays"))
    if cfg.promote.force and not promote:
        promote, reason = True, f"forced (promote.force / --force-promote); {reason}"
    if promote and holder != candidate:
        client.set_registered_model_alias(name, alias, str(candidate))
    decision = "promoted" if promote else "kept"
    print(f"[promote] {decision}: {reason}", flush=True)
    mlflow.set_tags({"promote.decision": decision, "promote.reason": reason})
    record = {**figures, "promoted": int(promote), "decision": decision, "reason": reason,
              "version": candidate if promote else holder}
    (out / "decision.json").write_text(json.dumps(record, indent=2))
    return record
