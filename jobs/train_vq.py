"""Train (or load) the VQ-VAE first stage (and the stages before it, cached).

    python jobs/train_vq.py [--config FILE] [key=value ...]

Prints the stage's status and metrics, then its output directory.
"""

from pipeline.cli import run_until

if __name__ == "__main__":
    run_until("vq", __doc__.splitlines()[0])
