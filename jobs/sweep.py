"""A hyper-parameter sweep with Ray Tune over the keys of the config's `sweep.space`.

    python jobs/sweep.py --config jobs/configs/sweep-demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/sweep.py --config FILE sweep.num_samples=8

The stages the trials share run once; each trial trains and evaluates its own ldm; ASHA stops the
poor ones on their in-training FD (or CLIP score, `sweep.metric`); the best finished trial is
sampled and goes through promotion. Every trial is an MLflow run under the sweep's run. The last
line printed is the path of the sweep's summary.json.
"""

import sys

from pipeline.cli import job_parser
from pipeline.config import ConfigError
from pipeline.sweep import run_sweep

if __name__ == "__main__":
    args = job_parser(__doc__.splitlines()[0]).parse_intermixed_args()
    try:
        path = run_sweep(args.config, list(args.overrides) + (["promote.force=true"] if args.force_promote else []))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)
