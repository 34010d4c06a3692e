"""Train (or load) the CLIP text encoder (and the stages before it, cached).

    python jobs/train_clip.py [--config FILE] [key=value ...]

Prints the stage's status and metrics, then its output directory.
"""

from pipeline.cli import run_until

if __name__ == "__main__":
    run_until("clip", __doc__.splitlines()[0])
