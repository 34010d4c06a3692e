"""The diffusion math: noise schedule, forward process, posterior and the training loss.

Sits between the network (`pipeline.models.unet`, which knows nothing of noise) and its two users:
the [ldm] training loop calls `training_loss`, and the samplers (`pipeline.sampling`) read the
schedule to run the reverse process. The schedule's config travels with the exported model, so
`NoiseSchedule.to_dict` / `from_dict` round-trip it through JSON.

Index convention: a timestep `t` is a 0-based index in [0, N-1]; index `t` is the seed's step
`n = t + 1`, so `alphas_cumprod[t]` is the seed's `abar_n`. This is also the convention of
diffusers' schedulers, which the tests use as an oracle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from pipeline.conditioning import Conditioning

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v")

# Nichol & Dhariwal 2021, sec. 3.2: the offset s keeps beta_1 from being vanishingly small, and
# betas are clipped at 0.999 to avoid the singularity of alpha_bar -> 0 at the end of the chain.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


@dataclass
class ScheduleConfig:
    """How much noise each of the N forward steps adds, and what the network predicts.

    Defaults are DDPM's (Ho et al. 2020). Latent diffusion (LDM / Stable Diffusion) uses
    `beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012`: see `SCHEDULE_PRESETS`.
    """

    num_train_timesteps: int = 1000
    """N, the length of the forward chain; the network is trained on t in [0, N-1]."""

    beta_schedule: str = "linear"
    """"linear" (DDPM: betas evenly spaced from beta_start to beta_end), "scaled_linear" (LDM/SD:
    sqrt(beta) evenly spaced) or "cosine" (Nichol & Dhariwal 2021; ignores beta_start/beta_end)."""

    beta_start: float = 1e-4
    """beta_1, the variance of the first forward step. DDPM: 1e-4; LDM/SD: 0.00085."""

    beta_end: float = 0.02
    """beta_N, the variance of the last forward step. DDPM: 0.02; LDM/SD: 0.012."""

    prediction_type: str = "epsilon"
    """What the network outputs: "epsilon" (the noise, as in the seed) or "v"
    (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022)."""

    min_snr_gamma: float = 0.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023); 0 turns it off, 5 is the paper's value."""

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {self.num_train_timesteps!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not 0.0 < self.beta_start < 1.0:
            raise ValueError(f"beta_start must be in (0, 1), got {self.beta_start!r}")
        if not 0.0 < self.beta_end < 1.0:
            raise ValueError(f"beta_end must be in (0, 1), got {self.beta_end!r}")
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be >= beta_start ({self.beta_start})")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if not self.min_snr_gamma >= 0.0:
            raise ValueError(f"min_snr_gamma must be >= 0 (0 = off), got {self.min_snr_gamma!r}")


# Named schedules, so the published constants live in one place rather than in every YAML.
SCHEDULE_PRESETS: dict[str, ScheduleConfig] = {
    # Ho et al. 2020, sec. 4.
    "ddpm": ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    # Rombach et al. 2022 (LDM) and Stable Diffusion 1.x.
    "ldm": ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    # Nichol & Dhariwal 2021.
    "cosine": ScheduleConfig(beta_schedule="cosine"),
}


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """The (N,) float64 betas of `config`'s schedule."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2

    def alpha_bar(s: float) -> float:  # s in [0, 1] is the fraction of the chain done
        return math.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), COSINE_MAX_BETA) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def posterior_coefficients(alpha_bar_t, alpha_bar_prev):
    """Coefficients of q(z_prev | x0, z_t) between any two points of the chain.

    Returns `(coef_x0, coef_zt, variance)` with mean = coef_x0 * x0 + coef_zt * z_t (Ho et al. 2020,
    eq. 7, with the one-step alpha replaced by alpha_bar_t / alpha_bar_prev so that it also holds
    between the strided timesteps of a shortened sampler). Works on floats or tensors alike.
    """
    alpha_step = alpha_bar_t / alpha_bar_prev
    beta_step = 1 - alpha_step
    coef_x0 = alpha_bar_prev**0.5 * beta_step / (1 - alpha_bar_t)
    coef_zt = alpha_step**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_step
    return coef_x0, coef_zt, variance


class NoiseSchedule:
    """The fixed forward process of a `ScheduleConfig`, as float64 tensors on the CPU.

    Attributes: `config`, `betas`, `alphas`, `alphas_cumprod` (each (N,) float64).
    Methods take `t` as a (B,) long tensor and broadcast per-sample coefficients over the remaining
    dimensions; coefficients are gathered in float64 and cast to the input's dtype.
    """

    def __init__(self, config: ScheduleConfig):
        self.config = config
        self.betas = make_betas(config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # abar before step 0 is 1 (no noise yet): the posterior at t = 0 then returns x0 exactly.
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t], cast to like's dtype and device, shaped (B, 1, ..., 1) to broadcast over like."""
        # Cast on the CPU before moving: some devices (MPS) have no float64.
        picked = values[t.cpu()].to(like.dtype).to(like.device)
        return picked.view(-1, *([1] * (like.dim() - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at each timestep of t, (B,) float64."""
        alpha_bar = self.alphas_cumprod[t.cpu()]
        return alpha_bar / (1 - alpha_bar)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample z_t ~ q(z_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) by reparameterisation."""
        alpha_bar = self._at(self.alphas_cumprod, t, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def posterior(self, x0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(z_{t-1} | x0, z_t) (Ho et al. 2020, eq. 7; the seed's is garbled).

        The variance is broadcastable to x0, (B, 1, ..., 1). At t = 0 the mean is x0 and the
        variance 0: the last reverse step lands on the data.
        """
        coef_x0, coef_zt, variance = posterior_coefficients(
            self._at(self.alphas_cumprod, t, x0), self._at(self.alphas_cumprod_prev, t, x0)
        )
        return coef_x0 * x0 + coef_zt * z_t, variance

    def eps_and_x0(
        self, model_output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert the network's output at (z_t, t) into its implied noise and clean sample."""
        alpha_bar = self._at(self.alphas_cumprod, t, z_t)
        signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if self.prediction_type == "epsilon":
            eps = model_output
            return eps, (z_t - sigma * eps) / signal
        # v = signal * eps - sigma * x0 and z_t = signal * x0 + sigma * eps, with signal^2 + sigma^2 = 1.
        return signal * model_output + sigma * z_t, signal * z_t - sigma * model_output

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for z_t = q_sample(x0, t, noise): the noise, or v."""
        if self.prediction_type == "epsilon":
            return noise
        alpha_bar = self._at(self.alphas_cumprod, t, x0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0

    def to_dict(self) -> dict:
        """The schedule's config as a JSON-serialisable dict (the betas are derived from it)."""
        return asdict(self.config)

    @classmethod
    def from_dict(cls, data: dict) -> "NoiseSchedule":
        """Rebuild a schedule from `to_dict`'s output; unknown keys are an error naming them."""
        known = {f.name for f in fields(ScheduleConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown noise schedule keys {unknown}; known: {sorted(known)}")
        return cls(ScheduleConfig(**data))


def loss_weight(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (B,) float64: all ones, or min-SNR-gamma weights (Hang et al. 2023).

    Min-SNR caps the weight of low-noise timesteps, whose easy targets otherwise dominate the
    gradient. Expressed on the eps-loss the weight is min(snr, g) / snr; the v-loss already carries
    a factor (snr + 1), hence min(snr, g) / (snr + 1).
    """
    gamma = schedule.config.min_snr_gamma
    if gamma <= 0:
        return torch.ones(t.shape[0], dtype=torch.float64)
    snr = schedule.snr(t)
    capped = snr.clamp(max=gamma)
    return capped / snr if schedule.prediction_type == "epsilon" else capped / (snr + 1)


def training_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cond: Conditioning,
    *,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The seed's simple loss E ||target - model(z_t, t, c)||^2, as a scalar.

    Draws t ~ Uniform{0..N-1} (the seed's n ~ Uniform{1..N}) and noise per sample from `generator`
    (on its device; the default generator on the CPU when None), unless given as `t` (B,) and
    `noise` (shaped like x0), noises x0 to z_t and regresses the model output onto the noise (or
    v). Conditioning dropout is the caller's job (`drop_to_null`), so the loss sees whichever
    condition it is given.
    """
    batch = x0.shape[0]
    rng_device = generator.device if generator is not None else torch.device("cpu")
    if t is None:
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator, device=rng_device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=rng_device, dtype=x0.dtype)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    t = t.to(x0.device)
    z_t = schedule.q_sample(x0, t, noise)
    output = model_fn(z_t, t, cond)
    target = schedule.training_target(x0, noise, t)
    # At least float32: a bf16 model's squared errors are summed over many elements.
    loss_dtype = torch.promote_types(output.dtype, torch.float32)
    per_sample = (output.to(loss_dtype) - target.to(loss_dtype)).pow(2).flatten(1).mean(dim=1)  # (B,)
    weight = loss_weight(schedule, t).to(per_sample.dtype).to(per_sample.device)
    return (weight * per_sample).mean()
