"""DDPM in MindSpore: the training loss and the DDPM / DDIM samplers with classifier-free guidance.

Mirrors ``backends/torch/diffusion.py``. The numbers come from ``common/diffusion.py``;
this file only does tensor arithmetic on them. A model is any callable
``model(x [N, C, H, W], t [N] original timesteps, y [N](, force_drop_ids)) -> [N, C_out, H, W]``.

MindSpore idiom:

* ``GaussianDiffusion`` and ``DDPMObjective`` are ``ms.jit_class`` classes, so the
  loss compiles inside a Graph-mode ``construct`` (``backends/mindspore/train.py``).
* ``training_losses`` takes the timesteps ``t``, the noise and the label-dropout mask
  as optional inputs: the trainer draws them from a seeded host (numpy) RNG, which
  makes a run reproducible in PyNative and Graph mode alike, resumable from the
  checkpointed generator state, and lets parity tests feed PyTorch's exact draws.
  Left out, they are drawn with MindSpore's RNG (PyNative).
* Samplers draw their noise from a ``numpy.random.Generator`` (host), as PyTorch
  draws from a CPU ``torch.Generator``: a seed gives the same images on any device.
* ``.detach()`` is ``ops.stop_gradient``.
"""
from __future__ import annotations

import math
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from common.diffusion import HALF_BIN, LOG2, DiffusionSchedule, ddim_sigmas, make_schedule, sampling_schedule


def _gather(array, t, ndim: int):
    """array[t] reshaped to [N, 1, 1, 1] for broadcasting over images."""
    return ops.gather(array, t, 0).reshape((-1,) + (1,) * (ndim - 1))


def _mean_flat(x):
    return x.mean(axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * ops.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


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

    def __init__(self, num_timesteps: int = 1000, noise_schedule: str = "linear", learn_sigma: bool = True):
        self.diffusion = GaussianDiffusion(make_schedule(num_timesteps, noise_schedule, learn_sigma))
        self.num_timesteps = num_timesteps
        self.learn_sigma = learn_sigma
        self.vb_scale = num_timesteps / 1000.0  # DiT's RESCALED_MSE: VB scaled by T/1000

    def training_losses(self, model: Callable, x_start, y, t=None, noise=None, force_drop_ids=None):
        """x_start [N, C, H, W], y [N] -> per-image losses {'loss', 'mse'(, 'vb')} of shape [N].

        ``t`` [N] int, ``noise`` like x_start, ``force_drop_ids`` [N] (1 = null label): given
        by the trainer from its host RNG; drawn with MindSpore's RNG when left out.
        """
        d = self.diffusion
        if t is None:
            t = ops.randint(0, self.num_timesteps, (x_start.shape[0],), dtype=ms.int64)
        if noise is None:
            noise = ops.standard_normal(x_start.shape)
        x_t = d.q_sample(x_start, t, noise)
        output = model(x_t, t, y, force_drop_ids).astype(ms.float32)
        channels = x_start.shape[1]
        eps = output[:, :channels]
        mse = _mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            frozen = ops.concat([ops.stop_gradient(eps), output[:, channels:]], 1)
            vb = d.vb_terms_bpd(frozen, x_start, x_t, t) * self.vb_scale
            return {"loss": mse + vb, "mse": mse, "vb": vb}
        return {"loss": mse, "mse": mse}


# ---- sampling ----------------------------------------------------------------------

def guided_model(model, y, cfg_scale: float, null_class: int) -> Callable:
    """``fn(x, t) -> output`` for the current batch x [N, ...] with labels y [N].

    With cfg_scale > 1 the batch is doubled (second half with the null label) and
    ``model.forward_with_cfg`` returns guided eps; the first half is kept.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    y_doubled = ops.concat([y, ops.full_like(y, null_class)])

    def fn(x, t):
        out = model.forward_with_cfg(ops.concat([x, x]), ops.concat([t, t]), y_doubled, cfg_scale)
        return out[: len(x)]

    return fn


def _randn(shape, generator: np.random.Generator | None) -> Tensor:
    """Standard normal noise from a host generator (float32), so a seed gives the same images anywhere."""
    generator = generator if generator is not None else np.random.default_rng()
    return Tensor(generator.standard_normal(shape, dtype=np.float32))


class Sampler:
    """Walks a respaced schedule from noise to images. ``sampler``: ddpm (ancestral) | ddim."""

    def __init__(self, train_schedule: DiffusionSchedule, sampler: str = "ddpm", num_steps: int | None = None,
                 eta: float = 0.0, clip_denoised: bool = False):
        self.kind = sampler
        schedule = sampling_schedule(train_schedule, sampler, num_steps)
        self.diffusion = GaussianDiffusion(schedule)
        self.ddim_sigmas = Tensor(ddim_sigmas(schedule, eta).astype("float32"))
        self.clip_denoised = clip_denoised

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_timesteps

    def step(self, model_fn: Callable, x, i: int, generator: np.random.Generator | None):
        """One reverse step at respaced index i (the model sees the original timestep)."""
        d = self.diffusion
        t = ops.full((x.shape[0],), i, dtype=ms.int64)
        output = model_fn(x, ops.gather(d.timestep_map, t, 0)).astype(ms.float32)
        out = d.p_mean_variance(output, x, t, self.clip_denoised)
        noise = _randn(x.shape, generator) if i > 0 else None
        if self.kind == "ddpm":
            if noise is None:
                return out["mean"]
            return out["mean"] + ops.exp(0.5 * out["log_variance"]) * noise
        alpha_bar_prev = _gather(d.alphas_cumprod_prev, t, x.ndim)
        sigma = _gather(self.ddim_sigmas, t, x.ndim)
        mean = (out["pred_xstart"] * ops.sqrt(alpha_bar_prev)
                + ops.sqrt(ops.clamp(1.0 - alpha_bar_prev - sigma**2, min=0.0)) * out["eps"])
        return mean if noise is None else mean + sigma * noise

    def sample(self, model_fn: Callable, shape: tuple[int, ...], generator: np.random.Generator | None = None,
               progress: bool = False, noise=None):
        """Images of ``shape`` [N, C, H, W] from noise drawn with ``generator`` (or the given ``noise``)."""
        x = _randn(shape, generator) if noise is None else noise
        steps = range(self.num_steps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.kind} {self.num_steps} steps", leave=False)
        for i in steps:
            x = self.step(model_fn, x, i, generator)
        return x
