"""Noise schedules of DDPM-style diffusion and the tables its training and sampling read.

Convention: steps t = 0 .. T-1. beta[t] is the variance added at step t, alpha[t] = 1 - beta[t] and
alpha_bar[t] = prod_{s <= t} alpha[s], so a noised sample is x_t = sqrt(alpha_bar[t]) x_0 + sqrt(1 - alpha_bar[t]) eps.
alpha_bar decreases strictly from alpha_bar[0] = 1 - beta[0] (close to 1) towards 0 at t = T-1. Tables are float64
tensors of shape (T,) on the CPU (cast and moved by the caller).
"""
import math
from dataclasses import dataclass

import torch

COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta[0] from being vanishingly small
MAX_BETA = 0.999  # their clip on the cosine betas, which avoids the singularity at t = T


def _check_timesteps(timesteps):
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 2:
        raise ValueError(f"timesteps must be an int >= 2, got {timesteps!r}")


def linear_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02):
    """DDPM's (Ho et al. 2020) schedule: betas (T,) float64 evenly spaced from beta_start to beta_end."""
    _check_timesteps(timesteps)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    if beta_start > beta_end:
        raise ValueError(f"beta_start must be <= beta_end, got beta_start={beta_start} and beta_end={beta_end}")
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_alpha_bar(timesteps):
    """Nichol & Dhariwal's (2021) alpha_bar (T + 1,) float64 at the times 0, 1/T, ..., 1: f(t) / f(0) with
    f(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008; it runs from 1 to 0."""
    _check_timesteps(timesteps)
    times = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((times + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return f / f[0]


def cosine_beta_schedule(timesteps):
    """Nichol & Dhariwal's cosine schedule: betas (T,) float64, beta[t] = 1 - abar(t+1)/abar(t) of cosine_alpha_bar,
    clipped at 0.999 (only the last one or two steps reach the clip)."""
    bars = cosine_alpha_bar(timesteps)
    return (1 - bars[1:] / bars[:-1]).clamp(max=MAX_BETA)


def alpha_bars(betas):
    """alpha_bar (T,) = cumprod(1 - betas) in float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


@dataclass(frozen=True)
class Schedule:
    """betas, alphas, alpha_bars: (T,) float64 tables (see the module docstring)."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bars: torch.Tensor

    @property
    def timesteps(self):
        return self.betas.shape[0]


def make_schedule(kind, timesteps, beta_start=None, beta_end=None):
    """The Schedule of kind "linear" (beta_start/beta_end default to DDPM's 1e-4 and 0.02) or "cosine" (which takes
    no betas: passing them is a ValueError)."""
    if kind == "linear":
        betas = linear_beta_schedule(timesteps, 1e-4 if beta_start is None else beta_start,
                                     0.02 if beta_end is None else beta_end)
    elif kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError(f"the cosine schedule takes no beta_start or beta_end, got beta_start={beta_start!r} "
                             f"and beta_end={beta_end!r}")
        betas = cosine_beta_schedule(timesteps)
    else:
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")
    return Schedule(betas, 1.0 - betas, alpha_bars(betas))


def ddim_timesteps(timesteps, num_steps):
    """The DDIM subsequence: num_steps distinct steps (LongTensor, descending) from T-1 down to 0, evenly spaced
    ("trailing" spacing: the first step is always T-1, where training put pure noise's statistics)."""
    _check_timesteps(timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= timesteps:
        raise ValueError(f"num_steps must be an int in [1, timesteps={timesteps}], got {num_steps!r}")
    # T-1, T-1-T/n, ..., rounded; distinct because the spacing T/n >= 1
    steps = torch.round(torch.arange(num_steps, 0, -1, dtype=torch.float64) * timesteps / num_steps) - 1
    return steps.long()
