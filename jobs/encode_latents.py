"""Encode the shards into the Parquet latent dataset with Ray Data (and the stages before it, cached).

    python jobs/encode_latents.py [--config FILE] [key=value ...]

Prints the stage's status and metrics, then its output directory.
"""

from pipeline.cli import run_until

if __name__ == "__main__":
    run_until("encode", __doc__.splitlines()[0])
