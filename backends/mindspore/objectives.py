"""The objective plug-ins of the MindSpore backend: build the loss and the sampler a recipe names.

Mirrors ``backends/torch/objectives.py``. ``build_objective(recipe)`` returns an object with
``training_losses(model, x_start, cond, t=None, noise=None)`` and
``losses_from_inputs(model, x_start, cond, inputs, noise)``, both returning per-image
terms (``loss``, ``mse``, and ``vb`` for DDPM with learned sigma). ``build_sampler(recipe,
settings)`` returns an object with ``sample(model_fn, shape, rng)``. Classifier-free
guidance (:func:`guided_model`) is shared by every objective: it guides the first C output
channels, whatever they predict. Adding an objective means a numpy part in ``common/``, a
tensor part beside ``diffusion.py`` and ``flow.py``, and one branch in each function here.

MindSpore idiom: no ``device`` arguments (MindSpore places tensors by its global context),
and no ``precision`` (bf16 is refused by the adapters: no CPU kernels).
"""
from __future__ import annotations

from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from backends.mindspore.diffusion import DDPMObjective, DDPMSampler
from backends.mindspore.flow import FlowObjective, FlowSampler
from common.conditions import null_condition
from common.objectives import SamplerSettings
from common.recipe import Recipe
from common.spec import DiRSpec


def build_objective(recipe: Recipe, learn_sigma: bool):
    """The training objective of ``recipe`` (DDPM or flow matching)."""
    if recipe.objective == "ddpm":
        return DDPMObjective(recipe, learn_sigma)
    return FlowObjective(recipe)


def build_sampler(recipe: Recipe, learn_sigma: bool, settings: SamplerSettings):
    """The sampler ``settings`` name, for weights trained with ``recipe``."""
    if recipe.objective == "ddpm":
        return DDPMSampler(recipe, learn_sigma, settings.sampler, settings.steps, settings.eta,
                           settings.clip_denoised)
    return FlowSampler(recipe, settings.sampler, settings.steps, settings.sde_diffusion_form,
                       settings.sde_diffusion_norm, settings.sde_last_step_size, settings.ode_atol,
                       settings.ode_rtol)


def guided_model(model: Callable, cond, null_cond, cfg_scale: float, channels: int) -> Callable:
    """``fn(x, t) -> output`` for the batch x [N, ...] with conditions ``cond`` [N, ...].

    With cfg_scale > 1 the batch is doubled (second half with ``null_cond``) and the first
    ``channels`` output channels become ``uncond + cfg_scale * (cond - uncond)``; the other
    channels (DDPM's variance) are the conditional half's.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, cond)
    doubled = ops.concat([cond, null_cond])

    def fn(x, t):
        out = model(ops.concat([x, x]), ops.concat([t, t]), doubled)
        conditional, unconditional = ops.chunk(out, 2, 0)
        guided = unconditional[:, :channels] + cfg_scale * (conditional[:, :channels] - unconditional[:, :channels])
        return ops.concat([guided, conditional[:, channels:]], 1)

    return fn


def generate(model, spec: DiRSpec, recipe: Recipe, settings: SamplerSettings, cond: np.ndarray,
             rng: np.random.Generator, null_cond: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Samples for the conditions ``cond`` [N, ...] as float32 numpy [N, C, H, W] (latents undecoded),
    and the number of network evaluations it took (per image; guidance doubles the batch, not this).
    Guidance pairs ``cond`` with ``null_cond`` (default the model's null condition; for captions a
    negative prompt's ids)."""
    sampler = build_sampler(recipe, spec.learn_sigma, settings)
    y = Tensor(np.asarray(cond))
    null = Tensor(null_condition(spec, len(cond)) if null_cond is None else null_cond) if settings.cfg_scale != 1.0 else None
    fn = guided_model(model, y, null, settings.cfg_scale, spec.in_channels)
    shape = (len(cond), spec.in_channels, spec.input_size, spec.input_size)
    x = sampler.sample(fn, shape, rng)
    return x.astype(ms.float32).asnumpy(), sampler.nfe
