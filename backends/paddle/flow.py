"""Flow matching (SiT) in PaddlePaddle: the training loss and the Euler / Heun / SDE samplers.

The numbers come from ``common/flow.py`` (paths, time grids, and the coefficients that
turn the network output into a velocity and a score); this file only does tensor
arithmetic on them. t = 0 is noise and t = 1 is data; the network sees
``t * flow_time_scale``. A model is any callable ``model(x, t, cond) -> out`` whose first
C channels are the prediction (velocity, noise or score).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import paddle

from common.flow import sample_training_times, sampling_plan
from common.objectives import training_inputs
from common.recipe import Recipe, RecipeError

# The fixed-grid samplers; dopri5 is torchdiffeq's adaptive solver and exists in the PyTorch backend only.
SAMPLERS = ("euler", "heun", "sde")


def _per_sample(value: paddle.Tensor, ndim: int) -> paddle.Tensor:
    return value.reshape([-1, *([1] * (ndim - 1))])


def _mean_flat(x: paddle.Tensor) -> paddle.Tensor:
    return x.mean(axis=list(range(1, x.ndim)))


def _noise(rng, shape, device) -> paddle.Tensor:
    return paddle.to_tensor(rng.standard_normal(tuple(shape), dtype="float32"), place=device)


class FlowObjective:
    """MSE flow matching: ``weight * mean((k_out out - k_data x_data - k_noise noise)^2)`` (SiT's losses)."""

    def __init__(self, recipe: Recipe, device: str | None = None):
        self.recipe = recipe
        self.device = device

    def training_losses(self, model: Callable, x_start: paddle.Tensor, cond, t=None, noise=None) -> dict[str, paddle.Tensor]:
        """x_start [N, C, H, W] (data), cond [N] -> per-image losses {'loss', 'mse'} of shape [N].

        ``t`` [N] times in [0, 1] (tensor or numpy) and ``noise`` like x_start; drawn from
        numpy's unseeded generator when left out (the trainer always passes its seeded draws).
        """
        if t is None:
            t = sample_training_times(self.recipe, np.random.default_rng(), x_start.shape[0])
        t = t.astype("float64").numpy() if isinstance(t, paddle.Tensor) else np.asarray(t, dtype=np.float64)
        inputs = {k: paddle.to_tensor(v, place=x_start.place) for k, v in training_inputs(self.recipe, t).items()}
        if noise is None:
            noise = paddle.randn_like(x_start)
        return self.losses_from_inputs(model, x_start, cond, inputs, noise)

    def losses_from_inputs(self, model: Callable, x_start, cond, inputs: dict, noise) -> dict[str, paddle.Tensor]:
        """The loss from prepared per-sample coefficients (``common.flow.training_coefficients``)."""
        c = {k: _per_sample(v, x_start.ndim) for k, v in inputs.items() if k != "model_t"}
        x_t = c["alpha"] * x_start + c["sigma"] * noise
        output = model(x_t, inputs["model_t"], cond).astype("float32")[:, : x_start.shape[1]]
        error = c["k_out"] * output - c["k_data"] * x_start - c["k_noise"] * noise
        mse = _mean_flat(error**2)
        return {"loss": inputs["weight"] * mse, "mse": mse}


class FlowSampler:
    """Integrates from noise (t = 0) to data (t = 1). ``sampler``: euler | heun | sde.

    They walk the fixed grid of ``common.flow.sampling_plan``. The SDE draws one noise
    tensor per noisy step, in step order, from the numpy generator given to
    :meth:`sample`, after the initial noise. ``atol`` and ``rtol`` are dopri5's, which
    Paddle has not: they are taken so that ``objectives.build_sampler`` calls every
    backend alike, and a dopri5 request stops here naming the samplers there are.
    """

    def __init__(self, recipe: Recipe, sampler: str = "euler", num_steps: int | None = 50,
                 diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step_size: float = 0.04,
                 atol: float = 1e-6, rtol: float = 1e-3, device: str | None = None):
        if sampler not in SAMPLERS:
            raise RecipeError(f"sampler '{sampler}' does not exist in the Paddle backend (dopri5, adaptive through "
                              f"torchdiffeq, is PyTorch only); its flow samplers are {', '.join(SAMPLERS)}")
        self.kind, self.recipe, self.device = sampler, recipe, device
        self.plan = sampling_plan(recipe, sampler, num_steps, diffusion_form, diffusion_norm, last_step_size)
        to = lambda a: paddle.to_tensor(np.ascontiguousarray(a), place=device)  # noqa: E731
        self.model_t, self.dt = to(self.plan.model_t), self.plan.dt.tolist()
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
        t = self.model_t[i].expand([x.shape[0]])
        return model_fn(x, t).astype("float32")[:, : x.shape[1]]

    def _velocity(self, model_fn, x, i):
        return self.v_x[i] * x + self.v_out[i] * self._output(model_fn, x, i)

    @paddle.no_grad()
    def sample(self, model_fn: Callable, shape: tuple[int, ...], rng, device: str | None = None,
               progress: bool = False) -> paddle.Tensor:
        """Samples of ``shape`` [N, C, H, W] from noise drawn with ``rng`` (a numpy Generator)."""
        x = _noise(rng, shape, device)
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
                    + self.noise_scale[i] * _noise(rng, x.shape, x.place)
        if self.kind == "sde" and self.plan.last_step_size > 0:  # the noise-free "mean" step to t = 1
            g = self.plan.num_steps
            out = self._output(model_fn, x, g)
            x = x + self.plan.last_step_size * (self.drift_x[g] * x + self.drift_out[g] * out)
        return x
