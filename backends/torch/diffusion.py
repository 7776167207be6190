"""DDPM in PyTorch: the training loss and the DDPM / DDIM samplers with classifier-free guidance.

The numbers come from ``common/diffusion.py``; this file only does tensor
arithmetic on them. The objective lives apart from the model: a model is any
callable ``model(x [N, C, H, W], t [N] original timesteps, y [N]) -> [N, C_out, H, W]``
(C_out = 2C when sigma is learned), so a flow-matching objective can sit beside
this one without touching the network.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from common.diffusion import HALF_BIN, LOG2, DiffusionSchedule, ddim_sigmas, make_schedule, sampling_schedule


def _gather(array: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """array[t] reshaped to [N, 1, 1, 1] for broadcasting over images."""
    return array[t].reshape(-1, *([1] * (ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data x in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales))."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + HALF_BIN))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """A (possibly respaced) DDPM schedule on a device, with the math that uses it."""

    def __init__(self, schedule: DiffusionSchedule, device: torch.device | str = "cpu"):
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps
        self.learn_sigma = schedule.learn_sigma
        for name, array in schedule.arrays().items():
            setattr(self, name, torch.from_numpy(array).to(device))
        self.timestep_map = torch.from_numpy(schedule.timestep_map).to(device)

    # -- forward process -------------------------------------------------------------
    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return (_gather(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior(self, x_start, x_t, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_gather(self.posterior_mean_coef1, t, x_t.ndim) * x_start
                + _gather(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        return mean, _gather(self.posterior_log_variance_clipped, t, x_t.ndim)

    def predict_xstart(self, x_t, t, eps):
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps(self, x_t, t, x_start):
        return ((_gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x_start)
                / _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    # -- reverse process ---------------------------------------------------------------
    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False):
        """From the raw model output at x_t: mean, log-variance, predicted x_0 and eps.

        With learned sigma the second half of the channels v in [-1, 1] interpolates
        log-variance between the clipped posterior variance and beta_t.
        """
        channels = x_t.shape[1]
        if self.learn_sigma:
            eps, var_values = model_output[:, :channels], model_output[:, channels:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t.ndim)
            max_log = _gather(self.log_betas, t, x_t.ndim)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            eps = model_output
            log_variance = _gather(self.fixed_large_log_variance, t, x_t.ndim).expand_as(x_t)
        x_start = self.predict_xstart(x_t, t, eps)
        if clip_denoised:
            x_start = x_start.clamp(-1.0, 1.0)
            eps = self.predict_eps(x_t, t, x_start)
        mean, _ = self.q_posterior(x_start, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": x_start, "eps": eps}

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """The variational bound term L_t in bits per dim: KL for t > 0, decoder NLL at t = 0."""
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / LOG2
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])) / LOG2
        return torch.where(t == 0, nll, kl)


class DDPMObjective:
    """Epsilon-prediction training on the full schedule; the hybrid loss MSE + VB when sigma
    is learned (the VB term sees a detached eps, so it trains only the variance)."""

    def __init__(self, num_timesteps: int = 1000, noise_schedule: str = "linear", learn_sigma: bool = True,
                 device: torch.device | str = "cpu"):
        self.diffusion = GaussianDiffusion(make_schedule(num_timesteps, noise_schedule, learn_sigma), device)

    def training_losses(self, model: Callable, x_start: torch.Tensor, y: torch.Tensor,
                        t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x_start [N, C, H, W], y [N] -> per-image losses {'loss', 'mse'(, 'vb')} of shape [N].

        Draws t [N] and the noise from the global torch RNG (seeded per process) unless given
        (the cross-framework parity tests pass the same t and noise to every backend).
        """
        d = self.diffusion
        if t is None:
            t = torch.randint(0, d.num_timesteps, (x_start.shape[0],), device=x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = d.q_sample(x_start, t, noise)
        output = model(x_t, t, y).float()
        channels = x_start.shape[1]
        expected = 2 * channels if d.learn_sigma else channels
        if output.shape[1] != expected:
            raise ValueError(f"model output has {output.shape[1]} channels, expected {expected} "
                             f"(learn_sigma={d.learn_sigma}, {channels} input channels)")
        losses = {"mse": _mean_flat((noise - output[:, :channels]) ** 2)}
        if d.learn_sigma:
            frozen = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
            # DiT's RESCALED_MSE: the VB term is scaled by T/1000 (1 for T = 1000).
            losses["vb"] = d.vb_terms_bpd(frozen, x_start, x_t, t) * (d.num_timesteps / 1000.0)
            losses["loss"] = losses["mse"] + losses["vb"]
        else:
            losses["loss"] = losses["mse"]
        return losses


def build_objective(config: dict, learn_sigma: bool, device) -> DDPMObjective:
    """The training objective a config names (``objective`` key). A flow-matching objective
    (SiT / rectified flow) slots in here with the same ``training_losses`` signature."""
    if config["objective"] == "ddpm":
        return DDPMObjective(config["diffusion_steps"], config["noise_schedule"], learn_sigma, device)
    raise ValueError(f"unknown objective '{config['objective']}'; allowed: ddpm")


# ---- sampling ----------------------------------------------------------------------

def guided_model(model, y: torch.Tensor, cfg_scale: float, null_class: int) -> Callable:
    """``fn(x, t) -> output`` for the current batch x [N, ...] with labels y [N].

    With cfg_scale > 1 the batch is doubled (second half with the null label) and
    ``model.forward_with_cfg`` returns guided eps; the first half is kept.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    y_doubled = torch.cat([y, torch.full_like(y, null_class)])

    def fn(x, t):
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y_doubled, cfg_scale)
        return out[: len(x)]

    return fn


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Noise drawn on the CPU generator then moved, so a seed gives the same images on any device."""
    return torch.randn(shape, generator=generator).to(device)


class Sampler:
    """Walks a respaced schedule from noise to images. ``sampler``: ddpm (ancestral) | ddim."""

    def __init__(self, train_schedule: DiffusionSchedule, sampler: str = "ddpm", num_steps: int | None = None,
                 eta: float = 0.0, clip_denoised: bool = False, device: torch.device | str = "cpu"):
        self.kind = sampler
        schedule = sampling_schedule(train_schedule, sampler, num_steps)
        self.diffusion = GaussianDiffusion(schedule, device)
        self.ddim_sigmas = torch.from_numpy(ddim_sigmas(schedule, eta).astype("float32")).to(device)
        self.clip_denoised = clip_denoised

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_timesteps

    def step(self, model_fn: Callable, x: torch.Tensor, i: int, generator: torch.Generator | None):
        """One reverse step at respaced index i (the model sees the original timestep)."""
        d = self.diffusion
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        output = model_fn(x, d.timestep_map[t]).float()
        out = d.p_mean_variance(output, x, t, self.clip_denoised)
        noise = _randn(x.shape, generator, x.device) if i > 0 else None
        if self.kind == "ddpm":
            if noise is None:
                return out["mean"]
            return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise
        alpha_bar_prev = _gather(d.alphas_cumprod_prev, t, x.ndim)
        sigma = _gather(self.ddim_sigmas, t, x.ndim)
        mean = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                + torch.sqrt((1.0 - alpha_bar_prev - sigma**2).clamp(min=0.0)) * out["eps"])
        return mean if noise is None else mean + sigma * noise

    @torch.no_grad()
    def sample(self, model_fn: Callable, shape: tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
        """Images of ``shape`` [N, C, H, W] from noise drawn with ``generator``."""
        x = _randn(shape, generator, device)
        steps = range(self.num_steps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.kind} {self.num_steps} steps", leave=False)
        for i in steps:
            x = self.step(model_fn, x, i, generator)
        return x
