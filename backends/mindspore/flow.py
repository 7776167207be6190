"""Flow matching (SiT) in MindSpore: the training loss and the Euler / Heun / SDE samplers.

Mirrors ``backends/torch/flow.py``. The numbers come from ``common/flow.py`` (paths, time
grids, and the coefficients that turn the network output into a velocity and a score);
this file only does tensor arithmetic on them. t = 0 is noise and t = 1 is data; the
network sees ``t * flow_time_scale``. A model is any callable ``model(x, t, cond) -> out``
whose first C channels are the prediction (velocity, noise or score).

MindSpore idiom: ``FlowObjective`` is an ``ms.jit_class`` (``losses_from_inputs`` compiles
inside the Graph-mode training step); no ``device`` arguments (MindSpore places tensors by
its global context); no ``dopri5`` (torchdiffeq's adaptive solver exists for PyTorch only).
"""
from __future__ import annotations

from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor

from common.flow import sample_training_times, sampling_plan
from common.objectives import training_inputs
from common.recipe import Recipe, RecipeError

def _per_sample(value, ndim: int):
    return value.reshape((-1,) + (1,) * (ndim - 1))


def _mean_flat(x):
    return x.mean(axis=tuple(range(1, x.ndim)))


def _noise(rng, shape) -> Tensor:
    return Tensor(rng.standard_normal(tuple(shape), dtype=np.float32))


@ms.jit_class
class FlowObjective:
    """MSE flow matching: ``weight * mean((k_out out - k_data x_data - k_noise noise)^2)`` (SiT's losses)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def training_losses(self, model: Callable, x_start, cond, t=None, noise=None) -> dict:
        """x_start [N, C, H, W] (data), cond [N] -> per-image losses {'loss', 'mse'} of shape [N].

        ``t`` [N] times in [0, 1] (tensor or numpy) and ``noise`` like x_start; drawn from
        numpy's unseeded generator when left out (the trainer always passes its seeded draws).
        """
        if t is None:
            t = sample_training_times(self.recipe, np.random.default_rng(), x_start.shape[0])
        t = t.asnumpy().astype(np.float64) if isinstance(t, Tensor) else np.asarray(t, dtype=np.float64)
        inputs = {k: Tensor(v) for k, v in training_inputs(self.recipe, t).items()}
        if noise is None:
            noise = Tensor(np.random.default_rng().standard_normal(x_start.shape, dtype=np.float32))
        return self.losses_from_inputs(model, x_start, cond, inputs, noise)

    def losses_from_inputs(self, model: Callable, x_start, cond, inputs: dict, noise) -> dict:
        """The loss from prepared per-sample coefficients (``common.flow.training_coefficients``)."""
        c = {k: _per_sample(v, x_start.ndim) for k, v in inputs.items() if k != "model_t"}
        x_t = c["alpha"] * x_start + c["sigma"] * noise
        output = model(x_t, inputs["model_t"], cond).astype(ms.float32)[:, : x_start.shape[1]]
        error = c["k_out"] * output - c["k_data"] * x_start - c["k_noise"] * noise
        mse = _mean_flat(error**2)
        return {"loss": inputs["weight"] * mse, "mse": mse}


class FlowSampler:
    """Integrates from noise (t = 0) to data (t = 1). ``sampler``: euler | heun | sde.

    They walk the fixed grid of ``common.flow.sampling_plan``. The SDE draws one noise
    tensor per noisy step, in step order, from the numpy generator given to :meth:`sample`,
    after the initial noise. ``atol`` / ``rtol`` are dopri5's tolerances in the shared
    signature; dopri5 (adaptive, through torchdiffeq) exists in the PyTorch backend only and
    is refused here.
    """

    def __init__(self, recipe: Recipe, sampler: str = "euler", num_steps: int | None = 50,
                 diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step_size: float = 0.04,
                 atol: float = 1e-6, rtol: float = 1e-3):
        if sampler == "dopri5":
            raise RecipeError("flow sampler 'dopri5' (adaptive, through torchdiffeq) exists in the PyTorch backend "
                              "only; the MindSpore backend has euler, heun and sde")
        self.kind, self.recipe = sampler, recipe
        self.plan = sampling_plan(recipe, sampler, num_steps, diffusion_form, diffusion_norm, last_step_size)
        self.model_t, self.dt = Tensor(np.ascontiguousarray(self.plan.model_t)), self.plan.dt.tolist()
        self.v_x, self.v_out = self.plan.v_x.tolist(), self.plan.v_out.tolist()
        self.drift_x, self.drift_out = self.plan.drift_x.tolist(), self.plan.drift_out.tolist()
        self.noise_scale = self.plan.noise_scale.tolist()

    @property
    def num_steps(self) -> int:
        return self.plan.num_steps

    @property
    def nfe(self) -> int:
        return self.plan.nfe

    def _output(self, model_fn, x, i):
        t = self.model_t[i].broadcast_to((x.shape[0],))
        return model_fn(x, t).astype(ms.float32)[:, : x.shape[1]]

    def _velocity(self, model_fn, x, i):
        return self.v_x[i] * x + self.v_out[i] * self._output(model_fn, x, i)

    def sample(self, model_fn: Callable, shape: tuple[int, ...], rng, progress: bool = False):
        """Samples of ``shape`` [N, C, H, W] from noise drawn with ``rng`` (a numpy Generator)."""
        x = _noise(rng, shape)
        steps = range(self.plan.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.kind} {self.plan.nfe} evaluations", leave=False)
        last = self.plan.num_steps - 1
        for i in steps:
            dt = self.dt[i]
            if self.kind == "euler":
                x = x + dt * self._velocity(model_fn, x, i)
            elif self.kind == "heun":
                v = self._velocity(model_fn, x, i)
                predicted = x + dt * v
                x = predicted if i == last else x + 0.5 * dt * (v + self._velocity(model_fn, predicted, i + 1))
            else:  # Euler-Maruyama on dx = [v + D score] dt + sqrt(2 D) dW
                out = self._output(model_fn, x, i)
                x = x + dt * (self.drift_x[i] * x + self.drift_out[i] * out) \
                    + self.noise_scale[i] * _noise(rng, x.shape)
        if self.kind == "sde" and self.plan.last_step_size > 0:  # the noise-free "mean" step to t = 1
            g = self.plan.num_steps
            out = self._output(model_fn, x, g)
            x = x + self.plan.last_step_size * (self.drift_x[g] * x + self.drift_out[g] * out)
        return x
