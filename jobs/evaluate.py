"""FD and CLIP score of a model per guidance scale, on the held-out split of the configured data.

    python jobs/evaluate.py --model URI [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python jobs/evaluate.py --model models:/ldm-pipeline@production ...

URI: models:/name/version, models:/name@alias, runs:/id/model, or a local model directory. The data
is `data.shards` (empty: the demo's shards, generated under the workdir if not there yet); the
encoder `evaluate.encoder` ('' the model's own CLIP). The same figures as the workflow's evaluate
stage (pipeline/stages/evaluate.py), logged as an MLflow run `evaluate` with its plot and grids.
Prints the metrics as JSON; the last line is the path of the evaluation.json written.
"""

import json
import shutil
import sys
import time
import uuid
from pathlib import Path

from pipeline.cli import job_parser, parse_job_args


def main(argv=None) -> int:
    import mlflow

    from pipeline.evaluation import EncoderSpec
    from pipeline.model_package import resolve_model_uri
    from pipeline.ray_runtime import init_ray
    from pipeline.stages.evaluate import evaluate_model
    from pipeline.tracking import setup_experiment, to_flat_dict
    from pipeline.workflow import Workflow

    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MLflow model URI or local model directory")
    cfg = parse_job_args("", argv, parser)
    model = parser.parse_intermixed_args(argv).model
    workdir = Path(cfg.workdir).resolve()
    out = workdir / "evaluate-job" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out.mkdir(parents=True)
    try:  # onto the workdir, which every node mounts: the generation tasks read it there
        package = resolve_model_uri(model, cfg.tracking_uri, dst_path=str(out / "model"))
    except Exception as err:  # noqa: BLE001 - a missing directory, MLflow's errors for an unknown model or version
        shutil.rmtree(out, ignore_errors=True)
        print(f"error: --model {model}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    try:
        spec = EncoderSpec.parse(cfg.evaluate.encoder, package / "text_encoder")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray(cfg.ray_address)
    workflow = Workflow(cfg, until="shards")  # lists (or, for the demo, generates) the shards
    if not cfg.data.shards:
        workflow.run()
    else:
        from pipeline.data.locate import resolve_shards

        workflow.found_shards(resolve_shards(cfg.data.shards))
    setup_experiment(cfg.tracking_uri, cfg.mlflow.experiment_name, workdir)
    with mlflow.start_run(run_name="evaluate"):
        mlflow.set_tags({"stage": "evaluate", "model": model})
        mlflow.log_params({f"evaluate.{k}": v for k, v in to_flat_dict(cfg.evaluate).items()})
        metrics = evaluate_model(cfg, str(package), spec, workflow.shards, workflow.listing, out)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    print(json.dumps({"model": model, "metrics": metrics}, indent=2))
    print(out / "evaluation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
