"""Guided sampling as a batch job: find or start the Serve app, send requests, write the images.

Used by `jobs/sample.py` and by the workflow's samples stage. Requests go over HTTP to the Serve
app's `POST /generate`, concurrently, so the sampler deployment batches them.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import ServeConfig
from pipeline.data.images import grid_columns

SERVE_APP_NAME = "ldm"
HTTP_TIMEOUT_S = 600
DEPLOY_SETTLE_S = 30.0
"""How long a deployed app may take to be reported RUNNING once it answers its health check."""


@dataclass
class ImageRecord:
    """One line of manifest.jsonl."""

    file: str
    prompt: str
    seed: int
    guidance_scale: float
    steps: int
    sampler: str
    width: int | None = None
    height: int | None = None
    """The size asked for (None: the model's default)."""


def health(base_url: str) -> dict | None:
    """The app's /health answer, or None when nothing answers there."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_healthy(base_url: str, model_uri: str, timeout_s: float = 300) -> None:
    """Poll /health until the app there serves `model_uri`; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = health(base_url)
        if answer and answer.get("model") == model_uri:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the Serve app at {base_url} did not become healthy within {timeout_s:.0f} s")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_app(model_uri: str, tracking_uri: str | None, serve_cfg: ServeConfig, ray_address: str = "") -> bool:
    """Use a running app serving `model_uri`, or deploy one (locally if no cluster). True if deployed."""
    host, port = serve_cfg.host, serve_cfg.port
    base_url = f"http://{host}:{port}"
    running = health(base_url)
    if running and running.get("model") == model_uri:
        return False
    from ray import serve

    from pipeline.ray_runtime import init_ray
    from pipeline.serve import AppArgs, app

    init_ray(ray_address)
    serve.start(http_options={"host": host, "port": port})
    application = app(AppArgs.of(model_uri, tracking_uri, serve_cfg))
    # serve.run waits until the app runs, with no limit: a replica that cannot be placed or cannot
    # load its model would hold this job forever. So it runs aside, and the wait here is bounded.
    deploying = threading.Thread(target=serve.run, args=(application,), daemon=True,
                                 kwargs={"name": SERVE_APP_NAME, "route_prefix": "/", "blocking": False})
    deploying.start()
    try:
        wait_healthy(base_url, model_uri, timeout_s=serve_cfg.start_timeout_s)
    except TimeoutError as error:
        raise TimeoutError(f"{error} (serve.start_timeout_s={serve_cfg.start_timeout_s:g}): {_app_status()}; the "
                           f"sampler asks for serve.num_cpus={serve_cfg.num_cpus:g}, serve.num_gpus="
                           f"{serve_cfg.num_gpus:g} and loads {model_uri}") from None
    # serve.run returns once Serve reports the app RUNNING, a moment after it answers: a shutdown
    # before that would kill the controller it polls (an error in that thread, nothing lost).
    deploying.join(timeout=DEPLOY_SETTLE_S)
    return True


def _app_status() -> str:
    """What Serve says of the app's deployments (a replica pending, or stuck loading its model)."""
    from ray import serve

    try:
        status = serve.status().applications.get(SERVE_APP_NAME)
    except Exception as error:  # noqa: BLE001 - the diagnosis must not hide the timeout
        return f"its status could not be read ({type(error).__name__})"
    if status is None:
        return "Serve has no such app yet"
    parts = [f"app {status.status}: {status.message}".rstrip(": ")]
    parts += [f"{name} {d.status}: {d.message}".rstrip(": ") for name, d in status.deployments.items()]
    return "; ".join(parts)


def request_image(base_url: str, body: dict) -> bytes:
    """POST /generate for one image; raises RuntimeError with the server's message on an error."""
    req = urllib.request.Request(f"{base_url}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.read()
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"/generate answered {err.code}: {err.read().decode(errors='replace')}") from None


def generate_to_dir(prompts: list[str], out_dir: str | Path, *, base_url: str, guidance_scale: float, steps: int,
                    sampler: str, seed: int, num_per_prompt: int, concurrency: int = 16,
                    size: tuple[int, int] | None = None) -> list[ImageRecord]:
    """Generate num_per_prompt images per prompt, at `size` (width, height; None: the model's
    default); write NNNNN.png, grid.png and manifest.jsonl.

    Image j of a prompt uses seed + j, so the same settings give the same images.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [
        ImageRecord(f"{i * num_per_prompt + j:05d}.png", prompt, seed + j, guidance_scale, steps, sampler,
                    *(size or (None, None)))
        for i, prompt in enumerate(prompts)
        for j in range(num_per_prompt)
    ]
    done = 0
    start = time.perf_counter()

    def one(record: ImageRecord) -> None:
        nonlocal done
        body = {"prompt": record.prompt, "seed": record.seed, "guidance_scale": record.guidance_scale,
                "steps": record.steps, "sampler": record.sampler}
        if record.width is not None:
            body.update(width=record.width, height=record.height)
        (out_dir / record.file).write_bytes(request_image(base_url, body))
        done += 1
        if done % max(1, len(records) // 10) == 0 or done == len(records):
            rate = done / (time.perf_counter() - start)
            print(f"[sample] {done}/{len(records)} images | {rate:.2f} img/s", flush=True)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, records))
    with open(out_dir / "manifest.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps({k: v for k, v in asdict(record).items() if v is not None}) + "\n")
    write_grid([out_dir / r.file for r in records], out_dir / "grid.png", [r.prompt for r in records],
               ncol=grid_columns(len(prompts), num_per_prompt))
    return records


def write_grid(files: list[Path], path: Path, captions: list[str], ncol: int) -> None:
    """Tile images row by row, each with its prompt under it (`ncol` a row, 0: near-square)."""
    import numpy as np
    from PIL import Image

    from pipeline.data.images import captioned_tile

    if files:
        Image.fromarray(captioned_tile([np.asarray(Image.open(f).convert("RGB")) for f in files], captions,
                                       ncol)).save(path)
