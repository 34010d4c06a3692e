"""The GPU check: the whole workflow through the GPU code paths at small shapes, then the bf16
training step of the medium and sd presets. Under 8 minutes on one GPU; prints one JSON object.

    make gpu-check
    python jobs/gpu_check.py [--workdir DIR] [--presets medium,sd] [--skip-workflow] [--dry-run]

The workflow runs as users run it (`jobs/train_ldm.py --config jobs/configs/gpu-check.yaml`: NCCL
with one worker, bf16, ZeRO-2, encoders and the Serve replica on the GPU); the step figures come
from `jobs/benchmark.py gpu_step` (images/s, MFU against the GPU's dense bf16 peak, peak memory).
`--dry-run` checks what runs without a GPU (the config, the step benchmark on the CPU's tiny preset).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.benchmarks import gpu_step  # noqa: E402
from pipeline.config import load_config  # noqa: E402

CONFIG = ROOT / "jobs" / "configs" / "gpu-check.yaml"


def run_workflow(workdir: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_ldm.py"), "--config", str(CONFIG),
                           f"workdir={workdir}"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        return {"ok": False, "seconds": round(seconds, 1), "returncode": proc.returncode,
                "log_tail": (proc.stdout + proc.stderr)[-4000:]}
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    return {"ok": True, "seconds": round(seconds, 1),
            "stages": {name: {"seconds": s["seconds"], "metrics": s["metrics"]} for name, s in summary["stages"].items()},
            "driver": summary.get("driver")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    parser.add_argument("--presets", default="medium,sd")
    parser.add_argument("--skip-workflow", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: check the config and the step code on the CPU")
    args = parser.parse_args(argv)
    cfg = load_config(CONFIG, [])
    result = {"config": str(CONFIG.relative_to(ROOT)),
              "gpu_paths": {"ldm": [cfg.ldm.precision, f"zero{cfg.ldm.zero_stage}", f"{cfg.ldm.num_workers} worker"],
                            "encode_gpus_per_actor": cfg.encode.num_gpus_per_actor, "serve_gpus": cfg.serve.num_gpus}}
    if args.dry_run:
        result["steps"] = gpu_step.main(["--presets", "tiny", "--device", "cpu", "--iters", "1"])["steps"]
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here (use --dry-run on a CPU machine)", file=sys.stderr)
            return 2
        if not args.skip_workflow:
            result["workflow"] = run_workflow(args.workdir or tempfile.mkdtemp(prefix="ldm-gpu-check-"))
        result["steps"] = gpu_step.main(["--presets", args.presets])["steps"]
    print(json.dumps(result), flush=True)
    return 0 if result.get("workflow", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
