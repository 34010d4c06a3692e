"""Benchmarks, each side by side with its baseline in one run; prints one JSON line.

    python jobs/benchmark.py unet [--preset tiny|medium]   # our UNet training step vs diffusers'
    python jobs/benchmark.py sampler                         # 50-step guided DDIM vs diffusers' DDIMScheduler
    python jobs/benchmark.py encode                          # Ray Data encode stage vs a bare loop
    python jobs/benchmark.py serve                           # Ray Serve load test, batched vs one at a time
    python jobs/benchmark.py gpu_step                        # bf16 step of the medium and sd presets on a GPU
    python jobs/benchmark.py train                           # the ldm stage's training loop vs a bare torch loop
    python jobs/benchmark.py train_eval                      # the ldm step time with evaluation during training on vs off
    python jobs/benchmark.py ema                             # ZeRO-3 step with the sharded EMA vs one gathering every step
    python jobs/benchmark.py quality                         # the workflow on real emoji images: fidelity by a nearest-image judge, FD, CLIP score
"""
import importlib
import json
import sys

BENCHMARKS = ("unet", "sampler", "encode", "serve", "gpu_step", "ema", "train", "train_eval", "quality")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: benchmark.py {{{'|'.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipeline.benchmarks.{argv[0]}")
    result = module.main(argv[1:])
    print(json.dumps({"benchmark": argv[0], **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
