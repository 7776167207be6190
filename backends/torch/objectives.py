"""The objective plug-ins of the PyTorch backend: build the loss and the sampler a recipe names.

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
import torch

from backends.torch.diffusion import DDPMObjective, DDPMSampler
from backends.torch.flow import FlowObjective, FlowSampler
from common.conditions import null_condition
from common.objectives import SamplerSettings
from common.recipe import Recipe
from common.spec import DiRSpec


def build_objective(recipe: Recipe, learn_sigma: bool, device: torch.device | str = "cpu"):
    """The training objective of ``recipe`` (DDPM or flow matching)."""
    if recipe.objective == "ddpm":
        return DDPMObjective(recipe, learn_sigma, device)
    return FlowObjective(recipe, device)


def build_sampler(recipe: Recipe, learn_sigma: bool, settings: SamplerSettings, device: torch.device | str = "cpu"):
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
    doubled = torch.cat([cond, null_cond])

    def fn(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), doubled)
        conditional, unconditional = out.chunk(2, dim=0)
        guided = unconditional[:, :channels] + cfg_scale * (conditional[:, :channels] - unconditional[:, :channels])
        return torch.cat([guided, conditional[:, channels:]], dim=1)

    return fn


@torch.no_grad()
def generate(model, spec: DiRSpec, recipe: Recipe, settings: SamplerSettings, cond: np.ndarray,
             rng: np.random.Generator, device, precision: str = "fp32",
             null_cond: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Samples for the conditions ``cond`` [N, ...] as float32 numpy [N, C, H, W] (latents undecoded),
    and the number of network evaluations it took (per image; guidance doubles the batch, not this).
    Guidance pairs ``cond`` with ``null_cond`` (default the model's null condition; for captions a
    negative prompt's ids)."""
    sampler = build_sampler(recipe, spec.learn_sigma, settings, device)
    y = torch.from_numpy(np.asarray(cond)).to(device)
    null = torch.from_numpy(null_condition(spec, len(cond)) if null_cond is None else null_cond).to(device) if settings.cfg_scale != 1.0 else None
    fn = guided_model(model, y, null, settings.cfg_scale, spec.in_channels)
    shape = (len(cond), spec.in_channels, spec.input_size, spec.input_size)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        x = sampler.sample(fn, shape, rng, device)
    return x.float().cpu().numpy(), sampler.nfe
