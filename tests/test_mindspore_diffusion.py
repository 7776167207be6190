"""MindSpore DDPM (backends/mindspore/diffusion.py): loss, posterior math, DDPM/DDIM samplers with CFG.

The checks of tests/test_torch_diffusion.py (PyNative). The sampler checks run a small
arithmetic network instead of DiR (PyNative forwards are slow on CPU; what is checked is the
sampler, and DiR itself is tied to PyTorch by tests/test_mindspore_parity.py); guidance runs DiR.
"""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import Tensor, ops  # noqa: E402

from backends.mindspore.diffusion import (  # noqa: E402
    DDPMObjective, DDPMSampler, GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl,
)
from backends.mindspore.models import DiR  # noqa: E402
from backends.mindspore.objectives import guided_model  # noqa: E402
from common.diffusion import make_schedule, space_timesteps  # noqa: E402
from common.params import parameter_table  # noqa: E402
from common.recipe import recipe_from_config  # noqa: E402
from common.spec import build_spec  # noqa: E402

LINEAR = recipe_from_config({"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "linear"})
NUM_CLASSES = 4


def null(n):
    return Tensor(np.full(n, NUM_CLASSES, np.int64))


def toy_model(learn_sigma=True):
    """An arithmetic stand-in for DiR: output depends on x, t and the label."""
    def model(x, t, y):
        shift = (t.astype(ms.float32) / 1000.0 + y.astype(ms.float32)).reshape(-1, 1, 1, 1)
        eps = ops.tanh(0.5 * x + 0.1 * shift)
        return ops.concat([eps, ops.tanh(eps - shift)], 1) if learn_sigma else eps
    return model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_posterior_math_recovers_x0():
    d = GaussianDiffusion(make_schedule(1000))
    rng = np.random.default_rng(0)
    x0 = Tensor((rng.random((3, 1, 4, 4)) * 2 - 1).astype(np.float32))
    noise = Tensor(rng.standard_normal((3, 1, 4, 4)).astype(np.float32))
    t = Tensor(np.array([0, 500, 999]))
    x_t = d.q_sample(x0, t, noise)
    np.testing.assert_allclose(d.predict_xstart(x_t, t, noise).asnumpy(), x0.asnumpy(), atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(d.predict_eps(x_t, t, x0).asnumpy(), noise.asnumpy(), atol=1e-4, rtol=1e-4)
    # A model that outputs the true eps and v = -1 (posterior variance) has zero KL for t > 0.
    out = ops.concat([noise, -ops.ones_like(noise)], 1)
    vb = d.vb_terms_bpd(out, x0, x_t, t).asnumpy()
    assert vb.shape == (3,)
    np.testing.assert_allclose(vb[1:], 0.0, atol=1e-3)
    zero, one = Tensor(np.float32(0.0)), Tensor(np.float32(1.0))
    assert float(normal_kl(zero, zero, one, zero).asnumpy()) == pytest.approx(0.5)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = Tensor(np.linspace(-1, 1, 256, dtype=np.float32))
    logp = discretized_gaussian_log_likelihood(bins, ops.zeros(256, ms.float32),
                                               Tensor(np.full(256, np.log(0.3), np.float32)))
    assert float(ops.exp(logp).sum().asnumpy()) == pytest.approx(1.0, abs=1e-3)


def test_training_loss_values():
    def zero(x, t, y):
        return ops.zeros((x.shape[0], 2 * x.shape[1], *x.shape[2:]), ms.float32)

    objective = DDPMObjective(LINEAR, learn_sigma=True)
    x0 = ops.zeros((4, 1, 8, 8), ms.float32)
    t = np.array([0, 10, 500, 999])
    noise = Tensor(np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32))
    losses = {k: v.asnumpy() for k, v in objective.training_losses(zero, x0, Tensor(np.zeros(4, np.int64)), t=t,
                                                                   noise=noise).items()}
    np.testing.assert_allclose(losses["mse"], (noise.asnumpy() ** 2).mean(axis=(1, 2, 3)), rtol=1e-6)
    assert set(losses) == {"mse", "vb", "loss"} and losses["loss"].shape == (4,)
    np.testing.assert_allclose(losses["loss"], losses["mse"] + losses["vb"], rtol=1e-6)
    assert (losses["vb"] > 0).all()
    fixed = DDPMObjective(LINEAR, learn_sigma=False)
    with pytest.raises(ValueError, match="model output has 2 channels, expected 1"):
        fixed.training_losses(zero, x0, Tensor(np.zeros(4, np.int64)), t=t)


@pytest.mark.parametrize("kind,steps", [("ddpm", 4), ("ddim", 3)])
def test_samplers_shape_determinism_and_guidance(kind, steps):
    sampler = DDPMSampler(LINEAR, True, kind, steps, eta=0.0)
    y = Tensor(np.array([0, 1, 3]))
    calls = []
    toy = toy_model()

    def counting(x, t, labels):
        calls.append((x.shape[0], t.asnumpy().tolist()))
        return toy(x, t, labels)

    fn = guided_model(counting, y, null(3), 3.0, 1)
    rng = lambda seed: np.random.default_rng(seed)  # noqa: E731
    a = sampler.sample(fn, (3, 1, 8, 8), rng(1)).asnumpy()
    assert a.shape == (3, 1, 8, 8) and np.isfinite(a).all()
    assert len(calls) == steps and all(n == 6 for n, _ in calls)  # CFG doubles the batch
    # The model sees original timesteps, from high to low.
    expected_first = max(space_timesteps(1000, str(steps) if kind == "ddpm" else f"ddim{steps}"))
    assert calls[0][1][0] == expected_first and calls[-1][1][0] == 0
    b = sampler.sample(fn, (3, 1, 8, 8), rng(1)).asnumpy()
    np.testing.assert_array_equal(a, b)
    c = sampler.sample(fn, (3, 1, 8, 8), rng(2)).asnumpy()
    assert not np.array_equal(a, c)
    calls.clear()
    unguided = sampler.sample(guided_model(counting, y, None, 1.0, 1), (3, 1, 8, 8), rng(1)).asnumpy()
    assert all(n == 3 for n, _ in calls) and not np.array_equal(unguided, a)


def test_guidance_mixes_conditional_and_null_predictions():
    spec = build_spec("DiR-Tiny/2", hidden_size=64, depth=2, input_size=8, in_channels=1, num_classes=NUM_CLASSES)
    model = DiR(spec)
    weights = np.random.default_rng(0)  # not the zero-init: adaLN-Zero would make every output 0
    model.load_canonical({p.name: (weights.normal(size=p.shape) * 0.05).astype(np.float32)
                          for p in parameter_table(spec)})
    model.set_train(False)
    x = Tensor(np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32))
    t, y = Tensor(np.array([50, 600])), Tensor(np.array([1, 3]))
    out = guided_model(model, y, null(2), 4.0, spec.in_channels)(x, t).asnumpy()
    cond, uncond = model(x, t, y).asnumpy(), model(x, t, null(2)).asnumpy()
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
        got = sampler.step(lambda xt, t: Tensor(eps.astype(np.float32)), Tensor(x.astype(np.float32)), i,
                           np.random.default_rng(7))
        assert rel(got.asnumpy(), expected) < 1e-5, i  # the float32 form of the coefficient gives 4.3e-5 at i = 1
    coefficient = float(sampler.ddim_direction.asnumpy()[1])
    exact = np.sqrt(1 - schedule.alphas_cumprod_prev[1] - sigma[1] ** 2)
    assert coefficient == pytest.approx(exact, rel=1e-6)  # float32 arithmetic on the terms: 17% off


def test_fixed_variance_model_samples():
    sampler = DDPMSampler(LINEAR, False, "ddpm", 5)
    x = sampler.sample(guided_model(toy_model(learn_sigma=False), Tensor(np.array([2, 2])), None, 1.0, 1),
                       (2, 1, 8, 8), np.random.default_rng(0)).asnumpy()
    assert x.shape == (2, 1, 8, 8) and np.isfinite(x).all()
