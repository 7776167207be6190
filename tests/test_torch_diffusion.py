"""PyTorch DDPM (backends/torch/diffusion.py): loss, posterior math, DDPM/DDIM samplers with CFG."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch.diffusion import (  # noqa: E402
    DDPMObjective, GaussianDiffusion, Sampler, discretized_gaussian_log_likelihood, guided_model, normal_kl,
)
from backends.torch.models import DiR  # noqa: E402
from common.diffusion import make_schedule, space_timesteps  # noqa: E402
from common.params import parameter_table  # noqa: E402
from common.spec import build_spec  # noqa: E402


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

    objective = DDPMObjective(1000, "linear", learn_sigma=True)
    x0 = torch.zeros(4, 1, 8, 8)
    torch.manual_seed(5)
    losses = objective.training_losses(Zero(), x0, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(5)  # replay the draws: eps = 0 makes mse the mean square of the noise
    torch.randint(0, 1000, (4,))
    noise = torch.randn_like(x0)
    torch.testing.assert_close(losses["mse"], noise.pow(2).mean(dim=(1, 2, 3)))
    assert set(losses) == {"mse", "vb", "loss"} and losses["loss"].shape == (4,)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] > 0).all()
    fixed = DDPMObjective(1000, "linear", learn_sigma=False)
    with pytest.raises(ValueError, match="model output has 2 channels, expected 1"):
        fixed.training_losses(Zero(), x0, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kind,steps", [("ddpm", 4), ("ddim", 3)])
def test_samplers_shape_determinism_and_guidance(kind, steps):
    model, spec = tiny_model()
    sampler = Sampler(make_schedule(1000, "linear", True), kind, steps, eta=0.0)
    y = torch.tensor([0, 1, 3])
    calls = []
    original = model.forward

    def counting_forward(x, t, labels):
        calls.append((x.shape[0], t.tolist()))
        return original(x, t, labels)

    model.forward = counting_forward
    fn = guided_model(model, y, 3.0, spec.num_classes)
    a = sampler.sample(fn, (3, 1, 8, 8), torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert len(calls) == steps and all(n == 6 for n, _ in calls)  # CFG doubles the batch
    # The model sees original timesteps, from high to low.
    expected_first = max(space_timesteps(1000, str(steps) if kind == "ddpm" else f"ddim{steps}"))
    assert calls[0][1][0] == expected_first and calls[-1][1][0] == 0
    b = sampler.sample(fn, (3, 1, 8, 8), torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sampler.sample(fn, (3, 1, 8, 8), torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)
    calls.clear()
    unguided = sampler.sample(guided_model(model, y, 1.0, spec.num_classes), (3, 1, 8, 8), torch.Generator().manual_seed(1))
    assert all(n == 3 for n, _ in calls) and not torch.equal(unguided, a)


def test_fixed_variance_model_samples():
    model, spec = tiny_model(learn_sigma=False)
    sampler = Sampler(make_schedule(1000, "linear", False), "ddpm", 5)
    x = sampler.sample(guided_model(model, torch.tensor([2, 2]), 1.0, 4), (2, 1, 8, 8), torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
