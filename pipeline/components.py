"""The first stage and the text encoder as MLflow models of their own, registered and loadable by URI.

The vq and clip stages log their output directory (model.json + model.safetensors, nothing pickled)
as an MLflow "models from code" pyfunc (`pipeline/mlflow_components.py`) and register it as
`<mlflow.registered_model_name>-vq` / `-clip` with the configured alias. Reload with

    vq, meta = load_vq("models:/ldm-pipeline-vq@candidate")
    text = load_text_encoder("models:/ldm-pipeline-clip/3")

(either also takes a local directory), or through pyfunc: `predict` maps a DataFrame column `image`
(base64 PNGs) to base64 PNG reconstructions for the VQ, and a column `caption` to pooled text
embeddings (lists of floats) for the text encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.model_package import resolve_model_uri

KINDS = ("vq", "clip")
# The `pipeline` package: logged models carry it as their code.
PACKAGE_DIR = Path(__file__).resolve().parent
COMPONENT_FILES = ("model.json", "model.safetensors")


def registered_name(base: str, kind: str) -> str:
    return f"{base}-{kind}"


def model_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    """What a logged model declares it needs: the project's pinned dependencies (every one on a
    package index) and those of `extras`, not the project itself, whose code travels inside the
    model (`code_paths`)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        declared = requires("ldm-pipeline") or []
    except PackageNotFoundError:
        raise RuntimeError("the ldm-pipeline package is not installed (pip install -e .): its pinned dependencies "
                           "are what a logged model declares") from None
    kept = []
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras):
            requirement.marker = None
            kept.append(str(requirement))
    return kept


def extras_for(artifacts: dict[str, str]) -> tuple[str, ...]:
    """The project extras a model's files need: `diffusers` for a first stage from diffusers."""
    for path in artifacts.values():
        for meta in (Path(path) / "model.json", Path(path) / "vq" / "model.json"):
            if meta.is_file() and json.loads(meta.read_text()).get("kind") == "diffusers":
                return ("diffusers",)
    return ()


def log_and_register(name: str, python_model: Path, artifacts: dict[str, str], registered_model_name: str,
                     alias: str) -> tuple[str, int]:
    """Log a "models from code" pyfunc in the active MLflow run with the pipeline package as its
    code, register it and point `alias` at the new version; returns (logged model URI, version)."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(python_model), artifacts=artifacts, registered_model_name=registered_model_name,
        pip_requirements=model_requirements(extras_for(artifacts)), code_paths=[str(PACKAGE_DIR)])
    version = int(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(registered_model_name, alias, str(version))
    return info.model_uri, version


def log_component(kind: str, directory: Path, base_name: str, alias: str) -> dict:
    """Log `directory` as a pyfunc model in the active MLflow run, register it, set the alias.

    Returns {"model_uri": "models:/<name>/<version>", "version": int, "run_id": ...} and writes it to
    `directory/registered.json`, so a cached stage still knows its registered version.
    """
    import mlflow

    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {KINDS}")
    name = registered_name(base_name, kind)
    _, version = log_and_register(kind, PACKAGE_DIR / "mlflow_components.py", {kind: str(directory)}, name, alias)
    registered = {"model_uri": f"models:/{name}/{version}", "version": version,
                  "run_id": mlflow.active_run().info.run_id}
    (directory / "registered.json").write_text(json.dumps(registered))
    return registered


def log_package(out: Path, latents_dir: Path, vq_dir: Path, clip_dir: Path, cfg, run_id: str) -> dict:
    """The trained UNet with its first stage and text encoder as one pipeline model (`out/model`),
    logged in the active run and registered as `mlflow.registered_model_name` with the alias; the
    samples stage's sampling settings become the package's defaults. Writes `out/registered.json`."""
    from dataclasses import asdict

    from pipeline.model_package import MLFLOW_ARTIFACT, write_package

    meta = json.loads((latents_dir / "metadata.json").read_text())
    sampling = {"guidance_scale": cfg.samples.guidance_scale, "steps": cfg.samples.steps,
                "sampler": cfg.samples.sampler}
    write_package(out / "model", out, vq_dir, clip_dir, meta, asdict(cfg.ldm.schedule), sampling)
    logged_uri, version = log_and_register("model", PACKAGE_DIR / "mlflow_model.py", {MLFLOW_ARTIFACT: str(out / "model")},
                                           cfg.mlflow.registered_model_name, cfg.mlflow.alias)
    registered = {"model_uri": f"models:/{cfg.mlflow.registered_model_name}/{version}",
                  "logged_model_uri": logged_uri, "run_id": run_id, "version": version}
    (out / "registered.json").write_text(json.dumps(registered))
    return registered


def load_vq(uri: str, tracking_uri: str | None = None):
    """A VQ model from a registered-model URI (models:/..., runs:/...) or a local directory."""
    from pipeline.models.vq import VQModel

    return VQModel.load(resolve_model_uri(uri, tracking_uri, COMPONENT_FILES))


def load_text_encoder(uri: str, tracking_uri: str | None = None):
    """A CLIP text encoder from a registered-model URI (models:/..., runs:/...) or a local directory."""
    from pipeline.models.text import TextEncoder

    return TextEncoder.load(resolve_model_uri(uri, tracking_uri, COMPONENT_FILES))
