"""The serving app's request API: the fields of `POST /generate`, their limits, and `validate`, which
turns a JSON body into GenerateParams or a RequestError naming the field (a 4xx). No Ray here."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import SamplingDefaults
from pipeline.data.buckets import size_name
from pipeline.sampling import SAMPLERS

LIMITS = {"guidance_scale": (0.0, 30.0), "steps": (1, 1000), "num_images": (1, 16)}
MAX_PROMPT_CHARS = 2000
"""Longer prompts are refused (400); shorter ones beyond the encoder's context are truncated."""
MAX_BODY_BYTES = 64 * 1024
"""Larger /generate bodies are refused (413)."""
KNOWN_FIELDS = ("prompt", "guidance_scale", "steps", "seed", "num_images", "sampler", "width", "height")


class RequestError(ValueError):
    """A request field is missing, of the wrong type or out of range."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


@dataclass
class GenerateParams:
    prompt: str
    guidance_scale: float
    steps: int
    seed: int
    num_images: int
    sampler: str
    size: tuple[int, int] | None = None
    """(width, height); None: the model's default size."""


def validate(body, defaults: dict, max_steps: int = LIMITS["steps"][1],
             sizes: list[tuple[int, int]] | None = None) -> GenerateParams:
    """Check a /generate body; raises RequestError naming the first bad field.

    `max_steps` further bounds steps (the model's number of training timesteps); `sizes`, the
    model's (width, height) sizes, are what `width` and `height` may ask for (given together).
    """
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    unknown = sorted(set(body) - set(KNOWN_FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; known fields: {sorted(KNOWN_FIELDS)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("prompt", "required, must be a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError("prompt", f"at most {MAX_PROMPT_CHARS} characters, got {len(prompt)} "
                                     "(prompts beyond the text encoder's context are truncated)")

    def number(name, kind, default, high=None):
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise RequestError(name, f"must be {'a number' if kind is float else 'an integer'}")
        low, top = LIMITS.get(name, (None, None))
        if high is not None:
            top = min(top, high)
        if low is not None and not low <= value <= top:  # NaN fails too
            raise RequestError(name, f"must be in [{low}, {top}], got {value}")
        return kind(value)

    defaults = SamplingDefaults.of(defaults)
    sampler = body.get("sampler", defaults["sampler"])
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise RequestError("sampler", f"must be one of {sorted(SAMPLERS)}")
    seed = number("seed", int, 0)
    if not 0 <= seed < 2**63:
        raise RequestError("seed", "must be in [0, 2**63)")
    num_images = number("num_images", int, 1)
    if seed + num_images > 2**63:
        raise RequestError("seed", "seed + num_images must be at most 2**63")
    size = None
    if "width" in body or "height" in body:
        for name in ("width", "height"):
            if name not in body:
                raise RequestError(name, "width and height go together")
            if isinstance(body[name], bool) or not isinstance(body[name], int):
                raise RequestError(name, "must be an integer")
        size = (body["width"], body["height"])
        if sizes is not None and size not in [tuple(s) for s in sizes]:
            allowed = ", ".join(size_name(s) for s in sizes)
            raise RequestError("width", f"{size_name(size)} is not a size this model samples at; "
                                        f"its sizes (width x height): {allowed}", status=422)
    return GenerateParams(
        size=size,
        prompt=prompt,
        guidance_scale=number("guidance_scale", float, defaults["guidance_scale"]),
        steps=number("steps", int, defaults["steps"], high=max_steps),
        seed=seed,
        num_images=num_images,
        sampler=sampler,
    )
