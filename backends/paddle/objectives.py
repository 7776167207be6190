"""The objective plug-ins of the Paddle backend: build the loss and the sampler a recipe names.

``build_objective(recipe)`` returns an object with
``training_losses(model, x_start, cond, t=None, noise=None)`` and
``losses_from_inputs(model, x_start, cond, inputs, noise)``, both returning per-image
terms (``loss``, ``mse``, and ``vb`` for DDPM with learned sigma). ``build_sampler(recipe,
settings)`` returns an object with ``sample(model_fn, shape, rng, device)``. Classifier-free
guidance (:func:`guided_model`) is shared by every objective: it guides the first C output
channels, whatever they predict. Adding an objective means a numpy part in ``common/``, a
tensor part beside ``diffusion.py`` and ``flow.py``, and one branch in each function here.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import paddle

from backends.paddle.diffusion import DDPMObjective, DDPMSampler
from backends.paddle.flow import FlowObjective, FlowSampler
from common.conditions import null_condition
from common.objectives import SamplerSettings
from common.recipe import Recipe
from common.spec import DiRSpec


def build_objective(recipe: Recipe, learn_sigma: bool, device: str | None = None):
    """The training objective of ``recipe`` (DDPM or flow matching)."""
    if recipe.objective == "ddpm":
        return DDPMObjective(recipe, learn_sigma, device)
    return FlowObjective(recipe, device)


def build_sampler(recipe: Recipe, learn_sigma: bool, settings: SamplerSettings, device: str | None = None):
    """The sampler ``settings`` name, for weights trained with ``recipe``."""
    if recipe.objective == "ddpm":
        return DDPMSampler(recipe, learn_sigma, settings.sampler, settings.steps, settings.eta,
                           settings.clip_denoised, device)
    return FlowSampler(recipe, settings.sampler, settings.steps, settings.sde_diffusion_form,
                       settings.sde_diffusion_norm, settings.sde_last_step_size, settings.ode_atol,
                       settings.ode_rtol, device)


def guided_model(model: Callable, cond, null_cond, cfg_scale: float, channels: int) -> Callable:
    """``fn(x, t) -> output`` for the batch x [N, ...] with conditions ``cond`` [N, ...].

    With cfg_scale > 1 the batch is doubled (second half with ``null_cond``) and the first
    ``channels`` output channels become ``uncond + cfg_scale * (cond - uncond)``; the other
    channels (DDPM's variance) are the conditional half's.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, cond)
    doubled = paddle.concat([cond, null_cond])

    def fn(x, t):
        out = model(paddle.concat([x, x]), paddle.concat([t, t]), doubled)
        conditional, unconditional = out.chunk(2, axis=0)
        guided = unconditional[:, :channels] + cfg_scale * (conditional[:, :channels] - unconditional[:, :channels])
        return paddle.concat([guided, conditional[:, channels:]], axis=1)

    return fn


@paddle.no_grad()
def generate(model, spec: DiRSpec, recipe: Recipe, settings: SamplerSettings, cond: np.ndarray,
             rng: np.random.Generator, device: str | None = None, precision: str = "fp32",
             null_cond: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Samples for the conditions ``cond`` [N, ...] as float32 numpy [N, C, H, W] (latents undecoded),
    and the number of network evaluations it took (per image; guidance doubles the batch, not this).
    Guidance pairs ``cond`` with ``null_cond`` (default the model's null condition; for captions a
    negative prompt's ids)."""
    sampler = build_sampler(recipe, spec.learn_sigma, settings, device)
    y = paddle.to_tensor(np.asarray(cond), place=device)
    null = paddle.to_tensor(null_condition(spec, len(cond)) if null_cond is None else null_cond, place=device) if settings.cfg_scale != 1.0 else None
    fn = guided_model(model, y, null, settings.cfg_scale, spec.in_channels)
    shape = (len(cond), spec.in_channels, spec.input_size, spec.input_size)
    # bf16 autocast on accelerators only: Paddle's CPU has no bf16 kernels.
    on_cpu = (device or paddle.device.get_device()).startswith("cpu")
    with paddle.amp.auto_cast(enable=precision == "bf16" and not on_cpu, dtype="bfloat16"):
        x = sampler.sample(fn, shape, rng, device)
    return x.astype("float32").numpy(), sampler.nfe
