"""The serving app: Ray Serve, an HTTP ingress bound to a batched, guided sampler.

    serve run pipeline.serve:app model_uri=models:/ldm-pipeline@latest [tracking_uri=...]

`POST /generate` takes JSON {"prompt": str, "guidance_scale": float, "steps": int, "seed": int,
"num_images": int, "sampler": str, "width": int, "height": int} (all but `prompt` optional; limits in
`LIMITS`; width and height together, one of the model's sizes, its aspect-ratio buckets) and answers one
PNG (`image/png`) when num_images is 1, else JSON {"images": [base64 PNG, ...], "seeds": [...],
"model_version": ...}. Image i uses seed + i. Every answer carries the model version in the
`X-Model-Version` header (an alias like models:/name@candidate is resolved to models:/name/N at
startup). Bad input gets a 4xx (400; 413 for a body over `MAX_BODY_BYTES`; 422 for a width x height
the model does not sample at, listing the sizes it does) with a JSON body
{"error": ..., "field": ...} naming the field; a sampling failure a 500 with a JSON body; the server
stays up. Prompts longer than the text encoder's context are truncated, and the response says so in
the `X-Prompt-Truncated` header; prompts over `MAX_PROMPT_CHARS` characters are refused.
`GET /health` answers {"status": "ok", "model": ..., "model_version": ..., "defaults": ..., "sizes":
["WxH", ...], "default_size": "WxH"} after
asking the sampler (503 if it does not answer). `GET /metrics` answers JSON (or Prometheus text with
`?format=prometheus`): requests ok / bad / error, images generated, latency percentiles of the
answered requests, and the sampler's batch-size histogram, mean batch size, and the images queued
for and running in the sampler now.

The ingress validates; the sampler deployment batches requests (`@serve.batch`), groups them by
(steps, sampler, size) and runs each group as one guided sampling call whose forward passes carry the
conditional and unconditional halves of every request, each with its own guidance scale. Prompt
encodings are cached in the model (`PipelineModel.encode_prompts`).

Determinism: the same request (prompt, seed, steps, sampler, guidance scale) gives the same PNG bytes
alone or batched with others. Each request's noise has its own seeded generator, each prompt is
encoded alone, and the sampler runs every UNet forward at one fixed shape (`fixed_batch` requests,
i.e. 2 * fixed_batch rows, padded; default max_batch_size, so a full batch is one forward pass per
step): kernels pick their algorithm by shape, so a varying batch size changes the last bits. Requests
with guidance scale exactly 1 need no unconditional half and are grouped apart. The price is that a
lone request costs a full-batch forward; `fixed_batch` trades that against forwards per step.
"""


import asyncio
import base64
import json
import time
from collections import Counter, deque
from dataclasses import dataclass
from itertools import groupby

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from pipeline.config import ServeConfig
from pipeline.data.buckets import size_name
from pipeline.model_package import GenerationRequest, PipelineModel, png_bytes, resolve_model_version
from pipeline.serve_requests import (  # noqa: F401 - the request API, importable from here too
    KNOWN_FIELDS, LIMITS, MAX_BODY_BYTES, MAX_PROMPT_CHARS, GenerateParams, RequestError, validate)

LATENCY_WINDOW = 10_000
"""/metrics latency percentiles are over the last this many answered requests."""


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


@dataclass
class SampleJob:
    request: GenerationRequest
    steps: int
    sampler: str


def prometheus_text(metrics: dict) -> str:
    """/metrics's JSON as Prometheus text exposition."""
    lines = []

    def add(name: str, kind: str, samples: list[tuple[str, float | None]]) -> None:
        lines.append(f"# TYPE ldm_{name} {kind}")
        lines.extend(f"ldm_{name}{labels} {value}" for labels, value in samples if value is not None)

    add("requests_total", "counter",
        [(f'{{outcome="{k}"}}', v) for k, v in metrics["requests"].items() if k != "total"])
    add("images_generated_total", "counter", [("", metrics["images_generated"])])
    lat = metrics["latency_s"]
    add("request_latency_seconds", "summary",
        [(f'{{quantile="{q / 100}"}}', lat[f"p{q}"]) for q in (50, 90, 95, 99)] + [("_count", lat["count"])])
    s = metrics["sampler"]
    add("batches_total", "counter", [("", s["batches"])])
    add("batch_size_batches", "gauge", [(f'{{size="{k}"}}', v) for k, v in s["batch_size_histogram"].items()])
    add("mean_batch_size", "gauge", [("", s["mean_batch_size"])])
    add("sampler_queued_images", "gauge", [("", s["queued"])])
    add("sampler_running_images", "gauge", [("", s["running"])])
    add("model_info", "gauge", [(f'{{version="{metrics["model_version"]}"}}', 1)])
    return "\n".join(lines) + "\n"


# Define everything the deployments call above them: @serve.ingress serializes the class when the
# module is imported, with the globals it can see then.
# Serve admits only a few requests per replica by default; the sampler must see a full batch.
MAX_ONGOING_REQUESTS = 256


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
class Sampler:
    """Loads the pipeline model by URI and samples batches of requests.

    `generate(job)` answers {"png": bytes, "truncated": bool} or {"error": message}.
    """

    def __init__(self, model_uri: str, tracking_uri: str | None = None, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.05, threads: int = 1, fixed_batch: int | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.model_uri = model_uri
        self.model_version = resolve_model_version(model_uri, tracking_uri)
        self.model = PipelineModel.from_uri(self.model_version, tracking_uri)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.model.fixed_batch = max(0, int(max_batch_size if fixed_batch is None else fixed_batch))
        self.max_batch_size = int(max_batch_size)
        self._generate_batch.set_max_batch_size(self.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.idle = asyncio.Event()
        self.idle.set()
        self.batch_sizes: Counter = Counter()
        self.counters = {"batches": 0, "images": 0, "failed_images": 0, "sampling_runs": 0, "received": 0}
        self.queued = 0
        """Jobs received and not yet in a batch (waiting at the gate or in @serve.batch's queue)."""
        self.running = 0
        """Jobs in the batch being sampled now (0 when the sampler is idle)."""
        self.busy_s = 0.0

    def info(self) -> dict:
        return {"model_uri": self.model_uri, "model_version": self.model_version, "defaults": self.model.defaults,
                "context_length": self.model.context_length,
                "max_steps": int(self.model.schedule.num_train_timesteps),
                "max_batch_size": self.max_batch_size, "fixed_batch": self.model.fixed_batch,
                "sizes": [list(size) for size in self.model.sizes], "default_size": list(self.model.default_size)}

    def ping(self) -> bool:
        return True

    def stats(self) -> dict:
        batches = self.counters["batches"]
        return {**self.counters, "busy_s": self.busy_s, "queued": self.queued, "running": self.running,
                "mean_batch_size": (sum(k * n for k, n in self.batch_sizes.items()) / batches) if batches else None,
                "batch_size_histogram": {str(k): self.batch_sizes[k] for k in sorted(self.batch_sizes)}}

    def truncates(self, prompt: str) -> bool:
        """Whether the prompt's tokens (plus start and end) exceed the text encoder's context."""
        return self.model.text.truncated([prompt])[0]

    def _run_group(self, jobs: list[SampleJob], steps: int, sampler: str) -> list[dict]:
        images = self.model.generate([job.request for job in jobs], steps, sampler)
        return [{"png": png_bytes(image), "truncated": self.truncates(job.request.prompt)}
                for job, image in zip(jobs, images)]

    async def generate(self, job: SampleJob) -> dict:
        # @serve.batch forms a batch from what arrives within the wait window after its first
        # request, even while the previous batch still runs; under load that makes many small
        # batches behind a busy sampler (mean 1.55 at concurrency 16). So requests wait here while a
        # batch runs and all enter the batch queue the moment it ends: the next batch holds
        # everything that arrived meanwhile, up to max_batch_size. A lone request still waits at
        # most the wait window.
        self.counters["received"] += 1
        self.queued += 1
        await self.idle.wait()
        return await self._generate_batch(job)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)  # both set from the app's args in __init__
    async def _generate_batch(self, jobs: list[SampleJob]) -> list[dict]:
        self.idle.clear()
        self.queued -= len(jobs)
        self.running = len(jobs)
        try:
            return await self._run_batch(jobs)
        finally:
            self.running = 0
            self.idle.set()

    async def _run_batch(self, jobs: list[SampleJob]) -> list[dict]:
        start = time.perf_counter()
        results: list[dict | None] = [None] * len(jobs)

        # Scale exactly 1 needs no unconditional half: such requests form groups of their own so
        # that every request always takes the same path (see the module docstring).
        def key(i: int):
            request = jobs[i].request
            return jobs[i].steps, jobs[i].sampler, request.guidance_scale == 1.0, self.model.size_of(request)

        for (steps, sampler, _, _), group in groupby(sorted(range(len(jobs)), key=key), key=key):
            group = list(group)
            self.counters["sampling_runs"] += 1
            try:
                answers = await asyncio.to_thread(self._run_group, [jobs[i] for i in group], steps, sampler)
            except Exception as err:  # noqa: BLE001 - one failing group must not fail the others
                self.counters["failed_images"] += len(group)
                answers = [{"error": f"sampling failed: {type(err).__name__}: {err}"}] * len(group)
            for i, answer in zip(group, answers):
                results[i] = answer
        self.counters["batches"] += 1
        self.counters["images"] += len(jobs)
        self.batch_sizes[len(jobs)] += 1
        self.busy_s += time.perf_counter() - start
        return results


api = FastAPI(title="ldm-pipeline")


# The ingress only parses and validates; it needs no CPU of its own beside the sampler's.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(api)
class Ingress:
    """Validates requests, fans them out to the sampler (one job per image) and keeps the metrics."""

    def __init__(self, sampler):
        self.sampler = sampler
        self._info = None
        self.started = time.time()
        self.requests: Counter = Counter({"ok": 0, "bad": 0, "error": 0})
        self.status_codes: Counter = Counter()
        self.images = 0
        self.latencies: deque = deque(maxlen=LATENCY_WINDOW)

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.sampler.info.remote()
        return self._info

    def _answer(self, outcome: str, status: int, response, start: float):
        self.requests[outcome] += 1
        self.status_codes[status] += 1
        if outcome == "ok":
            self.latencies.append(time.perf_counter() - start)
        return response

    @api.get("/health")
    async def health(self):
        try:
            info = await self.info()
            await asyncio.wait_for(self.sampler.ping.remote(), timeout=30)
        except Exception as err:  # noqa: BLE001 - unhealthy, whatever the cause
            return JSONResponse({"status": "unavailable", "error": f"{type(err).__name__}: {err}"}, 503)
        return JSONResponse({"status": "ok", "model": info["model_uri"], "model_version": info["model_version"],
                             "defaults": info["defaults"], "sizes": [size_name(size) for size in info["sizes"]],
                             "default_size": size_name(info["default_size"])}, headers={"X-Model-Version": info["model_version"]})

    @api.get("/metrics")
    async def metrics(self, request: Request):
        info = await self.info()
        sampler = await self.sampler.stats.remote()
        latencies = sorted(self.latencies)
        body = {
            "model": info["model_uri"],
            "model_version": info["model_version"],
            "uptime_s": time.time() - self.started,
            "requests": {**self.requests, "total": sum(self.requests.values())},
            "status_codes": {str(k): v for k, v in sorted(self.status_codes.items())},
            "images_generated": self.images,
            "latency_s": {"count": len(latencies),
                          "mean": sum(latencies) / len(latencies) if latencies else None,
                          **{f"p{q}": percentile(latencies, q) for q in (50, 90, 95, 99)},
                          "max": latencies[-1] if latencies else None},
            "sampler": {**sampler, "max_batch_size": info["max_batch_size"], "fixed_batch": info["fixed_batch"]},
        }
        headers = {"X-Model-Version": info["model_version"]}
        if request.query_params.get("format") == "prometheus":
            return PlainTextResponse(prometheus_text(body), headers=headers)
        return JSONResponse(body, headers=headers)

    @api.post("/generate")
    async def generate(self, request: Request):
        start = time.perf_counter()
        try:
            info = await self.info()
        except Exception as err:  # noqa: BLE001
            return self._answer("error", 503, JSONResponse(
                {"error": f"sampler unavailable: {type(err).__name__}: {err}", "field": None}, 503), start)
        version = info["model_version"]
        headers = {"X-Model-Version": version}
        try:
            params = validate(await self._read_json(request), info["defaults"], info.get("max_steps", 1000),
                              [tuple(size) for size in info["sizes"]])
        except RequestError as err:
            return self._answer("bad", err.status, JSONResponse(
                {"error": str(err), "field": err.field, "model_version": version}, err.status, headers=headers), start)
        try:
            jobs = [
                SampleJob(GenerationRequest(params.prompt, params.seed + i, params.guidance_scale, params.size),
                          params.steps, params.sampler)
                for i in range(params.num_images)
            ]
            answers = await asyncio.gather(*[self.sampler.generate.remote(job) for job in jobs])
        except Exception as err:  # noqa: BLE001 - the server answers and stays up
            answers = [{"error": f"{type(err).__name__}: {err}"}]
        failed = [a["error"] for a in answers if "error" in a]
        if failed:
            return self._answer("error", 500, JSONResponse(
                {"error": failed[0], "field": None, "model_version": version}, 500, headers=headers), start)
        if answers[0]["truncated"]:
            headers["X-Prompt-Truncated"] = f"prompt truncated to {info['context_length']} tokens"
        self.images += len(answers)
        if params.num_images == 1:
            return self._answer("ok", 200, Response(answers[0]["png"], media_type="image/png", headers=headers), start)
        return self._answer("ok", 200, JSONResponse(
            {"images": [base64.b64encode(a["png"]).decode() for a in answers],
             "seeds": [params.seed + i for i in range(params.num_images)], "model_version": version},
            headers=headers), start)

    @staticmethod
    async def _read_json(request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise RequestError("body", f"at most {MAX_BODY_BYTES} bytes", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError("body", f"at most {MAX_BODY_BYTES} bytes", status=413)
        try:
            return json.loads(raw)
        except ValueError:  # includes UnicodeDecodeError
            raise RequestError("body", "must be valid JSON") from None
        except RecursionError:
            raise RequestError("body", "JSON nested too deeply") from None


class AppArgs(BaseModel):
    """The Serve app's arguments (`args:` of a Serve config, or `serve run ... key=value`), checked
    by Serve against these types before the app is built; the defaults are ServeConfig's."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str
    tracking_uri: str = ""
    max_batch_size: int = Field(ServeConfig.max_batch_size, ge=1)
    batch_wait_timeout_s: float = Field(ServeConfig.batch_wait_timeout_s, ge=0)
    fixed_batch: int | None = Field(None, ge=0)
    """Requests per UNet forward, padded; None: max_batch_size; 0 runs each batch at its own size,
    which gives up bitwise determinism under batching."""
    num_cpus: float = Field(ServeConfig.num_cpus, gt=0)
    """CPUs of the sampler replica; torch uses that many threads."""
    num_gpus: float = Field(ServeConfig.num_gpus, ge=0)
    num_replicas: int = Field(1, ge=1)

    @classmethod
    def of(cls, model_uri: str, tracking_uri: str | None, cfg: ServeConfig, **more) -> "AppArgs":
        """A job's app arguments from its `serve` config section."""
        return cls(model_uri=model_uri, tracking_uri=tracking_uri or "", max_batch_size=cfg.max_batch_size,
                   batch_wait_timeout_s=cfg.batch_wait_timeout_s, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **more)


def app(args: AppArgs):
    """Application builder: `serve run pipeline.serve:app model_uri=URI [tracking_uri=URI] ...`
    (the fields of AppArgs)."""
    if isinstance(args, dict):  # called directly rather than by Serve
        args = AppArgs.model_validate(args)
    sampler = Sampler.options(
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        num_replicas=args.num_replicas,
    ).bind(
        args.model_uri,
        args.tracking_uri or None,
        args.max_batch_size,
        args.batch_wait_timeout_s,
        max(1, int(args.num_cpus)),
        args.fixed_batch,
    )
    return Ingress.bind(sampler)
