"""DDPM in MindSpore: the training loss (DiT's hybrid loss) and the DDPM / DDIM samplers.

Mirrors ``backends/torch/diffusion.py``. The numbers come from ``common/diffusion.py``;
this file only does tensor arithmetic on them. A model is any callable
``model(x [N, C, H, W], t [N] original timesteps, cond) -> [N, C_out, H, W]``
(C_out = 2C when sigma is learned); the condition is passed through untouched.
Guidance and the choice of objective live in ``backends/mindspore/objectives.py``.

MindSpore idiom:

* ``GaussianDiffusion`` and ``DDPMObjective`` are ``ms.jit_class`` classes, so
  ``losses_from_inputs`` compiles inside a Graph-mode ``construct``
  (``backends/mindspore/train.py``); ``training_losses`` prepares its inputs on the host
  and is called outside compiled code.
* MindSpore places tensors by its global context, so no ``device`` argument.
* ``.detach()`` is ``ops.stop_gradient``.
"""
from __future__ import annotations

import math
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from common.diffusion import (
    HALF_BIN, LOG2, DiffusionSchedule, ddim_direction_coefficients, ddim_sigmas, make_schedule, sampling_schedule,
)
from common.objectives import training_inputs
from common.recipe import Recipe


def _gather(array, t, ndim: int):
    """array[t] reshaped to [N, 1, 1, 1] for broadcasting over images."""
    return ops.gather(array, t, 0).reshape((-1,) + (1,) * (ndim - 1))


def _mean_flat(x):
    return x.mean(axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * ops.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    # 0.5 * (1 + tanh(z)) == sigmoid(2z), written as the sigmoid: MindSpore's fp32 tanh on CPU is off by up to
    # 1e-4 (torch's by 3e-8), which the discretised likelihood at t = 0 turns into a 1e-3 gradient error;
    # its sigmoid is within 1e-6.
    return ops.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data x in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales))."""
    centered = x - means
    inv_stdv = ops.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + HALF_BIN))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - HALF_BIN))
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=1e-12))
    log_one_minus_cdf_min = ops.log(ops.clamp(1.0 - cdf_min, min=1e-12))
    log_cdf_delta = ops.log(ops.clamp(cdf_plus - cdf_min, min=1e-12))
    return ops.where(x < -0.999, log_cdf_plus, ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@ms.jit_class
class GaussianDiffusion:
    """A (possibly respaced) DDPM schedule as MindSpore tensors, with the math that uses it."""

    def __init__(self, schedule: DiffusionSchedule):
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps
        self.learn_sigma = schedule.learn_sigma
        arrays = schedule.arrays()
        self.betas = Tensor(arrays["betas"])
        self.alphas_cumprod = Tensor(arrays["alphas_cumprod"])
        self.alphas_cumprod_prev = Tensor(arrays["alphas_cumprod_prev"])
        self.sqrt_alphas_cumprod = Tensor(arrays["sqrt_alphas_cumprod"])
        self.sqrt_one_minus_alphas_cumprod = Tensor(arrays["sqrt_one_minus_alphas_cumprod"])
        self.sqrt_recip_alphas_cumprod = Tensor(arrays["sqrt_recip_alphas_cumprod"])
        self.sqrt_recipm1_alphas_cumprod = Tensor(arrays["sqrt_recipm1_alphas_cumprod"])
        self.posterior_variance = Tensor(arrays["posterior_variance"])
        self.posterior_log_variance_clipped = Tensor(arrays["posterior_log_variance_clipped"])
        self.posterior_mean_coef1 = Tensor(arrays["posterior_mean_coef1"])
        self.posterior_mean_coef2 = Tensor(arrays["posterior_mean_coef2"])
        self.log_betas = Tensor(arrays["log_betas"])
        self.fixed_large_log_variance = Tensor(arrays["fixed_large_log_variance"])
        self.timestep_map = Tensor(schedule.timestep_map)

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
            log_variance = ops.broadcast_to(_gather(self.fixed_large_log_variance, t, x_t.ndim), x_t.shape)
        x_start = self.predict_xstart(x_t, t, eps)
        if clip_denoised:
            x_start = ops.clamp(x_start, -1.0, 1.0)
            eps = self.predict_eps(x_t, t, x_start)
        mean, _ = self.q_posterior(x_start, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": x_start, "eps": eps}

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """The variational bound term L_t in bits per dim: KL for t > 0, decoder NLL at t = 0."""
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, False)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / LOG2
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])) / LOG2
        return ops.where(t == 0, nll, kl)


@ms.jit_class
class DDPMObjective:
    """Epsilon-prediction training on the full schedule; the hybrid loss MSE + VB when sigma
    is learned (the VB term sees a detached eps, so it trains only the variance)."""

    def __init__(self, recipe: Recipe, learn_sigma: bool):
        self.recipe = recipe
        self.diffusion = GaussianDiffusion(make_schedule(recipe.diffusion_steps, recipe.noise_schedule, learn_sigma))

    def training_losses(self, model: Callable, x_start, cond, t=None, noise=None) -> dict:
        """x_start [N, C, H, W], cond [N] -> per-image losses {'loss', 'mse'(, 'vb')} of shape [N].

        ``t`` [N] integer timesteps (tensor or numpy) and ``noise`` like x_start; drawn from
        numpy's unseeded generator when left out (the trainer always passes its seeded draws).
        """
        if t is None:
            t = np.random.default_rng().integers(0, self.diffusion.num_timesteps, x_start.shape[0])
        t = t.asnumpy() if isinstance(t, Tensor) else np.asarray(t)
        inputs = {k: Tensor(v) for k, v in training_inputs(self.recipe, t).items()}
        if noise is None:
            noise = Tensor(np.random.default_rng().standard_normal(x_start.shape, dtype=np.float32))
        return self.losses_from_inputs(model, x_start, cond, inputs, noise)

    def losses_from_inputs(self, model: Callable, x_start, cond, inputs: dict, noise) -> dict:
        """The loss from prepared inputs (``common.objectives.training_inputs``: ``{'t'}``)."""
        d = self.diffusion
        t = inputs["t"]
        x_t = d.q_sample(x_start, t, noise)
        output = model(x_t, t, cond).astype(ms.float32)
        channels = x_start.shape[1]
        expected = 2 * channels if d.learn_sigma else channels
        if output.shape[1] != expected:
            raise ValueError(f"model output has {output.shape[1]} channels, expected {expected} "
                             f"(learn_sigma={d.learn_sigma}, {channels} input channels)")
        losses = {"mse": _mean_flat((noise - output[:, :channels]) ** 2)}
        if d.learn_sigma:
            frozen = ops.concat([ops.stop_gradient(output[:, :channels]), output[:, channels:]], 1)
            # DiT's RESCALED_MSE: the VB term is scaled by T/1000 (1 for T = 1000).
            losses["vb"] = d.vb_terms_bpd(frozen, x_start, x_t, t) * (d.num_timesteps / 1000.0)
            losses["loss"] = losses["mse"] + losses["vb"]
        else:
            losses["loss"] = losses["mse"]
        return losses


# ---- sampling ----------------------------------------------------------------------

def _noise(rng, shape) -> Tensor:
    """Standard normal float32 noise from a host numpy generator: a seed gives the same images
    in every backend and on every device."""
    return Tensor(rng.standard_normal(tuple(shape), dtype=np.float32))


class DDPMSampler:
    """Walks a respaced schedule from noise to images. ``sampler``: ddpm (ancestral) | ddim.

    Noise: the initial x_T, then one draw per step for ddpm (none at the last) and for ddim
    with eta > 0, in step order, from the numpy generator given to :meth:`sample`.
    """

    def __init__(self, recipe: Recipe, learn_sigma: bool, sampler: str = "ddpm", num_steps: int | None = None,
                 eta: float = 0.0, clip_denoised: bool = False):
        self.kind = sampler
        train = make_schedule(recipe.diffusion_steps, recipe.noise_schedule, learn_sigma)
        schedule = sampling_schedule(train, sampler, num_steps)
        self.diffusion = GaussianDiffusion(schedule)
        self.eta = eta
        self.ddim_sigmas = Tensor(ddim_sigmas(schedule, eta).astype("float32"))
        self.ddim_direction = Tensor(ddim_direction_coefficients(schedule, eta).astype("float32"))
        self.clip_denoised = clip_denoised

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_timesteps

    @property
    def nfe(self) -> int:
        return self.num_steps

    def step(self, model_fn: Callable, x, i: int, rng):
        """One reverse step at respaced index i (the model sees the original timestep)."""
        d = self.diffusion
        t = ops.full((x.shape[0],), i, dtype=ms.int64)
        output = model_fn(x, ops.gather(d.timestep_map, t, 0)).astype(ms.float32)
        out = d.p_mean_variance(output, x, t, self.clip_denoised)
        if self.kind == "ddpm":
            if i == 0:
                return out["mean"]
            return out["mean"] + ops.exp(0.5 * out["log_variance"]) * _noise(rng, x.shape)
        alpha_bar_prev = _gather(d.alphas_cumprod_prev, t, x.ndim)
        mean = (out["pred_xstart"] * ops.sqrt(alpha_bar_prev)
                + _gather(self.ddim_direction, t, x.ndim) * out["eps"])
        if i == 0 or self.eta == 0:
            return mean
        return mean + _gather(self.ddim_sigmas, t, x.ndim) * _noise(rng, x.shape)

    def sample(self, model_fn: Callable, shape: tuple[int, ...], rng, progress: bool = False):
        """Images of ``shape`` [N, C, H, W]: noise, then the reverse steps (``rng``: numpy Generator)."""
        x = _noise(rng, shape)
        steps = range(self.num_steps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.kind} {self.num_steps} steps", leave=False)
        for i in steps:
            x = self.step(model_fn, x, i, rng)
        return x
