"""Flow matching (SiT) in PyTorch: the training loss and the Euler / Heun / SDE samplers.

The numbers come from ``common/flow.py`` (paths, time grids, and the coefficients that
turn the network output into a velocity and a score); this file only does tensor
arithmetic on them. t = 0 is noise and t = 1 is data; the network sees
``t * flow_time_scale``. A model is any callable ``model(x, t, cond) -> out`` whose first
C channels are the prediction (velocity, noise or score).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from common.flow import sample_training_times, sampling_plan, velocity_coefficients_at
from common.objectives import training_inputs
from common.recipe import Recipe


def _per_sample(value: torch.Tensor, ndim: int) -> torch.Tensor:
    return value.reshape(-1, *([1] * (ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def _noise(rng, shape, device) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(tuple(shape), dtype="float32")).to(device)


class FlowObjective:
    """MSE flow matching: ``weight * mean((k_out out - k_data x_data - k_noise noise)^2)`` (SiT's losses)."""

    def __init__(self, recipe: Recipe, device: torch.device | str = "cpu"):
        self.recipe = recipe
        self.device = device

    def training_losses(self, model: Callable, x_start: torch.Tensor, cond, t=None, noise=None) -> dict[str, torch.Tensor]:
        """x_start [N, C, H, W] (data), cond [N] -> per-image losses {'loss', 'mse'} of shape [N].

        ``t`` [N] times in [0, 1] (tensor or numpy) and ``noise`` like x_start; drawn from
        numpy's unseeded generator when left out (the trainer always passes its seeded draws).
        """
        if t is None:
            t = sample_training_times(self.recipe, np.random.default_rng(), x_start.shape[0])
        t = t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)
        inputs = {k: torch.from_numpy(v).to(x_start.device) for k, v in training_inputs(self.recipe, t).items()}
        if noise is None:
            noise = torch.randn_like(x_start)
        return self.losses_from_inputs(model, x_start, cond, inputs, noise)

    def losses_from_inputs(self, model: Callable, x_start, cond, inputs: dict, noise) -> dict[str, torch.Tensor]:
        """The loss from prepared per-sample coefficients (``common.flow.training_coefficients``)."""
        c = {k: _per_sample(v, x_start.ndim) for k, v in inputs.items() if k != "model_t"}
        x_t = c["alpha"] * x_start + c["sigma"] * noise
        output = model(x_t, inputs["model_t"], cond).float()[:, : x_start.shape[1]]
        error = c["k_out"] * output - c["k_data"] * x_start - c["k_noise"] * noise
        mse = _mean_flat(error**2)
        return {"loss": inputs["weight"] * mse, "mse": mse}


class FlowSampler:
    """Integrates from noise (t = 0) to data (t = 1). ``sampler``: euler | heun | sde | dopri5.

    euler / heun / sde walk the fixed grid of ``common.flow.sampling_plan``; dopri5 is
    torchdiffeq's adaptive solver (PyTorch only) and counts its network evaluations in
    ``last_nfe``. The SDE draws one noise tensor per noisy step, in step order, from the
    numpy generator given to :meth:`sample`, after the initial noise.
    """

    def __init__(self, recipe: Recipe, sampler: str = "euler", num_steps: int | None = 50,
                 diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step_size: float = 0.04,
                 atol: float = 1e-6, rtol: float = 1e-3, device: torch.device | str = "cpu"):
        self.kind, self.recipe, self.device = sampler, recipe, device
        self.atol, self.rtol = atol, rtol
        self.last_nfe = 0
        self.plan = None
        if sampler != "dopri5":
            self.plan = sampling_plan(recipe, sampler, num_steps, diffusion_form, diffusion_norm, last_step_size)
            to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
            self.model_t, self.dt = to(self.plan.model_t), self.plan.dt.tolist()
            self.v_x, self.v_out = self.plan.v_x.tolist(), self.plan.v_out.tolist()
            self.drift_x, self.drift_out = self.plan.drift_x.tolist(), self.plan.drift_out.tolist()
            self.noise_scale = self.plan.noise_scale.tolist()

    @property
    def num_steps(self) -> int | None:
        return self.plan.num_steps if self.plan is not None else None

    @property
    def nfe(self) -> int:
        return self.plan.nfe if self.plan is not None else self.last_nfe

    def _output(self, model_fn, x, i):
        t = self.model_t[i].expand(x.shape[0])
        return model_fn(x, t).float()[:, : x.shape[1]]

    def _velocity(self, model_fn, x, i):
        return self.v_x[i] * x + self.v_out[i] * self._output(model_fn, x, i)

    @torch.no_grad()
    def sample(self, model_fn: Callable, shape: tuple[int, ...], rng, device: torch.device | str = "cpu",
               progress: bool = False) -> torch.Tensor:
        """Samples of ``shape`` [N, C, H, W] from noise drawn with ``rng`` (a numpy Generator)."""
        x = _noise(rng, shape, device)
        if self.kind == "dopri5":
            return self._adaptive(model_fn, x)
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
                    + self.noise_scale[i] * _noise(rng, x.shape, x.device)
        if self.kind == "sde" and self.plan.last_step_size > 0:  # the noise-free "mean" step to t = 1
            g = self.plan.num_steps
            out = self._output(model_fn, x, g)
            x = x + self.plan.last_step_size * (self.drift_x[g] * x + self.drift_out[g] * out)
        return x

    def _adaptive(self, model_fn, x):
        try:
            from torchdiffeq import odeint
        except ImportError:
            raise RuntimeError("sampler 'dopri5' needs torchdiffeq (pip install -r requirements/torch.txt)") from None
        from common.flow import sampling_interval

        t0, t1 = sampling_interval(self.recipe)
        self.last_nfe = 0

        def velocity(t, state):
            self.last_nfe += 1
            model_t, v_x, v_out = velocity_coefficients_at(self.recipe, float(t))
            out = model_fn(state, torch.full((state.shape[0],), model_t, device=state.device)).float()
            return v_x * state + v_out * out[:, : state.shape[1]]

        times = torch.tensor([t0, t1], dtype=torch.float32, device=x.device)
        return odeint(velocity, x, times, method="dopri5", atol=self.atol, rtol=self.rtol)[-1]
