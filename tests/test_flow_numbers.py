"""The numpy side of flow matching (common/flow.py) against closed forms, SiT's formulas and a Gaussian oracle."""
import numpy as np
import pytest

from common.flow import (
    FlowPath, output_coefficients, reference_sample, reference_score, reference_velocity, sample_training_times,
    sampling_interval, sampling_plan, training_coefficients, training_interval,
)
from common.objectives import step_draws, training_inputs
from common.recipe import FLOW_PATHS, FLOW_PREDICTIONS, RecipeError, recipe_from_config

TIMES = np.linspace(0.02, 0.98, 25)


def flow_recipe(path="linear", prediction="velocity", **extra):
    return recipe_from_config({"objective": "flow", "flow_path": path, "flow_prediction": prediction, **extra})


@pytest.mark.parametrize("name", FLOW_PATHS)
def test_path_endpoints_and_derivatives(name):
    path = FlowPath(name)
    h = 1e-6
    np.testing.assert_allclose(path.d_alpha(TIMES), (path.alpha(TIMES + h) - path.alpha(TIMES - h)) / (2 * h), rtol=1e-6)
    np.testing.assert_allclose(path.d_sigma(TIMES), (path.sigma(TIMES + h) - path.sigma(TIMES - h)) / (2 * h), rtol=1e-5)
    assert path.alpha(1.0) == pytest.approx(1.0) and path.sigma(1.0) == pytest.approx(0.0, abs=1e-12)
    if name != "vp":  # VP never reaches pure noise: alpha_0 = exp(-(20 - 0.1)/4 - 0.05)
        assert path.alpha(0.0) == pytest.approx(0.0) and path.sigma(0.0) == pytest.approx(1.0)
    else:
        assert path.alpha(0.0) == pytest.approx(np.exp(-19.9 / 4 - 0.05))
        np.testing.assert_allclose(path.alpha(TIMES) ** 2 + path.sigma(TIMES) ** 2, 1.0, rtol=1e-12)
    assert (path.drift_var(TIMES) > 0).all()


def test_vp_sigma_keeps_precision_near_one():
    path = FlowPath("vp")
    t = 1.0 - 1e-7
    exact = np.sqrt(-np.expm1(2 * path._vp_log_mean(t)))
    assert path.sigma(t) == exact and path.sigma(t) > 0
    naive = np.float32(np.sqrt(np.float32(1) - np.float32(path.alpha(t)) ** 2))
    assert abs(naive / exact - 1) > 0.01  # why expm1: the plain form in float32 is far off here


@pytest.mark.parametrize("name", FLOW_PATHS)
@pytest.mark.parametrize("prediction", FLOW_PREDICTIONS)
def test_output_coefficients_match_sits_formulas(name, prediction):
    recipe = flow_recipe(name, prediction)
    rng = np.random.default_rng(0)
    x, out = rng.standard_normal(5), rng.standard_normal(5)
    coef = output_coefficients(recipe, TIMES)
    for i, t in enumerate(TIMES):
        np.testing.assert_allclose(coef["v_x"][i] * x + coef["v_out"][i] * out,
                                   reference_velocity(recipe, x, out, t), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(coef["s_x"][i] * x + coef["s_out"][i] * out,
                                   reference_score(recipe, x, out, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", FLOW_PREDICTIONS)
def test_training_coefficients_give_each_predictions_loss(prediction):
    recipe = flow_recipe("gvp", prediction, flow_loss_weight="likelihood")
    t = np.array([0.1, 0.5, 0.9])
    c = training_coefficients(recipe, t)
    path = FlowPath("gvp")
    rng = np.random.default_rng(1)
    data, noise, out = (rng.standard_normal((3, 4)) for _ in range(3))
    loss = c["weight"] * ((c["k_out"][:, None] * out - c["k_data"][:, None] * data - c["k_noise"][:, None] * noise) ** 2).mean(1)
    sigma = path.sigma(t)
    if prediction == "velocity":  # SiT: plain MSE against u_t, no weighting
        target = path.d_alpha(t)[:, None] * data + path.d_sigma(t)[:, None] * noise
        expected = ((out - target) ** 2).mean(1)
    else:
        weight = path.drift_var(t) / sigma**2
        error = out - noise if prediction == "noise" else out * sigma[:, None] + noise
        expected = weight * (error**2).mean(1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(c["alpha"], path.alpha(t), rtol=1e-6)
    np.testing.assert_allclose(c["model_t"], 1000 * t, rtol=1e-6)


def test_training_times_and_intervals():
    rng = np.random.default_rng(0)
    uniform = sample_training_times(flow_recipe(), rng, 20000)
    assert uniform.min() >= 0 and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01
    logit = sample_training_times(flow_recipe(flow_time_sampling="logit_normal"), rng, 20000)
    # sigmoid(N(0, 1)): median 0.5, and P(t < sigmoid(-1)) = P(z < -1) = 0.1587
    assert abs(np.median(logit) - 0.5) < 0.01 and abs((logit < 1 / (1 + np.e)).mean() - 0.1587) < 0.01
    assert training_interval(flow_recipe()) == (0.0, 1.0)
    assert training_interval(flow_recipe(prediction="noise")) == (1e-3, 1 - 1e-3)
    assert training_interval(flow_recipe("vp")) == (0.0, 1 - 1e-5)
    assert sampling_interval(flow_recipe()) == (0.0, 1.0)
    assert sampling_interval(flow_recipe(), sde=True, diffusion_form="SBDM") == (1e-3, 0.96)
    assert sampling_interval(flow_recipe(), sde=True, diffusion_form="sigma") == (0.0, 0.96)
    assert sampling_interval(flow_recipe("vp"), sde=False) == (0.0, 1 - 1e-3)


def test_plans_count_network_evaluations_and_refuse_bad_settings():
    recipe = flow_recipe()
    assert sampling_plan(recipe, "euler", 10).nfe == 10
    heun = sampling_plan(recipe, "heun", 13)
    assert heun.nfe == 25 and heun.num_steps == 13 and heun.times[0] == 0 and heun.times[-1] == 1
    sde = sampling_plan(recipe, "sde", 10)
    assert sde.nfe == 10 and sde.num_steps == 9 and sde.times[-1] == pytest.approx(0.96)
    assert sde.last_step_size == pytest.approx(0.04) and (sde.noise_scale > 0).all()
    assert sampling_plan(recipe, "sde", 10, last_step_size=0.0).num_steps == 10
    with pytest.raises(RecipeError, match="unknown SDE diffusion form 'sbdm'"):
        sampling_plan(recipe, "sde", 10, diffusion_form="sbdm")
    with pytest.raises(RecipeError, match="num_sampling_steps = 0"):
        sampling_plan(recipe, "euler", 0)
    # A noise model with no distance from t = 0 divides by alpha_0 = 0: refused, naming the fix.
    with pytest.raises(RecipeError, match="not finite .* raise flow_sample_eps"):
        sampling_plan(flow_recipe(prediction="noise", flow_sample_eps=0.0), "euler", 10)


def gaussian_oracle(recipe, mean=0.7, std=0.3):
    """The exact network output for data ~ N(mean, std^2) per dimension."""
    path = FlowPath(recipe.flow_path)

    def model_fn(x, model_t):
        t = model_t / recipe.flow_time_scale
        a, s, da, ds = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
        variance = a * a * std * std + s * s
        e_data = mean + a * std * std / variance * (x - a * mean)
        e_noise = s * (x - a * mean) / variance
        if recipe.flow_prediction == "velocity":
            return da * e_data + ds * e_noise
        if recipe.flow_prediction == "noise":
            return e_noise
        return -(x - a * mean) / variance

    return model_fn


@pytest.mark.parametrize("name", FLOW_PATHS)
@pytest.mark.parametrize("prediction", FLOW_PREDICTIONS)
def test_reference_samplers_recover_gaussian_data(name, prediction):
    recipe = flow_recipe(name, prediction)
    x0 = np.random.default_rng(0).standard_normal(20000).astype(np.float32)
    for sampler, steps, tolerance in (("euler", 200, 0.02), ("heun", 50, 0.01), ("sde", 400, 0.04)):
        out = reference_sample(recipe, gaussian_oracle(recipe), x0, sampler, steps, np.random.default_rng(1),
                               last_step_size=0.0 if name == "vp" else 0.04)
        assert abs(out.mean() - 0.7) < tolerance, (sampler, out.mean())
        assert abs(out.std() - 0.3) < tolerance * 1.5, (sampler, out.std())


def test_step_draws_are_pure_functions_of_seed_rank_and_step():
    recipe = flow_recipe(flow_time_sampling="logit_normal")
    a = step_draws(recipe, 0.1, (8, 1, 4, 4), seed=3, world_size=2, rank=1, step=7, micro=0)
    b = step_draws(recipe, 0.1, (8, 1, 4, 4), seed=3, world_size=2, rank=1, step=7, micro=0)
    c = step_draws(recipe, 0.1, (8, 1, 4, 4), seed=3, world_size=2, rank=0, step=7, micro=0)
    np.testing.assert_array_equal(a.noise, b.noise)
    np.testing.assert_array_equal(a.t, b.t)
    assert not np.array_equal(a.noise, c.noise)
    assert set(a.inputs) == {"alpha", "sigma", "k_out", "k_data", "k_noise", "weight", "model_t"}
    ddpm = recipe_from_config({"objective": "ddpm", "diffusion_steps": 50, "noise_schedule": "cosine"})
    d = step_draws(ddpm, 0.5, (4000, 1, 1, 1), seed=0, world_size=1, rank=0, step=0)
    assert d.t.dtype == np.int64 and d.t.min() >= 0 and d.t.max() == 49
    assert 0.47 < d.drop.mean() < 0.53
    with pytest.raises(RecipeError, match=r"DDPM timesteps must lie in \[0, 50\)"):
        training_inputs(ddpm, np.array([50]))
