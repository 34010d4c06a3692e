"""`make gpu-check` is prepared for a GPU machine; here its CPU-checkable parts run: the GPU config
loads, and the bf16 step benchmark's code path runs on the CPU and reports its figures."""

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_reports_the_gpu_paths_and_a_step(capsys):
    main = runpy.run_path(str(ROOT / "jobs" / "gpu_check.py"))["main"]
    assert main(["--dry-run"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["gpu_paths"]["ldm"] == ["bf16", "zero2", "1 worker"]
    assert result["gpu_paths"]["encode_gpus_per_actor"] == 1 and result["gpu_paths"]["serve_gpus"] == 1
    (step,) = result["steps"]
    assert step["preset"] == "tiny" and step["device"] == "cpu"
    assert step["img_per_s"] > 0 and step["step_gflop"] > 0 and "mfu" not in step  # no peak known for a CPU


def test_the_gpu_peak_table_names_the_lent_gpu():
    from pipeline.benchmarks.gpu_step import PEAK_BF16_TFLOPS

    assert PEAK_BF16_TFLOPS["H200"] == PEAK_BF16_TFLOPS["H100"] > PEAK_BF16_TFLOPS["A100"]
