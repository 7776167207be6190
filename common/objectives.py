"""The objective contract, framework-free: what each training step draws, what each sampler needs.

An objective (``Recipe.objective``: ``ddpm`` or ``flow``) is a plug-in of three parts:

* here, numpy: :func:`draw_times` and :func:`training_inputs` turn a seeded generator into
  the per-sample inputs of the loss (DDPM: integer timesteps; flow: the coefficients of
  ``common/flow.py``), and :class:`SamplerSettings` names a sampler and its settings;
* in each backend's ``objectives.py``: ``build_objective(recipe)`` and
  ``build_sampler(recipe, settings)``, which dispatch to
* the backend's tensor arithmetic (``diffusion.py`` for DDPM, ``flow.py`` for flow).

Every random draw of a training step (times, noise, condition dropout) is a pure function
of (seed, world size, rank, step, micro-batch) through :func:`step_draws`, in every
backend; so runs are reproducible, resumes are exact without saved RNG states, and two
backends can be compared step for step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from common import flow
from common.recipe import Recipe, RecipeError, check_sampler

# Steps a sampler takes when num_sampling_steps is null.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "euler": 50, "heun": 25, "sde": 100, "dopri5": None}


# ---- training ---------------------------------------------------------------------------------

def draw_times(recipe: Recipe, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] training times: DDPM int64 timesteps in [0, T); flow float64 times in [t0, t1]."""
    if recipe.objective == "ddpm":
        return rng.integers(0, recipe.diffusion_steps, size=n, dtype=np.int64)
    return flow.sample_training_times(recipe, rng, n)


def training_inputs(recipe: Recipe, t) -> dict[str, np.ndarray]:
    """The per-sample inputs of the loss at times ``t`` (what ``losses_from_inputs`` takes).

    DDPM: ``{"t": int64 [N]}`` (the backend gathers its schedule arrays at t); flow: the
    float32 coefficients of :func:`common.flow.training_coefficients`.
    """
    t = np.asarray(t)
    if recipe.objective == "ddpm":
        if not np.issubdtype(t.dtype, np.integer):
            raise RecipeError(f"DDPM timesteps must be integers, found {t.dtype}")
        if t.size and (t.min() < 0 or t.max() >= recipe.diffusion_steps):
            raise RecipeError(f"DDPM timesteps must lie in [0, {recipe.diffusion_steps}), found "
                              f"[{t.min()}, {t.max()}]")
        return {"t": t.astype(np.int64)}
    return flow.training_coefficients(recipe, t)


@dataclass(frozen=True)
class StepDraws:
    """One micro-batch's random draws: loss inputs, noise like the batch, condition dropout."""

    t: np.ndarray
    inputs: dict
    noise: np.ndarray
    drop: np.ndarray  # bool [N]: replace this sample's condition by the null condition


def step_draws(recipe: Recipe, drop_prob: float, shape, seed: int, world_size: int, rank: int,
               step: int, micro: int = 0) -> StepDraws:
    """The draws of micro-batch ``micro`` of optimizer step ``step`` on ``rank``: a pure function
    of its arguments. ``shape`` is the micro-batch's [N, C, H, W]."""
    rng = np.random.default_rng([seed, world_size, rank, step, micro])
    n = int(shape[0])
    t = draw_times(recipe, rng, n)
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    drop = rng.random(n) < drop_prob
    return StepDraws(t, training_inputs(recipe, t), noise, drop)


# ---- sampling ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSettings:
    """A sampler and every setting it reads (recorded in the samples' info.json)."""

    sampler: str
    num_steps: int | None = None  # null: DEFAULT_STEPS[sampler]
    cfg_scale: float = 1.0
    eta: float = 0.0  # DDIM
    clip_denoised: bool = False  # DDPM / DDIM: clip predicted x0 to [-1, 1]
    sde_diffusion_form: str = "sigma"
    sde_diffusion_norm: float = 1.0
    sde_last_step_size: float = flow.DEFAULT_LAST_STEP_SIZE
    ode_atol: float = 1e-6  # dopri5
    ode_rtol: float = 1e-3

    @property
    def steps(self) -> int | None:
        return self.num_steps if self.num_steps is not None else DEFAULT_STEPS[self.sampler]

    def to_dict(self) -> dict:
        return asdict(self)

    def relevant(self, recipe: Recipe) -> dict:
        """The settings that apply to this sampler (for records and log lines)."""
        keys = ["sampler", "cfg_scale"]
        if self.sampler != "dopri5":
            keys.append("num_steps")
        if self.sampler == "ddim":
            keys.append("eta")
        if recipe.objective == "ddpm":
            keys.append("clip_denoised")
        if self.sampler == "sde":
            keys += ["sde_diffusion_form", "sde_diffusion_norm", "sde_last_step_size"]
        if self.sampler == "dopri5":
            keys += ["ode_atol", "ode_rtol"]
        values = {key: getattr(self, key) for key in keys}
        if "num_steps" in values:
            values["num_steps"] = self.steps
        return values


# The sampler of the training grids when ``sample_sampler`` is null.
GRID_SAMPLERS = {"ddpm": "ddim", "flow": "euler"}


# The sampler of ``sample`` when the ``sampler`` key is null.
SAMPLE_SAMPLERS = {"ddpm": "ddpm", "flow": "heun"}


def sample_settings(config: dict, recipe: Recipe) -> SamplerSettings:
    """Sampler settings from a sample config (``common.config.SAMPLE_SCHEMA``)."""
    return SamplerSettings(
        sampler=config["sampler"] or SAMPLE_SAMPLERS[recipe.objective], num_steps=config["num_sampling_steps"], cfg_scale=config["cfg_scale"],
        eta=config["eta"], clip_denoised=config["clip_denoised"],
        sde_diffusion_form=config["sde_diffusion_form"], sde_diffusion_norm=config["sde_diffusion_norm"],
        sde_last_step_size=config["sde_last_step_size"], ode_atol=config["ode_atol"], ode_rtol=config["ode_rtol"])


def grid_settings(config: dict, recipe: Recipe) -> SamplerSettings:
    """Sampler settings of the training grids (a train config's ``sample_*`` keys)."""
    sampler = config["sample_sampler"] or GRID_SAMPLERS[recipe.objective]
    check_sampler(recipe, sampler, "train config key 'sample_sampler'")
    return SamplerSettings(sampler=sampler, num_steps=config["sample_steps"], cfg_scale=config["sample_cfg_scale"],
                           clip_denoised=config["dataset"] != "latents")


def check_sampling(recipe: Recipe, settings: SamplerSettings, framework: str, source: str = "config") -> None:
    """Stop early when a sampler does not fit the weights' objective or this framework."""
    check_sampler(recipe, settings.sampler, source)
    if settings.sampler == "dopri5" and framework != "torch":
        raise RecipeError(f"{source}: key 'sampler' = 'dopri5' (adaptive, through torchdiffeq) exists in the "
                          f"PyTorch backend only; with {framework} use euler, heun or sde")
    if recipe.objective == "flow" and settings.sampler != "dopri5":
        flow.sampling_plan(recipe, settings.sampler, settings.steps, settings.sde_diffusion_form,
                           settings.sde_diffusion_norm, settings.sde_last_step_size)  # raises on bad settings
