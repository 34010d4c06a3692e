"""The main job: the whole workflow (shards -> vq -> clip -> encode -> ldm -> samples).

    python jobs/train_ldm.py [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python jobs/train_ldm.py --config jobs/configs/cluster.yaml

With no arguments it runs the embedded demo. The last line printed is the path of summary.json.
"""

from pipeline.cli import parse_job_args
from pipeline.workflow import run_workflow

if __name__ == "__main__":
    config = parse_job_args(__doc__.splitlines()[0])
    print(run_workflow(config))
