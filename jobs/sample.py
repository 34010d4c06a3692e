"""Guided sampling as a batch job, through the Ray Serve app (started locally if none is running).

    python jobs/sample.py --model URI (--prompts FILE | --prompt TEXT ...) --out DIR
        [--guidance-scale 3.0] [--steps N] [--sampler ddpm|ddim|dpmpp_2m] [--seed 0] [--num-per-prompt 1]
        [--width W --height H] [--config FILE] [key=value ...]

--width/--height: one of the model's sizes (its aspect-ratio buckets; another is an error listing them).

`key=value` overrides (serve.num_gpus=1, serve.port=8001, ray_address=..., mlflow.tracking_uri=...)
apply to the config as in every job; a bad key is an error naming it.

URI: models:/name/version, models:/name@alias, runs:/id/model, or a local model directory.
Writes DIR/00000.png ..., DIR/grid.png and DIR/manifest.jsonl.
"""

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, SamplingDefaults, load_config
from pipeline.data.buckets import size_name
from pipeline.sample_client import ensure_app, generate_to_dir, health


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MLflow model URI or local model directory")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompts", help="file with one prompt per line")
    group.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-per-prompt", type=int, default=1)
    parser.add_argument("--width", type=int, default=None, help="image width (with --height): one of the model's sizes")
    parser.add_argument("--height", type=int, default=None, help="image height (with --width)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for models:/ and runs:/ URIs (default: MLFLOW_TRACKING_URI, "
                             "else the config's)")
    parser.add_argument("--config", default=None, help="config for serve.* and mlflow.* (default: demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may sit between the options
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            print(f"error: prompts file not found: {path}", file=sys.stderr)
            return 2
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = args.prompt
    if not prompts:
        print("error: no prompts given", file=sys.stderr)
        return 2
    if args.num_per_prompt < 1:
        print("error: --num-per-prompt must be >= 1", file=sys.stderr)
        return 2
    if (args.width is None) != (args.height is None):
        print("error: --width and --height go together", file=sys.stderr)
        return 2
    size = (args.width, args.height) if args.width is not None else None
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    host, port = cfg.serve.host, cfg.serve.port
    base_url = f"http://{host}:{port}"
    started = ensure_app(args.model, tracking_uri, cfg.serve, cfg.ray_address)
    try:
        info = health(base_url) or {}
        defaults = SamplingDefaults.of(info.get("defaults"))
        if size and "sizes" in info and size_name(size) not in info["sizes"]:
            print(f"error: --width {size[0]} --height {size[1]}: the model samples at {', '.join(info['sizes'])} "
                  f"(width x height)", file=sys.stderr)
            return 2
        records = generate_to_dir(
            prompts, args.out, base_url=base_url,
            guidance_scale=args.guidance_scale if args.guidance_scale is not None else defaults["guidance_scale"],
            steps=args.steps if args.steps is not None else defaults["steps"],
            sampler=args.sampler or defaults["sampler"],
            seed=args.seed, num_per_prompt=args.num_per_prompt, concurrency=cfg.serve.max_batch_size, size=size,
        )
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if started:
            from ray import serve

            serve.shutdown()
    print(f"wrote {len(records)} images, grid.png and manifest.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
