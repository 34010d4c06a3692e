"""Samplers: the reverse process as pure functions of (model function, initial noise, schedule).

Used by the [ldm] stage for sample grids, by the exported model and by the [serve] deployment.
A sampler never sees the network or the text: it calls a `ModelFn` (x, t) -> raw output (epsilon or
v, per `schedule.prediction_type`). Classifier-free guidance is a wrapper (`guided`) that turns a
conditioned network into such a function, k-diffusion style, so no sampler has a guidance branch.

Each sampler reproduces the matching diffusers scheduler step for step under that scheduler's
default timestep spacing (the tests drive both with the same model and noise): `sample_ddpm` =
DDPMScheduler, `sample_ddim` = DDIMScheduler ("leading" spacing, set_alpha_to_one=True,
steps_offset=0), `sample_dpmpp_2m` = DPMSolverMultistepScheduler (DPM-Solver++(2M), "linspace"
spacing, lower_order_final=True, final sigma 0). Unlike diffusers' defaults for DDPM/DDIM, x0 is
never clipped to [-1, 1]: latents are not bounded like pixels.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np
import torch

from pipeline.conditioning import Conditioning
from pipeline.diffusion import NoiseSchedule, posterior_coefficients

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x (B, ...), t (B,) long) -> raw model output shaped like x (epsilon or v per the schedule)."""

UNetFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
"""(x, t, cond) -> raw model output: the network's forward, e.g. a `UNet` instance."""

Generators = Union[torch.Generator, Sequence[torch.Generator], None]

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""callback(step, timestep, x, x0): after each step, the new sample and the step's x0 prediction."""


def randn_per_sample(
    shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn the way diffusers' `randn_tensor` draws it.

    With a list of generators, sample i is drawn from generator[i] alone, so an image depends on its
    own seed and not on what else shares its batch. Noise is drawn on the generator's device (the
    CPU for CPU generators) and then moved, so a seed gives the same image on any device.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    rng_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rng_device, dtype=dtype).to(device)


def guided(
    unet_fn: UNetFn, cond: Conditioning, null: Conditioning, guidance_scale: float | torch.Tensor
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a model function: u + s * (c - u).

    `cond` is the batch's condition (B), `null` the empty caption's (batch 1, or B). Each call runs
    ONE forward pass over 2B samples (conditional half first). `guidance_scale` is a float or a (B,)
    tensor, one scale per sample. The combination is applied to the raw outputs: eps and v are both
    affine in the model output at fixed (x, t), so guiding either is the same as guiding in eps space.
    When every scale is exactly 1 the unconditional half is skipped and the result is exactly the
    conditional model. A network with a `bind(cond)` method (`UNet.bind`) is bound to the
    condition once, so the work that depends on the text alone is not repeated at every step.
    """
    batch = len(cond)
    scale = torch.as_tensor(guidance_scale, dtype=torch.float64)
    if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != batch):
        raise ValueError(f"guidance_scale must be a float or a ({batch},) tensor, got shape {tuple(scale.shape)}")

    def check_batch(x: torch.Tensor) -> None:
        if x.shape[0] != batch:
            raise ValueError(f"x has batch {x.shape[0]} but the condition has batch {batch}")

    if bool((scale == 1.0).all()):
        conditional = _bound(unet_fn, cond)

        def conditional_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            check_batch(x)
            return conditional(x, t)

        return conditional_fn

    if len(null) == 1:
        null = null.expand(batch)
    elif len(null) != batch:
        raise ValueError(f"null condition must have batch 1 or {batch}, got {len(null)}")
    both = _bound(unet_fn, Conditioning.cat([cond, null.to(cond.tokens.device, cond.tokens.dtype)]))
    per_sample_scale = scale.dim() == 1

    def guided_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_batch(x)
        out = both(torch.cat([x, x]), torch.cat([t, t]))  # (2B, ...)
        out_cond, out_uncond = out.chunk(2)
        if per_sample_scale:
            s = scale.to(out.dtype).to(out.device).view(-1, *([1] * (out.dim() - 1)))  # (B, 1, ..., 1)
        else:
            s = float(scale)
        return out_uncond + s * (out_cond - out_uncond)

    return guided_fn


def _bound(unet_fn: UNetFn, cond: Conditioning) -> ModelFn:
    """unet_fn with its condition fixed: `unet_fn.bind(cond)` where the network offers it."""
    bind = getattr(unet_fn, "bind", None)
    if bind is not None:
        return bind(cond)
    return lambda x, t: unet_fn(x, t, cond)


def leading_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' "leading" spacing: 0, r, 2r, ... (r = N // num_steps), in descending order."""
    _check_num_steps(num_train_timesteps, num_steps)
    ratio = num_train_timesteps // num_steps
    return [i * ratio for i in reversed(range(num_steps))]


def linspace_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' "linspace" spacing (DPM-Solver's default): round(linspace(0, N-1, k+1)), descending, minus 0."""
    _check_num_steps(num_train_timesteps, num_steps)
    # numpy, not Python arithmetic: points like 499.5 must round the way diffusers' np.linspace rounds.
    points = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    return [int(p) for p in points]


def _check_num_steps(num_train_timesteps: int, num_steps: int) -> None:
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {num_train_timesteps}], got {num_steps!r}")


def _timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float, float], torch.Tensor]
"""update(x, eps, x0, t, alpha_bar_t, alpha_bar_prev) -> the next x: one sampler's step from timestep
t to the next (whose abar is alpha_bar_prev; 1 after the last), given the model's predictions for x."""


def _run_chain(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], update: Update,
               callback: Callback | None) -> torch.Tensor:
    """The loop every sampler shares: at each of `timesteps` the model's eps and x0 predictions for
    the current x, the sampler's `update` from them to the next x, then the callback."""
    alpha_bar = schedule.alphas_cumprod.tolist()
    for i, t in enumerate(timesteps):
        t_batch = _timestep_batch(t, x)
        eps, x0 = schedule.eps_and_x0(model_fn(x, t_batch), x, t_batch)
        alpha_bar_prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        x = update(x, eps, x0, t, alpha_bar[t], alpha_bar_prev)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int | None = None,
    generator: Generators = None,
    variance: str = "beta_tilde",
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, the seed's reverse process: z_{t-1} ~ N(mu~(x0_hat, z_t), var).

    `x` is the initial noise z_N. With `num_steps` < N the chain runs on a "leading"-spaced
    subsequence with the betas respaced from alphas_cumprod (as diffusers' DDPMScheduler after
    set_timesteps). `variance` is "beta_tilde" (the posterior variance, DDPM's sigma^2 = beta~) or
    "beta" (sigma^2 = beta, the upper bound in Ho et al. 2020, sec. 3.2). No noise is added at the
    last step.
    """
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"variance must be 'beta_tilde' or 'beta', got {variance!r}")
    if num_steps is None:
        num_steps = schedule.num_train_timesteps

    def update(x, eps, x0, t, alpha_bar_t, alpha_bar_prev):  # an `Update`
        coef_x0, coef_zt, beta_tilde = posterior_coefficients(alpha_bar_t, alpha_bar_prev)
        x = coef_x0 * x0 + coef_zt * x
        if t > 0:
            var = beta_tilde if variance == "beta_tilde" else 1 - alpha_bar_t / alpha_bar_prev
            x = x + var**0.5 * randn_per_sample(x.shape, generator, x.device, x.dtype)
        return x

    return _run_chain(model_fn, x, schedule, leading_timesteps(schedule.num_train_timesteps, num_steps), update,
                      callback)


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM-like noise at eta = 1.

    `x` is the initial noise. Timesteps are "leading"-spaced and the last step goes to abar = 1.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")

    def update(x, eps, x0, t, alpha_bar_t, alpha_bar_prev):  # an `Update`
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        std = eta * variance**0.5
        x = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - std**2) ** 0.5 * eps
        if eta > 0:
            # Drawn at every step, the last included (where std is 0), so that a seed's noise
            # stream lines up with diffusers' DDIMScheduler.
            x = x + std * randn_per_sample(x.shape, generator, x.device, x.dtype)
        return x

    return _run_chain(model_fn, x, schedule, leading_timesteps(schedule.num_train_timesteps, num_steps), update,
                      callback)


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 20,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): a deterministic 2nd-order multistep ODE solver.

    Good samples in 15-25 steps. Works on x0 predictions in the half-log-SNR lambda = -log(sigma),
    sigma = sqrt((1 - abar) / abar); the first step is first order (no history yet) and the last
    step, to sigma = 0, returns the x0 prediction. `generator` is accepted for a uniform sampler
    signature and unused.
    """
    del generator  # deterministic
    prev_x0, prev_lambda = None, None

    def update(x, eps, x0, t, alpha_bar_t, alpha_bar_prev):  # an `Update`
        nonlocal prev_x0, prev_lambda
        sigma, sigma_next = ((1 - alpha_bar_t) / alpha_bar_t) ** 0.5, ((1 - alpha_bar_prev) / alpha_bar_prev) ** 0.5
        lambda_cur = -math.log(sigma)
        if sigma_next == 0.0:
            x = x0  # the first-order update with sigma_next = 0 is exactly x0
        else:
            # VP coefficients of the data: alpha = 1 / sqrt(1 + sigma^2), noise std = sigma * alpha.
            alpha_next = 1 / (1 + sigma_next**2) ** 0.5
            h = -math.log(sigma_next) - lambda_cur
            if prev_x0 is None:
                denoised = x0
            else:
                r = (lambda_cur - prev_lambda) / h
                denoised = x0 + (0.5 / r) * (x0 - prev_x0)
            # (sigma_next * alpha_next) / (sigma * alpha) is the ratio of the noise stds.
            noise_ratio = (sigma_next * alpha_next) / (sigma / (1 + sigma**2) ** 0.5)
            x = noise_ratio * x - alpha_next * math.expm1(-h) * denoised
        prev_x0, prev_lambda = x0, lambda_cur
        return x

    return _run_chain(model_fn, x, schedule, linspace_timesteps(schedule.num_train_timesteps, num_steps), update,
                      callback)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sample(name: str, model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, **kwargs) -> torch.Tensor:
    """Run the sampler registered as `name` in `SAMPLERS` from initial noise `x`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {sorted(SAMPLERS)}")
    return SAMPLERS[name](model_fn, x, schedule, **kwargs)
