"""The numbers of flow matching (SiT's stochastic interpolants) as numpy; backends do the tensor arithmetic.

Convention (SiT's, and PaddleMIX's port of it): **t = 0 is noise, t = 1 is data**,

    x_t = alpha_t * x_data + sigma_t * noise,        u_t = d_alpha_t * x_data + d_sigma_t * noise

with the paths (``flow_path``)

| path     | alpha_t                               | sigma_t              |
|----------|---------------------------------------|----------------------|
| linear   | t                                     | 1 - t                |
| gvp      | sin(pi t / 2)                         | cos(pi t / 2)        |
| vp       | exp(-(1-t)^2 (b1-b0)/4 - (1-t) b0/2)  | sqrt(1 - alpha_t^2)  |

(VP: b0 = 0.1, b1 = 20). The rectified-flow convention (Stable Diffusion 3, most RF
code) runs the other way: t_rf = 1 - t and v_rf = -v (and x_t = (1 - t_rf) x + t_rf noise
on the linear path).

The network predicts (``flow_prediction``) the velocity u_t, the noise, or the score
grad log p_t(x_t) = -noise / sigma_t. Every quantity a backend needs is affine in the
network output ``out`` and the current state, with per-sample (training) or per-step
(sampling) scalar coefficients computed here in float64:

* training: ``loss = weight * mean((k_out * out - k_data * x_data - k_noise * noise)^2)``
  (:func:`training_coefficients`);
* sampling: ``velocity = v_x * x + v_out * out`` and ``score = s_x * x + s_out * out`` at
  each grid time (:func:`sampling_plan`); Euler, Heun and Euler-Maruyama are written
  with them in each backend in a few lines.

The plain references (:func:`reference_velocity`, :func:`reference_score`) spell the
same quantities out the way SiT's ``path.py`` does; tests tie the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.recipe import FLOW_PATHS, Recipe, RecipeError

VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
FLOW_SAMPLERS = ("euler", "heun", "sde", "dopri5")
DEFAULT_LAST_STEP_SIZE = 0.04  # SiT's "Mean" last step of the SDE


# ---- paths ---------------------------------------------------------------------------------

class FlowPath:
    """alpha_t, sigma_t and their time derivatives for t in [0, 1] (float64 arrays)."""

    def __init__(self, name: str):
        if name not in FLOW_PATHS:
            raise RecipeError(f"unknown flow path '{name}'; allowed: {', '.join(FLOW_PATHS)}")
        self.name = name

    def alpha(self, t):
        t = np.asarray(t, dtype=np.float64)
        if self.name == "linear":
            return t.copy()
        if self.name == "gvp":
            return np.sin(0.5 * np.pi * t)
        return np.exp(self._vp_log_mean(t))

    def d_alpha(self, t):
        t = np.asarray(t, dtype=np.float64)
        if self.name == "linear":
            return np.ones_like(t)
        if self.name == "gvp":
            return 0.5 * np.pi * np.cos(0.5 * np.pi * t)
        return self.alpha(t) * self._vp_d_log_mean(t)

    def sigma(self, t):
        t = np.asarray(t, dtype=np.float64)
        if self.name == "linear":
            return 1.0 - t
        if self.name == "gvp":
            return np.cos(0.5 * np.pi * t)
        # sqrt(1 - e^{2m}) with expm1: the plain form loses every digit as t -> 1 in float32
        return np.sqrt(-np.expm1(2.0 * self._vp_log_mean(t)))

    def d_sigma(self, t):
        t = np.asarray(t, dtype=np.float64)
        if self.name == "linear":
            return -np.ones_like(t)
        if self.name == "gvp":
            return -0.5 * np.pi * np.sin(0.5 * np.pi * t)
        alpha = self.alpha(t)
        return -(alpha**2) * self._vp_d_log_mean(t) / self.sigma(t)

    @staticmethod
    def _vp_log_mean(t):
        s = 1.0 - t
        return -0.25 * s**2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * s * VP_BETA_MIN

    @staticmethod
    def _vp_d_log_mean(t):
        s = 1.0 - t
        return 0.5 * s * (VP_BETA_MAX - VP_BETA_MIN) + 0.5 * VP_BETA_MIN

    def drift_var(self, t):
        """SiT's ``compute_drift`` variance term (d_alpha/alpha) sigma^2 - sigma d_sigma (>= 0)."""
        t = np.asarray(t, dtype=np.float64)
        return self.d_alpha(t) / self.alpha(t) * self.sigma(t) ** 2 - self.sigma(t) * self.d_sigma(t)

    def diffusion(self, t, form: str, norm: float = 1.0):
        """The SDE's D(t) (the noise is sqrt(2 D dt)); SiT's forms."""
        t = np.asarray(t, dtype=np.float64)
        if form == "constant":
            return np.full_like(t, norm)
        if form == "SBDM":
            return norm * self.drift_var(t)
        if form == "sigma":
            return norm * self.sigma(t)
        if form == "linear":
            return norm * (1.0 - t)
        if form == "decreasing":
            return 0.25 * (norm * np.cos(np.pi * t) + 1.0) ** 2
        if form == "increasing-decreasing":
            return norm * np.sin(np.pi * t) ** 2
        raise RecipeError(f"unknown SDE diffusion form '{form}'; allowed: {', '.join(DIFFUSION_FORMS)}")


def _flow_recipe(recipe: Recipe) -> Recipe:
    if recipe.objective != "flow":
        raise RecipeError(f"the recipe's objective is '{recipe.objective}', not 'flow'")
    return recipe


# ---- training ------------------------------------------------------------------------------

def training_interval(recipe: Recipe) -> tuple[float, float]:
    """[t0, t1] that training times are drawn from (SiT's check_interval, training side)."""
    recipe = _flow_recipe(recipe)
    eps = recipe.flow_train_eps
    if recipe.flow_path == "vp":
        return 0.0, 1.0 - eps
    if recipe.flow_prediction != "velocity":
        return eps, 1.0 - eps
    return 0.0, 1.0


def sample_training_times(recipe: Recipe, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] float64 times: uniform, or logit-normal (sigmoid of a normal; SD3), on [t0, t1]."""
    t0, t1 = training_interval(recipe)
    if recipe.flow_time_sampling == "uniform":
        unit = rng.random(n)
    else:
        unit = 1.0 / (1.0 + np.exp(-(recipe.flow_logit_mean + recipe.flow_logit_std * rng.standard_normal(n))))
    return t0 + (t1 - t0) * unit


def training_coefficients(recipe: Recipe, t) -> dict[str, np.ndarray]:
    """Per-sample float32 coefficients of the flow loss at times ``t`` [N]:

    ``alpha``, ``sigma`` (x_t = alpha x_data + sigma noise), ``k_out``, ``k_data``, ``k_noise``
    and ``weight`` with loss = weight * mean((k_out out - k_data x_data - k_noise noise)^2),
    and ``model_t`` (what the network sees: t * flow_time_scale).
    """
    recipe = _flow_recipe(recipe)
    path = FlowPath(recipe.flow_path)
    t = np.asarray(t, dtype=np.float64)
    alpha, sigma, d_alpha, d_sigma = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
    ones, zeros = np.ones_like(t), np.zeros_like(t)
    if recipe.flow_prediction == "velocity":  # the target is u_t; SiT ignores the weighting here
        k_out, k_data, k_noise, weight = ones, d_alpha, d_sigma, ones
    else:
        if recipe.flow_loss_weight == "velocity":
            weight = (path.drift_var(t) / sigma) ** 2
        elif recipe.flow_loss_weight == "likelihood":
            weight = path.drift_var(t) / sigma**2
        else:
            weight = ones
        if recipe.flow_prediction == "noise":  # (out - noise)^2
            k_out, k_data, k_noise = ones, zeros, ones
        else:  # score: (out * sigma + noise)^2
            k_out, k_data, k_noise = sigma, zeros, -ones
    out = {"alpha": alpha, "sigma": sigma, "k_out": k_out, "k_data": k_data, "k_noise": k_noise,
           "weight": weight, "model_t": t * recipe.flow_time_scale}
    return {name: value.astype(np.float32) for name, value in out.items()}


# ---- from the network output to velocity and score ------------------------------------------

def output_coefficients(recipe: Recipe, t) -> dict[str, np.ndarray]:
    """float64 (v_x, v_out, s_x, s_out) with velocity = v_x x + v_out out, score = s_x x + s_out out.

    Derivation: x = alpha x1 + sigma e and u = d_alpha x1 + d_sigma e. A noise prediction
    gives x1 = (x - sigma e) / alpha, hence u = (d_alpha / alpha) x + (d_sigma - d_alpha sigma / alpha) e,
    and score = -e / sigma; a score s gives e = -sigma s; a velocity gives
    e = (alpha u - d_alpha x) / (alpha d_sigma - d_alpha sigma).
    """
    recipe = _flow_recipe(recipe)
    path = FlowPath(recipe.flow_path)
    t = np.asarray(t, dtype=np.float64)
    alpha, sigma, d_alpha, d_sigma = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        if recipe.flow_prediction == "velocity":
            v_x, v_out = np.zeros_like(t), np.ones_like(t)
            det = alpha * d_sigma - d_alpha * sigma  # < 0 on every path
            s_x, s_out = d_alpha / (sigma * det), -alpha / (sigma * det)
        elif recipe.flow_prediction == "noise":
            v_x, v_out = d_alpha / alpha, d_sigma - d_alpha * sigma / alpha
            s_x, s_out = np.zeros_like(t), -1.0 / sigma
        else:
            v_x, v_out = d_alpha / alpha, -sigma * (d_sigma - d_alpha * sigma / alpha)
            s_x, s_out = np.zeros_like(t), np.ones_like(t)
    return {"v_x": v_x, "v_out": v_out, "s_x": s_x, "s_out": s_out}


def reference_velocity(recipe: Recipe, x: np.ndarray, out: np.ndarray, t: float) -> np.ndarray:
    """The velocity at (x, t) from a network output, spelt out as SiT's ``get_drift`` does."""
    path = FlowPath(recipe.flow_path)
    if recipe.flow_prediction == "velocity":
        return out
    score = out / -path.sigma(t) if recipe.flow_prediction == "noise" else out
    return path.d_alpha(t) / path.alpha(t) * x + path.drift_var(t) * score


def reference_score(recipe: Recipe, x: np.ndarray, out: np.ndarray, t: float) -> np.ndarray:
    """The score at (x, t) from a network output, spelt out as SiT's ``get_score`` does."""
    path = FlowPath(recipe.flow_path)
    if recipe.flow_prediction == "noise":
        return out / -path.sigma(t)
    if recipe.flow_prediction == "score":
        return out
    alpha, d_alpha, sigma, d_sigma = path.alpha(t), path.d_alpha(t), path.sigma(t), path.d_sigma(t)
    reverse_ratio = alpha / d_alpha
    variance = sigma**2 - reverse_ratio * d_sigma * sigma
    return (reverse_ratio * out - x) / variance


# ---- sampling ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowSamplingPlan:
    """What a backend's flow sampler walks, all float32 except ``times``.

    ``times`` [G] (float64) are the grid times; step i goes from ``times[i]`` to
    ``times[i + 1]`` (size ``dt[i]``). At grid point i the network sees ``model_t[i]``, and
    ``v_x[i], v_out[i]`` give the velocity. The SDE also uses ``drift_x, drift_out`` (the
    velocity plus D(t) times the score) and ``noise_scale[i] = sqrt(2 D(t_i) dt_i)``; its
    final noise-free "mean" step of size ``last_step_size`` starts at ``times[-1]``.
    """

    kind: str
    times: np.ndarray
    model_t: np.ndarray
    dt: np.ndarray
    v_x: np.ndarray
    v_out: np.ndarray
    drift_x: np.ndarray
    drift_out: np.ndarray
    noise_scale: np.ndarray
    last_step_size: float
    nfe: int  # network evaluations per image (guidance doubles the batch, not this count)

    @property
    def num_steps(self) -> int:
        return len(self.dt)


def sampling_interval(recipe: Recipe, sde: bool = False, diffusion_form: str = "sigma",
                      last_step_size: float = DEFAULT_LAST_STEP_SIZE) -> tuple[float, float]:
    """[t0, t1] a sampler integrates over (SiT's check_interval, sampling side).

    The ODE of a velocity model on the linear or GVP path runs over all of [0, 1]; noise and
    score models stay sample_eps away from both ends; VP stops sample_eps before 1. The SDE
    stops ``last_step_size`` before 1 (its mean step covers the rest) and starts at
    sample_eps where the SBDM diffusion (infinite at 0) or the prediction needs it.
    """
    recipe = _flow_recipe(recipe)
    eps = recipe.flow_sample_eps
    if recipe.flow_path == "vp":
        return 0.0, (1.0 - last_step_size if sde and last_step_size > 0 else 1.0 - eps)
    if recipe.flow_prediction == "velocity" and not sde:
        return 0.0, 1.0
    t0 = eps if (sde and diffusion_form == "SBDM") or recipe.flow_prediction != "velocity" else 0.0
    t1 = 1.0 - last_step_size if sde and last_step_size > 0 else 1.0 - eps
    return t0, t1


def sampling_plan(recipe: Recipe, sampler: str, num_steps: int, diffusion_form: str = "sigma",
                  diffusion_norm: float = 1.0, last_step_size: float = DEFAULT_LAST_STEP_SIZE) -> FlowSamplingPlan:
    """The grid and coefficients of a fixed-step sampler.

    * ``euler``: ``num_steps`` steps, one network evaluation each (NFE = num_steps);
    * ``heun``: ``num_steps`` steps, each corrected by a second evaluation at its end, except
      the last, which is an Euler step (NFE = 2 num_steps - 1, as in EDM);
    * ``sde``: Euler-Maruyama, ``num_steps`` network evaluations in all: num_steps - 1 noisy
      steps over [t0, 1 - last_step_size], then the noise-free "mean" step to 1 (SiT); with
      ``last_step_size = 0``, num_steps noisy steps to 1 - sample_eps and no mean step.
    """
    recipe = _flow_recipe(recipe)
    if sampler not in ("euler", "heun", "sde"):
        raise RecipeError(f"sampler '{sampler}' has no fixed-step plan; allowed: euler, heun, sde")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise RecipeError(f"num_sampling_steps = {num_steps!r}: must be an integer >= 1")
    if sampler == "sde" and num_steps < 2 and last_step_size > 0:
        raise RecipeError("the SDE sampler needs num_sampling_steps >= 2 (noisy steps, then the mean step)")
    if diffusion_form not in DIFFUSION_FORMS:
        raise RecipeError(f"unknown SDE diffusion form '{diffusion_form}'; allowed: {', '.join(DIFFUSION_FORMS)}")
    if not 0.0 <= last_step_size < 0.5:
        raise RecipeError(f"sde_last_step_size = {last_step_size}: must be in [0, 0.5)")
    sde = sampler == "sde"
    t0, t1 = sampling_interval(recipe, sde, diffusion_form, last_step_size)
    steps = num_steps - 1 if sde and last_step_size > 0 else num_steps
    times = np.linspace(t0, t1, steps + 1, dtype=np.float64)
    dt = np.diff(times)
    coef = output_coefficients(recipe, times)
    path = FlowPath(recipe.flow_path)
    if sde:
        diffusion = path.diffusion(times, diffusion_form, diffusion_norm)
        with np.errstate(invalid="ignore"):
            drift_x = coef["v_x"] + diffusion * coef["s_x"]
            drift_out = coef["v_out"] + diffusion * coef["s_out"]
        noise_scale = np.sqrt(2.0 * diffusion[:-1] * dt)
        used = {"drift_x": drift_x, "drift_out": drift_out, "noise_scale": noise_scale}
    else:  # the ODE's drift is the velocity
        drift_x, drift_out, noise_scale = coef["v_x"], coef["v_out"], np.zeros_like(dt)
        used = {"v_x": coef["v_x"], "v_out": coef["v_out"]}
        if sampler == "euler":  # Euler never evaluates at the end of the grid
            used = {name: value[:-1] for name, value in used.items()}
    for name, value in used.items():
        if not np.all(np.isfinite(value)):
            raise RecipeError(f"the {sampler} sampler's coefficient '{name}' is not finite on [{t0}, {t1}] "
                              f"(path {recipe.flow_path}, prediction {recipe.flow_prediction}); "
                              "raise flow_sample_eps")
    nfe = {"euler": steps, "heun": 2 * steps - 1, "sde": num_steps}[sampler]
    f32 = lambda a: np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)  # noqa: E731
    return FlowSamplingPlan(
        kind=sampler, times=times, model_t=(times * recipe.flow_time_scale).astype(np.float32), dt=f32(dt),
        v_x=f32(coef["v_x"]), v_out=f32(coef["v_out"]), drift_x=f32(drift_x), drift_out=f32(drift_out),
        noise_scale=f32(noise_scale), last_step_size=float(last_step_size if sde else 0.0), nfe=nfe)


def velocity_coefficients_at(recipe: Recipe, t: float) -> tuple[float, float, float]:
    """(model_t, v_x, v_out) at one time: what an adaptive solver (dopri5) needs per evaluation."""
    coef = output_coefficients(recipe, np.asarray([t], dtype=np.float64))
    return float(t * recipe.flow_time_scale), float(coef["v_x"][0]), float(coef["v_out"][0])


# ---- plain references of the samplers (numpy, one step at a time) ------------------------------

def reference_sample(recipe: Recipe, model_fn, x: np.ndarray, sampler: str, num_steps: int,
                     rng: np.random.Generator | None = None, diffusion_form: str = "sigma",
                     diffusion_norm: float = 1.0, last_step_size: float = DEFAULT_LAST_STEP_SIZE) -> np.ndarray:
    """The samplers written out in float64 with SiT's formulas (tests tie the backends to it).

    ``model_fn(x, model_t) -> out``. The SDE's noise is drawn from ``rng`` as
    ``rng.standard_normal(x.shape, dtype=float32)`` once per noisy step, the order every
    backend draws it in.
    """
    sde = sampler == "sde"
    t0, t1 = sampling_interval(recipe, sde, diffusion_form, last_step_size)
    steps = num_steps - 1 if sde and last_step_size > 0 else num_steps
    times = np.linspace(t0, t1, steps + 1)
    path = FlowPath(recipe.flow_path)
    x = np.asarray(x, dtype=np.float64)

    def velocity(x, t):
        return reference_velocity(recipe, x, model_fn(x, t * recipe.flow_time_scale), t)

    for i in range(steps):
        t, dt = times[i], times[i + 1] - times[i]
        if sampler == "euler":
            x = x + dt * velocity(x, t)
        elif sampler == "heun":
            v1 = velocity(x, t)
            predicted = x + dt * v1
            x = predicted if i == steps - 1 else x + 0.5 * dt * (v1 + velocity(predicted, times[i + 1]))
        else:
            out = model_fn(x, t * recipe.flow_time_scale)
            drift = reference_velocity(recipe, x, out, t) + path.diffusion(t, diffusion_form, diffusion_norm) \
                * reference_score(recipe, x, out, t)
            noise = rng.standard_normal(x.shape, dtype=np.float32)
            x = x + drift * dt + math.sqrt(2.0 * float(path.diffusion(t, diffusion_form, diffusion_norm)) * dt) * noise
    if sde and last_step_size > 0:
        out = model_fn(x, t1 * recipe.flow_time_scale)
        drift = reference_velocity(recipe, x, out, t1) + path.diffusion(t1, diffusion_form, diffusion_norm) \
            * reference_score(recipe, x, out, t1)
        x = x + drift * last_step_size
    return x
