"""Command-line parsing shared by the jobs: `--config FILE` plus dotted `key=value` overrides.

Every job validates its whole config here, before any work starts; a bad key or value exits with
status 2 and a message naming the key.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, PipelineConfig, load_config


def parse_job_args(description: str, argv: list[str] | None = None) -> PipelineConfig:
    """Parse `[--config FILE] [key=value ...]` into a validated PipelineConfig (or exit 2)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: jobs/configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
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
