"""Command-line parsing shared by the jobs: `--config FILE` plus dotted `key=value` overrides.

Every job validates its whole config here, before any work starts; a bad key or value exits with
status 2 and a message naming the key.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, PipelineConfig, load_config


def job_parser(description: str) -> argparse.ArgumentParser:
    """`[--config FILE] [--force-promote] [key=value ...]`; jobs add their own options to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: jobs/configs/demo.yaml)")
    parser.add_argument("--force-promote", action="store_true",
                        help="the new model version takes promote.alias whatever its evaluation says (promote.force)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_job_args(description: str, argv: list[str] | None = None,
                   parser: argparse.ArgumentParser | None = None) -> PipelineConfig:
    """Parse `[--config FILE] [--force-promote] [key=value ...]` into a validated PipelineConfig (or exit 2);
    `parser`: `job_parser`'s with the job's own options (read them with `parser.parse_intermixed_args`)."""
    parser = parser or job_parser(description)
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides) + (["promote.force=true"] if args.force_promote else [])
    try:
        return load_config(args.config, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_until(stage: str, description: str) -> None:
    """Entry point of the per-stage jobs: run the workflow up to `stage` and print its output."""
    import json

    from pipeline.workflow import Workflow

    cfg = parse_job_args(description)
    result = Workflow(cfg, until=stage).run()
    print(json.dumps(result["stages"][stage], indent=2))
    print(result["output"])
