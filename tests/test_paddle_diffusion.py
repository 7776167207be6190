"""Paddle DDPM (backends/paddle/diffusion.py): loss, posterior math, DDPM/DDIM samplers with CFG,
and the order the samplers draw their noise in (the one every backend shares)."""
import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from backends.paddle.diffusion import (  # noqa: E402
    DDPMObjective, DDPMSampler, GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl,
)
from backends.paddle.models import DiR  # noqa: E402
from backends.paddle.objectives import guided_model  # noqa: E402
from common.diffusion import make_schedule, space_timesteps  # noqa: E402
from common.params import parameter_table  # noqa: E402
from common.recipe import recipe_from_config  # noqa: E402
from common.spec import build_spec  # noqa: E402

pytestmark = pytest.mark.paddle

LINEAR = recipe_from_config({"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "linear"})


def null(n, spec):
    return paddle.full([n], spec.num_classes, dtype="int64")


def tiny_model(learn_sigma=True, seed=0):
    spec = build_spec("DiR-Tiny/2", hidden_size=64, depth=2, input_size=8, in_channels=1, num_classes=4,
                      learn_sigma=learn_sigma)
    model = DiR(spec)
    rng = np.random.default_rng(seed)  # not the zero-init: adaLN-Zero would make every output 0
    model.load_canonical({p.name: (rng.normal(size=p.shape) * 0.05).astype(np.float32) for p in parameter_table(spec)})
    model.eval()
    return model, spec


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_posterior_math_recovers_x0():
    d = GaussianDiffusion(make_schedule(1000))
    rng = np.random.default_rng(0)
    x0 = paddle.to_tensor(rng.random((3, 1, 4, 4), dtype=np.float32) * 2 - 1)
    noise = paddle.to_tensor(rng.standard_normal((3, 1, 4, 4), dtype=np.float32))
    t = paddle.to_tensor([0, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    np.testing.assert_allclose(d.predict_xstart(x_t, t, noise).numpy(), x0.numpy(), atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(d.predict_eps(x_t, t, x0).numpy(), noise.numpy(), atol=1e-4, rtol=1e-4)
    # A model that outputs the true eps and v = -1 (posterior variance) has zero KL for t > 0.
    out = paddle.concat([noise, -paddle.ones_like(noise)], axis=1)
    vb = d.vb_terms_bpd(out, x0, x_t, t)
    assert vb.shape == [3]
    np.testing.assert_allclose(vb.numpy()[1:], np.zeros(2), atol=1e-3, rtol=0)
    zero, one = paddle.to_tensor(0.0), paddle.to_tensor(1.0)
    assert float(normal_kl(zero, zero, one, zero)) == pytest.approx(0.5)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = paddle.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(bins, paddle.zeros([256]), paddle.full([256], np.log(0.3)))
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-3)


def test_training_loss_values():
    class Zero(paddle.nn.Layer):
        def forward(self, x, t, y):
            return paddle.zeros([x.shape[0], 2 * x.shape[1], *x.shape[2:]])

    objective = DDPMObjective(LINEAR, learn_sigma=True)
    x0 = paddle.zeros([4, 1, 8, 8])
    t = np.array([0, 10, 500, 999])
    noise = paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 1, 8, 8), dtype=np.float32))
    losses = objective.training_losses(Zero(), x0, paddle.zeros([4], dtype="int64"), t=t, noise=noise)
    # eps = 0: the MSE is the mean square of the noise
    np.testing.assert_allclose(losses["mse"].numpy(), (noise.numpy() ** 2).mean(axis=(1, 2, 3)), rtol=1e-6)
    assert set(losses) == {"mse", "vb", "loss"} and losses["loss"].shape == [4]
    np.testing.assert_allclose(losses["loss"].numpy(), (losses["mse"] + losses["vb"]).numpy())
    assert (losses["vb"].numpy() > 0).all()
    # t as a Paddle tensor gives the same losses
    again = objective.training_losses(Zero(), x0, paddle.zeros([4], dtype="int64"), t=paddle.to_tensor(t), noise=noise)
    np.testing.assert_array_equal(again["loss"].numpy(), losses["loss"].numpy())
    fixed = DDPMObjective(LINEAR, learn_sigma=False)
    with pytest.raises(ValueError, match="model output has 2 channels, expected 1"):
        fixed.training_losses(Zero(), x0, paddle.zeros([4], dtype="int64"), t=t)


@pytest.mark.parametrize("kind,steps", [("ddpm", 4), ("ddim", 3)])
def test_samplers_shape_determinism_and_guidance(kind, steps):
    model, spec = tiny_model()
    sampler = DDPMSampler(LINEAR, True, kind, steps, eta=0.0)
    y = paddle.to_tensor([0, 1, 3])
    calls = []

    def counting(x, t, labels):
        calls.append((x.shape[0], t.tolist()))
        return model(x, t, labels)

    fn = guided_model(counting, y, null(3, spec), 3.0, spec.in_channels)
    rng = lambda seed: np.random.default_rng(seed)  # noqa: E731
    a = sampler.sample(fn, (3, 1, 8, 8), rng(1)).numpy()
    assert a.shape == (3, 1, 8, 8) and np.isfinite(a).all()
    assert len(calls) == steps and all(n == 6 for n, _ in calls)  # CFG doubles the batch
    # The model sees original timesteps, from high to low.
    expected_first = max(space_timesteps(1000, str(steps) if kind == "ddpm" else f"ddim{steps}"))
    assert calls[0][1][0] == expected_first and calls[-1][1][0] == 0
    b = sampler.sample(fn, (3, 1, 8, 8), rng(1)).numpy()
    np.testing.assert_array_equal(a, b)
    c = sampler.sample(fn, (3, 1, 8, 8), rng(2)).numpy()
    assert not np.array_equal(a, c)
    calls.clear()
    unguided = sampler.sample(guided_model(counting, y, None, 1.0, spec.in_channels), (3, 1, 8, 8), rng(1)).numpy()
    assert all(n == 3 for n, _ in calls) and not np.array_equal(unguided, a)


def test_guidance_mixes_conditional_and_null_predictions():
    model, spec = tiny_model()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32))
    t = paddle.to_tensor([50, 600])
    y = paddle.to_tensor([1, 3])
    out = guided_model(model, y, null(2, spec), 4.0, spec.in_channels)(x, t).numpy()
    with paddle.no_grad():
        cond, uncond = model(x, t, y).numpy(), model(x, t, null(2, spec)).numpy()
    guided = uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1])
    assert rel(out[:, :1], guided) < 1e-5  # batch composition changes summation order, so compare norms
    assert rel(out[:, 1:], cond[:, 1:]) < 1e-5  # the variance channels are not guided


def test_ddim_with_eta_matches_a_float64_reference_step():
    """The DDIM update against the formula in float64, at the steps where float32 cancels (cosine ddim10, eta 1)."""
    from common.diffusion import ddim_sigmas, sampling_schedule

    cosine = recipe_from_config({"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "cosine"})
    sampler = DDPMSampler(cosine, False, "ddim", 10, eta=1.0)
    schedule = sampling_schedule(make_schedule(1000, "cosine", False), "ddim", 10)
    sigma = ddim_sigmas(schedule, 1.0)
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    eps = np.random.default_rng(1).standard_normal((2, 1, 4, 4))
    for i in (1, 2, 5):
        ab, ab_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
        x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        noise = np.random.default_rng(7).standard_normal(x.shape, dtype=np.float32)
        expected = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma[i] ** 2) * eps + sigma[i] * noise
        got = sampler.step(lambda xt, t: paddle.to_tensor(eps.astype(np.float32)),
                           paddle.to_tensor(x.astype(np.float32)), i, np.random.default_rng(7))
        assert rel(got.numpy(), expected) < 1e-5, i  # the float32 form of the coefficient gives 4.3e-5 at i = 1
    coefficient = float(sampler.ddim_direction[1])
    exact = np.sqrt(1 - schedule.alphas_cumprod_prev[1] - sigma[1] ** 2)
    assert coefficient == pytest.approx(exact, rel=1e-6)  # float32 arithmetic on the terms: 17% off


class CountingRng:
    """A numpy Generator that records the shape of every noise draw."""

    def __init__(self, seed):
        self.rng, self.draws = np.random.default_rng(seed), []

    def standard_normal(self, shape, dtype):
        self.draws.append(tuple(shape))
        return self.rng.standard_normal(shape, dtype=dtype)


@pytest.mark.parametrize("kind,eta,draws", [("ddpm", 0.0, 1 + 4), ("ddim", 0.0, 1), ("ddim", 0.5, 1 + 4)])
def test_noise_is_drawn_in_the_shared_order(kind, eta, draws):
    """x_T, then one draw per step but the last for ddpm and for ddim with eta > 0 (torch's order)."""
    model, spec = tiny_model()
    rng = CountingRng(0)
    DDPMSampler(LINEAR, True, kind, 5, eta=eta).sample(lambda x, t: model(x, t, paddle.to_tensor([1, 2])),
                                                       (2, 1, 8, 8), rng)
    assert rng.draws == [(2, 1, 8, 8)] * draws


def test_fixed_variance_model_samples():
    model, spec = tiny_model(learn_sigma=False)
    sampler = DDPMSampler(LINEAR, False, "ddpm", 5)
    x = sampler.sample(guided_model(model, paddle.to_tensor([2, 2]), None, 1.0, 1), (2, 1, 8, 8),
                       np.random.default_rng(0))
    assert x.shape == [2, 1, 8, 8] and np.isfinite(x.numpy()).all()
