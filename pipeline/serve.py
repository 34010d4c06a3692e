"""The serving app: Ray Serve, an HTTP ingress bound to a batched, guided sampler.

    serve run pipeline.serve:app model_uri=models:/ldm-pipeline@latest [tracking_uri=...]

`POST /generate` takes JSON {"prompt": str, "guidance_scale": float, "steps": int, "seed": int,
"num_images": int, "sampler": str} (all but `prompt` optional) and answers one PNG (`image/png`)
when num_images is 1, else JSON {"images": [base64 PNG, ...]}. Image i uses seed + i. Every answer
carries the model version in the `X-Model-Version` header. Bad input gets a 400 with a JSON body
naming the field. Prompts longer than the text encoder's context are truncated, and the response
says so in the `X-Prompt-Truncated` header. `GET /health` answers {"status": "ok", "model": ...}.

The ingress validates; the sampler deployment batches requests with `@serve.batch`, groups them by
(steps, sampler) and runs each group as one guided sampling call whose forward passes carry the
conditional and unconditional halves of every request, each with its own guidance scale.
"""


import asyncio
import base64
from dataclasses import dataclass
from itertools import groupby

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from pipeline.model_package import GenerationRequest, PipelineModel, png_bytes
from pipeline.sampling import SAMPLERS

LIMITS = {"guidance_scale": (0.0, 30.0), "steps": (1, 1000), "num_images": (1, 16)}


class RequestError(ValueError):
    """A request field is missing, of the wrong type or out of range."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class GenerateParams:
    prompt: str
    guidance_scale: float
    steps: int
    seed: int
    num_images: int
    sampler: str


def validate(body, defaults: dict) -> GenerateParams:
    """Check a /generate body; raises RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    known = {"prompt", "guidance_scale", "steps", "seed", "num_images", "sampler"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(unknown[0], f"unknown field; known fields: {sorted(known)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("prompt", "required, must be a string")

    def number(name, kind, default):
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise RequestError(name, f"must be {'a number' if kind is float else 'an integer'}")
        low_high = LIMITS.get(name)
        if low_high and not low_high[0] <= value <= low_high[1]:
            raise RequestError(name, f"must be in [{low_high[0]}, {low_high[1]}], got {value}")
        return kind(value)

    sampler = body.get("sampler", defaults.get("sampler", "ddim"))
    if sampler not in SAMPLERS:
        raise RequestError("sampler", f"must be one of {sorted(SAMPLERS)}")
    seed = number("seed", int, 0)
    if not 0 <= seed < 2**63:
        raise RequestError("seed", "must be in [0, 2**63)")
    return GenerateParams(
        prompt=prompt,
        guidance_scale=number("guidance_scale", float, defaults.get("guidance_scale", 3.0)),
        steps=number("steps", int, defaults.get("steps", 50)),
        seed=seed,
        num_images=number("num_images", int, 1),
        sampler=sampler,
    )


@dataclass
class SampleJob:
    request: GenerationRequest
    steps: int
    sampler: str


# Serve admits only a few requests per replica by default; the sampler must see a full batch.
MAX_ONGOING_REQUESTS = 256


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
class Sampler:
    """Loads the pipeline model by URI and samples batches of requests."""

    def __init__(self, model_uri: str, tracking_uri: str | None = None, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.05, threads: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        self.model = PipelineModel.from_uri(model_uri, tracking_uri)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.model_uri = model_uri
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> dict:
        return {"model_uri": self.model_uri, "defaults": self.model.defaults,
                "context_length": self.model.context_length}

    def truncates(self, prompt: str) -> bool:
        return len(self.model.text.tokenizer.encode(prompt)) + 2 > self.model.context_length

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[SampleJob]) -> list[bytes]:
        results: dict[int, bytes] = {}
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i].steps, jobs[i].sampler))
        for (steps, sampler), group in groupby(order, key=lambda i: (jobs[i].steps, jobs[i].sampler)):
            group = list(group)
            images = await asyncio.to_thread(self.model.generate, [jobs[i].request for i in group], steps, sampler)
            for i, image in zip(group, images):
                results[i] = png_bytes(image)
        return [results[i] for i in range(len(jobs))]


api = FastAPI(title="ldm-pipeline")


# The ingress only parses and validates; it needs no CPU of its own beside the sampler's.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(api)
class Ingress:
    """Validates requests and fans them out to the sampler, one job per image."""

    def __init__(self, sampler):
        self.sampler = sampler
        self._info = None

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.sampler.info.remote()
        return self._info

    @api.get("/health")
    async def health(self):
        info = await self.info()
        return {"status": "ok", "model": info["model_uri"], "defaults": info["defaults"]}

    @api.post("/generate")
    async def generate(self, request: Request):
        info = await self.info()
        headers = {"X-Model-Version": info["model_uri"]}
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any unparsable body is the client's error
            return JSONResponse({"error": "body must be valid JSON", "field": "body"}, 400, headers=headers)
        try:
            params = validate(body, info["defaults"])
        except RequestError as err:
            return JSONResponse({"error": str(err), "field": err.field}, 400, headers=headers)
        if await self.sampler.truncates.remote(params.prompt):
            headers["X-Prompt-Truncated"] = f"prompt truncated to {info['context_length']} tokens"
        jobs = [
            SampleJob(GenerationRequest(params.prompt, params.seed + i, params.guidance_scale), params.steps,
                      params.sampler)
            for i in range(params.num_images)
        ]
        pngs = await asyncio.gather(*[self.sampler.generate.remote(job) for job in jobs])
        if params.num_images == 1:
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"images": [base64.b64encode(p).decode() for p in pngs]}, headers=headers)


def app(args: dict):
    """Application builder: `serve run pipeline.serve:app model_uri=URI [tracking_uri=URI]`.

    Optional arguments: max_batch_size, batch_wait_timeout_s, num_cpus and num_gpus of the sampler
    replica (torch uses num_cpus threads), num_replicas.
    """
    if "model_uri" not in args:
        raise ValueError("pipeline.serve:app needs the argument model_uri")
    num_cpus = float(args.get("num_cpus", 1))
    sampler = Sampler.options(
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": float(args.get("num_gpus", 0))},
        num_replicas=int(args.get("num_replicas", 1)),
    ).bind(
        args["model_uri"],
        args.get("tracking_uri") or None,
        int(args.get("max_batch_size", 16)),
        float(args.get("batch_wait_timeout_s", 0.05)),
        max(1, int(num_cpus)),
    )
    return Ingress.bind(sampler)
