"""Ray Serve load test: the app under concurrent load (a quarter of it malformed) vs one at a time.

    python jobs/benchmark.py serve [--model URI] [--requests 200] [--concurrency 16] [--steps 10]
        [--bad-fraction 0.25] [--serial 12] [--port 0] [--time-budget-s 600]

Loopback only, bounded in count and time. Without `--model` it writes an untrained package of the
demo's tiny models (VQ, tiny CLIP, tiny UNet, freshly initialised: fine for load and determinism,
not for pictures). It starts the app locally, then, in one run:

1. sends `--serial` good requests one at a time (the baseline images/s),
2. sends `--requests` requests at `--concurrency`, `--bad-fraction` of them malformed in varied ways,
3. asks /health and /metrics.

Printed keys: `ok` (good requests answered 200 with a valid PNG), `bad_4xx` (malformed requests
answered 4xx naming a field), `errors_5xx`, `wrong` (any other answer: a good request not answered with a PNG,
a malformed one not answered 4xx), `p50_s` / `p95_s` (latency of the good requests under load),
`batching_speedup` (images/s under load over images/s one at a time), `healthy_after`, and the app's
own mean batch size.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from pipeline.sample_client import free_port, wait_healthy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow circle at the bottom", "a blue triangle on the left", "a red square at the top"]


def write_untrained_package(out_dir: str | Path, seed: int = 0, steps: int = 10, config=None,
                            sizes: list[str] | None = None) -> Path:
    """A pipeline model directory of freshly initialised tiny models (the demo config's shapes),
    sampling at `sizes` ('WxH'; default: the square of data.image_size, the first is the default).

    The VQ codebook is random and marked initialised (so decoding does not run k-means on the first
    batch) and the UNet's zero-initialised output layers get small random weights, so that images
    depend on prompt, seed and guidance scale. Takes a few seconds on a CPU.
    """
    import torch
    from safetensors.torch import save_file

    from pipeline.config import load_config
    from pipeline.model_package import write_package
    from pipeline.models.text import build_text_encoder
    from pipeline.models.unet import UNet, unet_config
    from pipeline.models.vq import VQModel
    from pipeline.recipe import with_unet_preset
    from pipeline.stages.clip import encoder_spec
    from pipeline.stages.vq import model_config

    cfg = config or load_config(None, [])
    out_dir = Path(out_dir)
    parts = out_dir.with_name(out_dir.name + ".parts")
    torch.manual_seed(seed)
    vq = VQModel(model_config(cfg))
    with torch.no_grad():
        for codebook in vq.codebooks():
            codebook.embed.normal_()
            codebook.initted.fill_(True)
    vq.save(parts / "vq", latent_scale=1.0)
    text = build_text_encoder(encoder_spec(cfg))
    text.save(parts / "clip")
    side = cfg.data.image_size // cfg.vq.downsample
    latent_shape = [cfg.vq.latent_channels, side, side]
    preset = with_unet_preset(cfg, 0, side)[0].ldm.preset  # no data here: "auto" is the CPU's tiny
    ucfg = unet_config(preset, in_channels=cfg.vq.latent_channels, context_dim=text.token_dim, pooled_dim=text.pooled_dim)
    unet = UNet(ucfg)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    (parts / "unet").mkdir(parents=True, exist_ok=True)
    (parts / "unet" / "unet.json").write_text(json.dumps(asdict(ucfg), indent=2))
    if sizes:
        (parts / "unet" / "sizes.json").write_text(json.dumps({"sizes": sizes, "default_size": sizes[0]}))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(parts / "unet" / "unet.safetensors"))
    meta = {"latent_scale": 1.0, "latent_shape": latent_shape, "image_size": cfg.data.image_size}
    sampling = {"guidance_scale": cfg.samples.guidance_scale, "steps": steps, "sampler": cfg.samples.sampler}
    write_package(out_dir, parts / "unet", parts / "vq", parts / "clip", meta, asdict(cfg.ldm.schedule), sampling)
    return out_dir


def malformed_requests(prompt_chars: int) -> list[tuple[bytes, str]]:
    """(body, the field its 4xx answer must name) for varied malformed /generate bodies."""

    def js(obj) -> bytes:
        return json.dumps(obj).encode()

    ok = {"prompt": PROMPTS[0]}
    return [
        (b"not json", "body"),
        (b"", "body"),
        (b'{"prompt": "a red', "body"),
        (js([1, 2]), "body"),
        (b"\xff\xfe\x00", "body"),
        (js({"steps": 2}), "prompt"),
        (js({"prompt": 7}), "prompt"),
        (js({"prompt": None}), "prompt"),
        (js({"prompt": "x" * (prompt_chars + 1)}), "prompt"),
        (js({**ok, "steps": 0}), "steps"),
        (js({**ok, "steps": 1001}), "steps"),
        (js({**ok, "steps": "10"}), "steps"),
        (js({**ok, "steps": 2.5}), "steps"),
        (js({**ok, "guidance_scale": -0.5}), "guidance_scale"),
        (js({**ok, "guidance_scale": 30.5}), "guidance_scale"),
        (js({**ok, "guidance_scale": "high"}), "guidance_scale"),
        (b'{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
        (b'{"prompt": "x", "guidance_scale": Infinity}', "guidance_scale"),
        (js({**ok, "num_images": 0}), "num_images"),
        (js({**ok, "num_images": 17}), "num_images"),
        (js({**ok, "num_images": True}), "num_images"),
        (js({**ok, "seed": -1}), "seed"),
        (js({**ok, "seed": "7"}), "seed"),
        (js({**ok, "seed": 2**64}), "seed"),
        (js({**ok, "sampler": "euler"}), "sampler"),
        (js({**ok, "sampler": 3}), "sampler"),
        (js({**ok, "colour": "red"}), "colour"),
        (js({**ok, "pad": "x" * 70_000}), "body"),
    ]


def post(base_url: str, body: bytes, timeout: float):
    """POST /generate; (status, headers (case-insensitive), body) whatever the status."""
    req = urllib.request.Request(f"{base_url}/generate", data=body, headers={"Content-Type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def get_json(base_url: str, path: str, timeout: float = 30) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(f"{base_url}{path}", timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


def is_png(data: bytes) -> bool:
    """A complete, decodable PNG."""
    if not data.startswith(PNG_MAGIC):
        return False
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def good_request(i: int, steps: int, sampler: str) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "guidance_scale": (2.0, 3.0, 5.0, 7.5)[i % 4],
            "steps": steps, "sampler": sampler}


def run_load(base_url: str, *, requests: int = 200, concurrency: int = 16, steps: int = 10, sampler: str = "ddim",
             bad_fraction: float = 0.25, serial: int = 12, time_budget_s: float = 600.0, seed: int = 0) -> dict:
    """Against a running app: `serial` good requests one at a time, then `requests` (bad_fraction of
    them malformed, shuffled) at `concurrency`; every count and timing of the module docstring."""
    deadline = time.monotonic() + time_budget_s

    def remaining() -> float:
        return max(1.0, deadline - time.monotonic())

    from pipeline.serve import MAX_PROMPT_CHARS, percentile

    rng = random.Random(seed)
    bad_pool = malformed_requests(MAX_PROMPT_CHARS)
    n_bad = round(requests * bad_fraction)
    plan: list[tuple[bytes, str | None]] = [(bad_pool[i % len(bad_pool)]) for i in range(n_bad)]
    plan += [(json.dumps(good_request(1000 + i, steps, sampler)).encode(), None) for i in range(requests - n_bad)]
    rng.shuffle(plan)

    # Warm-up (not timed): loads the prompt encodings and the kernels.
    post(base_url, json.dumps(good_request(0, steps, sampler)).encode(), remaining())

    serial_ok = 0
    start = time.perf_counter()
    for i in range(serial):
        if time.monotonic() >= deadline:
            break
        status, headers, data = post(base_url, json.dumps(good_request(i, steps, sampler)).encode(), remaining())
        serial_ok += status == 200 and is_png(data)
    serial_s = time.perf_counter() - start

    outcomes: list[dict] = []

    def one(item: tuple[bytes, str | None]) -> dict:
        body, field = item
        if time.monotonic() >= deadline:
            return {"skipped": True, "good": field is None}
        t0 = time.perf_counter()
        try:
            status, headers, data = post(base_url, body, remaining())
        except (urllib.error.URLError, OSError) as err:
            return {"good": field is None, "status": 0, "error": str(err), "seconds": time.perf_counter() - t0}
        out = {"good": field is None, "status": status, "seconds": time.perf_counter() - t0,
               "version": headers.get("X-Model-Version")}
        if field is None:
            out["png"] = status == 200 and headers.get("Content-Type") == "image/png" and is_png(data)
        else:
            try:
                out["field_ok"] = json.loads(data).get("field") == field
            except ValueError:
                out["field_ok"] = False
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(one, plan))
    load_s = time.perf_counter() - start

    good = [o for o in outcomes if o["good"] and not o.get("skipped")]
    bad = [o for o in outcomes if not o["good"] and not o.get("skipped")]
    ok = sum(1 for o in good if o.get("png"))
    bad_4xx = sum(1 for o in bad if 400 <= o["status"] < 500)
    latencies = sorted(o["seconds"] for o in good if o.get("png"))
    serial_rate = serial_ok / serial_s if serial_s > 0 else 0.0
    load_rate = ok / load_s if load_s > 0 else 0.0
    health_status, health = get_json(base_url, "/health")
    _, metrics = get_json(base_url, "/metrics")
    sampler_stats = (metrics or {}).get("sampler", {})
    return {
        "requests": requests,
        "concurrency": concurrency,
        "steps": steps,
        "good_sent": len(good),
        "bad_sent": len(bad),
        "skipped": sum(1 for o in outcomes if o.get("skipped")),
        "ok": ok,
        "bad_4xx": bad_4xx,
        "bad_field_named": sum(1 for o in bad if o.get("field_ok")),
        "errors_5xx": sum(1 for o in outcomes if o.get("status", 0) >= 500),
        "no_answer": sum(1 for o in outcomes if not o.get("skipped") and o.get("status", 0) == 0),
        "wrong": sum(1 for o in good if not o.get("png")) + sum(1 for o in bad if not 400 <= o["status"] < 500),
        "versioned": sum(1 for o in outcomes if o.get("version")),
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "serial_img_per_s": serial_rate,
        "load_img_per_s": load_rate,
        "batching_speedup": load_rate / serial_rate if serial_rate else None,
        "mean_batch_size": sampler_stats.get("mean_batch_size"),
        "batch_size_histogram": sampler_stats.get("batch_size_histogram"),
        "healthy_after": health_status == 200 and (health or {}).get("status") == "ok",
        "load_s": load_s,
        "serial_s": serial_s,
    }


def start_app(model_uri: str, port: int, *, tracking_uri: str | None = None, num_cpus: float = 1,
              max_batch_size: int = 16, batch_wait_timeout_s: float = 0.05, fixed_batch: int | None = None,
              name: str = "ldm-bench", timeout_s: float = 300) -> str:
    """Deploy the app on 127.0.0.1:port (under the current Ray, else a new local one); its base URL."""
    import ray
    from ray import serve

    from pipeline.serve import AppArgs, app

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(model_uri=model_uri, tracking_uri=tracking_uri or "", num_cpus=num_cpus,
                   max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s, fixed_batch=fixed_batch)
    serve.run(app(args), name=name, route_prefix="/", blocking=False)
    base_url = f"http://127.0.0.1:{port}"
    wait_healthy(base_url, model_uri, timeout_s)
    return base_url


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="benchmark.py serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model URI or directory (default: an untrained tiny package)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--bad-fraction", type=float, default=0.25)
    parser.add_argument("--serial", type=int, default=12, help="good requests sent one at a time (the baseline)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs (torch threads) of the sampler replica")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--fixed-batch", type=int, default=None, help="default: max batch size")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--time-budget-s", type=float, default=600)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be in [1, 10000] and --concurrency in [1, 256]")

    import ray
    from ray import serve

    start = time.perf_counter()
    own_ray = not ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        model_uri = args.model or str(write_untrained_package(Path(tmp) / "model", steps=args.steps))
        port = args.port or free_port()
        base_url = start_app(model_uri, port, tracking_uri=args.tracking_uri, num_cpus=args.num_cpus,
                             max_batch_size=args.max_batch_size, fixed_batch=args.fixed_batch)
        try:
            result = run_load(base_url, requests=args.requests, concurrency=args.concurrency, steps=args.steps,
                              sampler=args.sampler, bad_fraction=args.bad_fraction, serial=args.serial,
                              time_budget_s=max(10.0, args.time_budget_s - (time.perf_counter() - start)))
        finally:
            serve.shutdown()
            if own_ray:
                ray.shutdown()
    return {"model": args.model or "untrained-tiny", **result, "seconds": time.perf_counter() - start}
