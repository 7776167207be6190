"""PyTorch DDPM (backends/torch/diffusion.py): loss, posterior math, DDPM/DDIM samplers with CFG."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch.diffusion import (  # noqa: E402
    DDPMObjective, DDPMSampler, GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl,
)
from backends.torch.models import DiR  # noqa: E402
from backends.torch.objectives import guided_model  # noqa: E402
from common.diffusion import make_schedule, space_timesteps  # noqa: E402
from common.recipe import recipe_from_config  # noqa: E402
from common.params import parameter_table  # noqa: E402
from common.spec import build_spec  # noqa: E402


LINEAR = recipe_from_config({"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "linear"})


def null(n, spec):
    return torch.full((n,), spec.num_classes, dtype=torch.long)


def tiny_model(learn_sigma=True, seed=0):
    spec = build_spec("DiR-Tiny/2", hidden_size=64, depth=2, input_size=8, in_channels=1, num_classes=4,
                      learn_sigma=learn_sigma)
    model = DiR(spec)
    rng = np.random.default_rng(seed)  # not the zero-init: adaLN-Zero would make every output 0
    model.load_canonical({p.name: (rng.normal(size=p.shape) * 0.05).astype(np.float32) for p in parameter_table(spec)})
    return model.eval(), spec


def test_posterior_math_recovers_x0():
    d = GaussianDiffusion(make_schedule(1000))
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_xstart(x_t, t, noise), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(d.predict_eps(x_t, t, x0), noise, atol=1e-4, rtol=1e-4)
    # A model that outputs the true eps and v = -1 (posterior variance) has zero KL for t > 0.
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    vb = d.vb_terms_bpd(out, x0, x_t, t)
    assert vb.shape == (3,)
    torch.testing.assert_close(vb[1:], torch.zeros(2), atol=1e-3, rtol=0)
    assert float(normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0))) == pytest.approx(0.5)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(bins, torch.zeros(256), torch.full((256,), np.log(0.3)))
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-3)


def test_training_loss_values():
    class Zero(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    objective = DDPMObjective(LINEAR, learn_sigma=True)
    x0 = torch.zeros(4, 1, 8, 8)
    t = np.array([0, 10, 500, 999])
    noise = torch.randn_like(x0)
    losses = objective.training_losses(Zero(), x0, torch.zeros(4, dtype=torch.long), t=t, noise=noise)
    torch.testing.assert_close(losses["mse"], noise.pow(2).mean(dim=(1, 2, 3)))  # eps = 0: mean square of the noise
    assert set(losses) == {"mse", "vb", "loss"} and losses["loss"].shape == (4,)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] > 0).all()
    fixed = DDPMObjective(LINEAR, learn_sigma=False)
    with pytest.raises(ValueError, match="model output has 2 channels, expected 1"):
        fixed.training_losses(Zero(), x0, torch.zeros(4, dtype=torch.long), t=t)


@pytest.mark.parametrize("kind,steps", [("ddpm", 4), ("ddim", 3)])
def test_samplers_shape_determinism_and_guidance(kind, steps):
    model, spec = tiny_model()
    sampler = DDPMSampler(LINEAR, True, kind, steps, eta=0.0)
    y = torch.tensor([0, 1, 3])
    calls = []
    original = model.forward

    def counting_forward(x, t, labels):
        calls.append((x.shape[0], t.tolist()))
        return original(x, t, labels)

    model.forward = counting_forward
    fn = guided_model(model, y, null(3, spec), 3.0, spec.in_channels)
    rng = lambda seed: np.random.default_rng(seed)  # noqa: E731
    a = sampler.sample(fn, (3, 1, 8, 8), rng(1))
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert len(calls) == steps and all(n == 6 for n, _ in calls)  # CFG doubles the batch
    # The model sees original timesteps, from high to low.
    expected_first = max(space_timesteps(1000, str(steps) if kind == "ddpm" else f"ddim{steps}"))
    assert calls[0][1][0] == expected_first and calls[-1][1][0] == 0
    b = sampler.sample(fn, (3, 1, 8, 8), rng(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sampler.sample(fn, (3, 1, 8, 8), rng(2))
    assert not torch.equal(a, c)
    calls.clear()
    unguided = sampler.sample(guided_model(model, y, None, 1.0, spec.in_channels), (3, 1, 8, 8), rng(1))
    assert all(n == 3 for n, _ in calls) and not torch.equal(unguided, a)


def test_guidance_mixes_conditional_and_null_predictions():
    model, spec = tiny_model()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([50, 600])
    y = torch.tensor([1, 3])
    out = guided_model(model, y, null(2, spec), 4.0, spec.in_channels)(x, t)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null(2, spec))
    guided = uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1])

    def rel(a, b):  # batch composition changes summation order, so compare norms
        return float((a - b).detach().norm() / b.detach().norm())

    assert rel(out[:, :1], guided) < 1e-5
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
        got = sampler.step(lambda xt, t: torch.from_numpy(eps).float(), torch.from_numpy(x).float(), i,
                           np.random.default_rng(7))
        rel = np.linalg.norm(got.numpy() - expected) / np.linalg.norm(expected)
        assert rel < 1e-5, (i, rel)  # the float32 form of the coefficient gives 4.3e-5 at i = 1
    coefficient = float(sampler.ddim_direction[1])
    exact = np.sqrt(1 - schedule.alphas_cumprod_prev[1] - sigma[1] ** 2)
    assert coefficient == pytest.approx(exact, rel=1e-6)  # float32 arithmetic on the terms: 17% off


def test_fixed_variance_model_samples():
    model, spec = tiny_model(learn_sigma=False)
    sampler = DDPMSampler(LINEAR, False, "ddpm", 5)
    x = sampler.sample(guided_model(model, torch.tensor([2, 2]), None, 1.0, 1), (2, 1, 8, 8), np.random.default_rng(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
