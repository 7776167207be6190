"""The numbers of DDPM as numpy arrays; every backend does its tensor arithmetic on them.

Formulas follow DDPM (Ho et al. 2020), improved DDPM (Nichol & Dhariwal 2021) and
DiT's ``gaussian_diffusion.py`` / ``respace.py``:

* betas: linear from 1e-4 to 0.02 over T = 1000 steps (scaled for other T);
* epsilon prediction; with ``learn_sigma`` the model also outputs ``v`` in
  [-1, 1] interpolating log-variance between the clipped posterior variance and
  beta_t (the "learned range"), trained with the hybrid loss MSE + VB;
* respacing (``"250"``, ``"ddim50"``, ``"10,15,20"``) keeps a subset S of the
  timesteps and recomputes betas so that alpha_bar is unchanged on S; the model
  is still called with the ORIGINAL timestep, ``timestep_map[i]``.

All arrays are float64 of shape [num_timesteps]; backends cast them (to
float32) when they index them with a batch of timesteps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class ScheduleError(ValueError):
    """A schedule or respacing request that cannot be built."""


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DDPM's linear schedule, scaled so any T spans the same noise range as T = 1000."""
    if num_timesteps < 1:
        raise ScheduleError(f"num_timesteps = {num_timesteps}, expected at least 1")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2).

    It destroys information more slowly than the linear one, which matters for small
    images (32x32 and below) where most linear-schedule timesteps are nearly pure noise.
    """
    if num_timesteps < 1:
        raise ScheduleError(f"num_timesteps = {num_timesteps}, expected at least 1")

    def alpha_bar(t):
        return math.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


NOISE_SCHEDULES = ("linear", "cosine")


def named_betas(name: str, num_timesteps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise ScheduleError(f"unknown noise schedule '{name}'; allowed: {', '.join(NOISE_SCHEDULES)}")


@dataclass(frozen=True)
class DiffusionSchedule:
    """Every per-timestep coefficient of a (possibly respaced) Gaussian diffusion.

    ``timestep_map[i]`` is the original timestep the model sees at index i.
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    learn_sigma: bool = True

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ScheduleError(f"betas must be a non-empty 1-D array, found shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ScheduleError("betas must lie in (0, 1]")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "timestep_map", np.asarray(self.timestep_map, dtype=np.int64))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    # -- q(x_t | x_0) ------------------------------------------------------------------
    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(self.alphas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def alphas_cumprod_next(self) -> np.ndarray:
        return np.append(self.alphas_cumprod[1:], 0.0)

    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)

    @property
    def sqrt_recip_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod)

    @property
    def sqrt_recipm1_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod - 1.0)

    # -- q(x_{t-1} | x_t, x_0) -----------------------------------------------------------
    @property
    def posterior_variance(self) -> np.ndarray:
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """log of the posterior variance; index 0 (variance 0) borrows index 1's value."""
        variance = self.posterior_variance
        if len(variance) == 1:
            return np.log(self.betas)
        return np.log(np.append(variance[1], variance[1:]))

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Coefficient of x_0 in the posterior mean."""
        return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Coefficient of x_t in the posterior mean."""
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)

    # -- model variance bounds -------------------------------------------------------------
    @property
    def log_betas(self) -> np.ndarray:
        """Upper end of the learned log-variance range."""
        return np.log(self.betas)

    @property
    def fixed_large_variance(self) -> np.ndarray:
        """Variance used when sigma is not learned (DiT's FIXED_LARGE): beta_t, with t=0 set
        to the posterior variance at 1 for a better decoder log-likelihood."""
        if len(self.betas) == 1:
            return self.betas.copy()
        return np.append(self.posterior_variance[1], self.betas[1:])

    @property
    def fixed_large_log_variance(self) -> np.ndarray:
        return np.log(self.fixed_large_variance)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every per-timestep array by name, as float32 (what backends upload once)."""
        names = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2", "log_betas", "fixed_large_log_variance")
        return {name: getattr(self, name).astype(np.float32) for name in names}


def make_schedule(num_timesteps: int = 1000, noise_schedule: str = "linear", learn_sigma: bool = True) -> DiffusionSchedule:
    """The full (training) schedule."""
    betas = named_betas(noise_schedule, num_timesteps)
    return DiffusionSchedule(betas, np.arange(num_timesteps), learn_sigma)


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """Which original timesteps to keep (improved DDPM's respacing rule).

    ``"ddimN"`` takes a constant stride giving exactly N steps (DDIM paper);
    ``"N"`` or ``"a,b,c"`` splits [0, T) into equal sections and takes the given
    count from each, evenly spaced with the endpoints included.
    """
    text = str(section_counts).strip()
    if text.startswith("ddim"):
        try:
            desired = int(text[len("ddim"):])
        except ValueError:
            raise ScheduleError(f"timestep respacing '{text}': expected 'ddimN' with an integer N") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        if desired == num_timesteps:
            return list(range(num_timesteps))
        raise ScheduleError(f"cannot take exactly {desired} steps with an integer stride from {num_timesteps}")
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ScheduleError(f"timestep respacing '{text}': expected 'N', 'a,b,c' or 'ddimN'") from None
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ScheduleError(f"timestep respacing '{text}': cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respace(schedule: DiffusionSchedule, section_counts: str | int) -> DiffusionSchedule:
    """A schedule over a subset of timesteps with betas chosen so alpha_bar matches on it."""
    use = space_timesteps(schedule.num_timesteps, section_counts)
    alphas_cumprod = schedule.alphas_cumprod
    new_betas, last = [], 1.0
    for t in use:
        new_betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    timestep_map = schedule.timestep_map[np.asarray(use)]
    return DiffusionSchedule(np.asarray(new_betas), timestep_map, schedule.learn_sigma)


def sampling_schedule(schedule: DiffusionSchedule, sampler: str, num_steps: int | None) -> DiffusionSchedule:
    """The respaced schedule a sampler walks: DDPM uses ``"N"``, DDIM ``"ddimN"``."""
    if sampler == "ddpm":
        return respace(schedule, str(num_steps or 250))
    if sampler == "ddim":
        return respace(schedule, f"ddim{num_steps or 50}")
    raise ScheduleError(f"sampler '{sampler}' is not a DDPM sampler; allowed: ddpm, ddim")


def ddim_sigmas(schedule: DiffusionSchedule, eta: float) -> np.ndarray:
    """DDIM's per-step noise scale sigma_t (eta = 0: deterministic, eta = 1: DDPM-like)."""
    ab, ab_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    return eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)


def ddim_direction_coefficients(schedule: DiffusionSchedule, eta: float) -> np.ndarray:
    """DDIM's coefficient of the predicted noise, sqrt(1 - alpha_bar_prev - sigma_t^2), in float64.

    The three terms nearly cancel at the last noisy steps of a short schedule with eta > 0;
    computed in float32 from uploaded alpha_bar_prev and sigma the coefficient is off by
    17% at the last noisy step of a cosine ``ddim10`` schedule with eta = 1, so backends
    upload this array instead.
    """
    remaining = 1.0 - schedule.alphas_cumprod_prev - ddim_sigmas(schedule, eta) ** 2
    return np.sqrt(np.clip(remaining, 0.0, None))


# Constants of the discretised Gaussian decoder likelihood (pixel bins of width 2/255).
HALF_BIN = 1.0 / 255.0
LOG2 = math.log(2.0)
