"""The encode stage (Ray Data) against a bare single-process loop doing the same work, in one run.

    python jobs/benchmark.py encode [--samples 4000] [--shard-size 500] [key=value ...]
    python jobs/benchmark.py encode --shards "s3://bucket/shards/{00000..00003}.tar" [key=value ...]

Both sides read the same demo shards (written into a temporary directory) with untrained encoders
built from the config (VQ + tiny CLIP; the weights do not change the cost).

- Ray: the whole stage, `run_encode`, with Ray started and Ray Data used once (its helper actors
  up, as after the workflow's earlier stages): Ray Data read tasks decode the shards, the FrozenEncoders actor pool encodes, Parquet is written. The encoder actor starts cold
  (a new process importing torch, open_clip, ... and loading the models), as in every real run.
- Bare loop: a new Python process that imports the same code, parses the shards with the same
  decoder (`parse_shard`) and calls the same `FrozenEncoders` on batches of `encode.batch_size`,
  writing nothing. Timed from its start (so it pays the same start-up as the Ray actor);
  `bare_loop_warm_samples_per_s` is its loop alone, after imports and model loading.

`ratio_vs_bare_loop` is the Ray stage's samples/s over the bare loop's (cold start both sides);
`ratio_vs_warm_bare_loop` the same against the loop alone.

With `--shards URL` (an object store: credentials and endpoint from the environment, e.g.
`python -m pipeline.localservices up`) the stage runs on those shards and on local copies of the
same bytes, one after the other: `ratio_s3_vs_local` is the remote run's samples/s over the local's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bare_loop(shards: list[str], vq_dir: str, clip_dir: str, image_size: int, batch_size: int,
              max_pixels: int) -> dict:
    """Decode + VQ encode + text encode in this process; {samples, seconds} of the loop after loading."""
    import numpy as np

    from pipeline.data.reader import new_counts, parse_shard
    from pipeline.stages.encode import FrozenEncoders

    start = time.perf_counter()
    encoders = FrozenEncoders(vq_dir, clip_dir)
    loaded = time.perf_counter()
    samples = 0
    batch: dict[str, list] = {"key": [], "caption": [], "image": []}

    def flush() -> int:
        if not batch["key"]:
            return 0
        out = encoders({"key": np.array(batch["key"], dtype=object),
                        "caption": np.array(batch["caption"], dtype=object),
                        "image": np.stack(batch["image"])})
        for column in batch.values():
            column.clear()
        return len(out["latent"])

    for shard in shards:
        counts = new_counts()
        with open(shard, "rb") as stream:
            for key, caption, image, _ in parse_shard(stream, image_size, counts, max_pixels):
                batch["key"].append(key)
                batch["caption"].append(caption)
                batch["image"].append(image)
                if len(batch["key"]) >= batch_size:
                    samples += flush()
    samples += flush()
    end = time.perf_counter()
    return {"samples": samples, "load_seconds": loaded - start, "loop_seconds": end - loaded}


def _bare_loop_process(cfg, shards: list[str], vq_dir: Path, clip_dir: Path) -> tuple[dict, float]:
    """Run `bare_loop` in a new Python process; (its result, wall seconds from spawn to exit)."""
    spec = json.dumps({"shards": shards, "vq_dir": str(vq_dir), "clip_dir": str(clip_dir),
                       "image_size": cfg.data.image_size, "batch_size": cfg.encode.batch_size,
                       "max_pixels": cfg.data.max_image_pixels})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.benchmarks.encode", spec], check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def download(urls: list[str], directory: Path) -> list[str]:
    """Local copies of remote shards (the same bytes), in order."""
    import pyarrow.fs

    directory.mkdir(parents=True)
    local = []
    for i, url in enumerate(urls):
        filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
        target = directory / f"{i:05d}.tar"
        with filesystem.open_input_stream(path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        local.append(str(target))
    return local


def compare_remote(cfg, remote: list[str], local: list[str], vq_dir: Path, clip_dir: Path, root: Path,
                   rounds: int = 2) -> dict:
    """The encode stage on remote shards and on local copies of them: samples/s and their ratio."""
    from pipeline.stages.encode import run_encode

    runs: dict[str, list[tuple[int, float]]] = {"s3": [], "local": []}
    for round_ in range(rounds):  # alternated, the faster of each side: neither pays the first cold start alone
        for name, shards in (("local", local), ("s3", remote)):
            out = root / f"encode-{name}-{round_}"
            out.mkdir()
            start = time.perf_counter()
            metrics = run_encode(cfg, shards, vq_dir, clip_dir, out)
            runs[name].append((metrics["samples"], time.perf_counter() - start))
    rates = {name: min(results, key=lambda r: r[1]) for name, results in runs.items()}
    if rates["s3"][0] != rates["local"][0]:
        raise RuntimeError(f"{rates['s3'][0]} samples from the store, {rates['local'][0]} from the local copies")
    s3_rate, local_rate = (n / seconds for n, seconds in (rates["s3"], rates["local"]))
    return {"ratio_s3_vs_local": round(s3_rate / local_rate, 3), "s3_samples_per_s": round(s3_rate, 1),
            "local_samples_per_s": round(local_rate, 1), "samples": rates["s3"][0], "shards": len(remote),
            "s3_seconds": round(rates["s3"][1], 2), "local_seconds": round(rates["local"][1], 2)}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="benchmark.py encode", description=__doc__)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--shards", default="", help="remote shards: the stage on them against local copies")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)

    from pipeline.config import load_config
    from pipeline.data.locate import resolve_shards
    from pipeline.data.shards import write_demo_shards
    from pipeline.ray_runtime import init_ray
    from pipeline.stages.encode import run_encode
    from pipeline.tiny_models import save_untrained_encoders

    root = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        cfg = load_config(None, [f"workdir={root / 'work'}", *args.overrides])
        if args.shards:
            remote = resolve_shards(args.shards)
            shards = download(remote, root / "shards")
        else:
            shards = write_demo_shards(root / "shards", args.samples, cfg.data.image_size, seed=0,
                                       shard_size=args.shard_size)
        vq_dir, clip_dir = save_untrained_encoders(cfg, root)
        init_ray(cfg.ray_address)
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        # Ray Data's first use starts its per-cluster helper actors; in the workflow earlier stages
        # have done that, so it is warm-up here, like ray.init, not part of the stage.
        ray.data.range(4).map_batches(lambda batch: batch).materialize()

        if args.shards:
            return compare_remote(cfg, remote, shards, vq_dir, clip_dir, root)
        bare, bare_seconds = _bare_loop_process(cfg, shards, vq_dir, clip_dir)
        out = root / "encode"
        out.mkdir()
        start = time.perf_counter()
        metrics = run_encode(cfg, shards, vq_dir, clip_dir, out)
        ray_seconds = time.perf_counter() - start
        if metrics["samples"] != bare["samples"]:
            raise RuntimeError(f"Ray encoded {metrics['samples']} samples, the bare loop {bare['samples']}")
        samples = metrics["samples"]
        ray_rate, bare_rate = samples / ray_seconds, samples / bare_seconds
        warm_rate = samples / bare["loop_seconds"]
        return {
            "ratio_vs_bare_loop": round(ray_rate / bare_rate, 3),
            "samples_per_s": round(ray_rate, 1),
            "bare_loop_samples_per_s": round(bare_rate, 1),
            "samples": samples,
            "ratio_vs_warm_bare_loop": round(ray_rate / warm_rate, 3),
            "bare_loop_warm_samples_per_s": round(warm_rate, 1),
            "ray_seconds": round(ray_seconds, 2),
            "bare_loop_seconds": round(bare_seconds, 2),
            "bare_loop_startup_seconds": round(bare_seconds - bare["loop_seconds"], 2),
            "shards": len(shards),
            "image_size": cfg.data.image_size,
            "batch_size": cfg.encode.batch_size,
            "concurrency": cfg.encode.concurrency,
            "cpus": os.cpu_count(),
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # the bare loop's own process (see _bare_loop_process)
    print(json.dumps(bare_loop(**json.loads(sys.argv[1]))), flush=True)
