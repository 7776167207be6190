"""PyTorch flow matching (backends/torch/flow.py) tied to the plain numpy references of common/flow.py."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch.flow import FlowObjective, FlowSampler  # noqa: E402
from backends.torch.models import DiR  # noqa: E402
from backends.torch.objectives import guided_model  # noqa: E402
from common.flow import FlowPath, reference_sample  # noqa: E402
from common.params import parameter_table  # noqa: E402
from common.recipe import FLOW_PATHS, FLOW_PREDICTIONS, recipe_from_config  # noqa: E402
from common.spec import build_spec  # noqa: E402
from tests.test_flow_numbers import gaussian_oracle  # noqa: E402


def flow_recipe(path="linear", prediction="velocity", **extra):
    return recipe_from_config({"objective": "flow", "flow_path": path, "flow_prediction": prediction, **extra})


def tiny_model(seed=0):
    spec = build_spec("DiR-Tiny/2", hidden_size=64, depth=2, input_size=8, in_channels=1, num_classes=4,
                      learn_sigma=False)
    model = DiR(spec)
    rng = np.random.default_rng(seed)  # not the zero-init: adaLN-Zero would make every output 0
    model.load_canonical({p.name: (rng.normal(size=p.shape) * 0.05).astype(np.float32) for p in parameter_table(spec)})
    return model.eval(), spec


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("prediction", FLOW_PREDICTIONS)
@pytest.mark.parametrize("path", FLOW_PATHS)
def test_loss_matches_the_plain_formula(path, prediction):
    recipe = flow_recipe(path, prediction, flow_loss_weight="velocity")
    seen = {}

    class Probe(torch.nn.Module):  # records what the network sees; predicts a fixed tensor
        def forward(self, x, t, y):
            seen["x"], seen["t"] = x.clone(), t.clone()
            return torch.full_like(x, 0.25)

    x1 = torch.randn(3, 1, 4, 4, dtype=torch.float32)
    noise = torch.randn_like(x1)
    t = np.array([0.2, 0.5, 0.8])
    losses = FlowObjective(recipe).training_losses(Probe(), x1, torch.zeros(3, dtype=torch.long), t=t, noise=noise)
    p = FlowPath(path)
    a, s, da, ds = (f(t)[:, None, None, None] for f in (p.alpha, p.sigma, p.d_alpha, p.d_sigma))
    x1n, noisen = x1.double().numpy(), noise.double().numpy()
    np.testing.assert_allclose(seen["x"].numpy(), a * x1n + s * noisen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["t"].numpy(), 1000 * t, rtol=1e-6)
    out = 0.25
    if prediction == "velocity":
        expected = ((out - (da * x1n + ds * noisen)) ** 2).mean(axis=(1, 2, 3))
    else:
        weight = (p.drift_var(t) / p.sigma(t)) ** 2
        error = out - noisen if prediction == "noise" else out * s + noisen
        expected = weight * (error**2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(losses["loss"].numpy(), expected, rtol=2e-5)
    assert set(losses) == {"loss", "mse"}


@pytest.mark.parametrize("sampler,steps", [("euler", 6), ("heun", 4), ("sde", 6)])
@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("gvp", "noise"), ("vp", "score")])
def test_samplers_match_the_numpy_reference_with_a_real_network(sampler, steps, path, prediction):
    model, spec = tiny_model()
    recipe = flow_recipe(path, prediction)
    y = torch.tensor([0, 3])

    def model_fn64(x, model_t):  # the same network for the float64 reference loop
        x = torch.from_numpy(np.asarray(x, dtype=np.float32))
        with torch.no_grad():
            return model(x, torch.full((x.shape[0],), float(model_t)), y).double().numpy()

    fast = FlowSampler(recipe, sampler, steps).sample(lambda x, t: model(x, t, y), (2, 1, 8, 8),
                                                       np.random.default_rng(5))
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((2, 1, 8, 8), dtype=np.float32)
    reference = reference_sample(recipe, model_fn64, x0, sampler, steps, rng)
    assert rel(fast.numpy(), reference) < 1e-5


def test_guided_sampling_doubles_the_batch_and_counts_evaluations():
    model, spec = tiny_model()
    recipe = flow_recipe()
    calls = []
    original = model.forward

    def counting(x, t, y):
        calls.append(x.shape[0])
        return original(x, t, y)

    model.forward = counting
    y, null = torch.tensor([1, 2, 3]), torch.full((3,), spec.num_classes)
    sampler = FlowSampler(recipe, "heun", 5)
    out = sampler.sample(guided_model(model, y, null, 3.0, 1), (3, 1, 8, 8), np.random.default_rng(0))
    assert out.shape == (3, 1, 8, 8) and sampler.nfe == 9 and calls == [6] * 9


def test_dopri5_agrees_with_a_fine_heun_and_counts_evaluations():
    pytest.importorskip("torchdiffeq")
    recipe = flow_recipe("gvp")
    oracle = gaussian_oracle(recipe)

    def model_fn(x, t):
        return torch.from_numpy(oracle(x.double().numpy(), t[:1].double().numpy()[0])).float()

    adaptive = FlowSampler(recipe, "dopri5", atol=1e-7, rtol=1e-5)
    a = adaptive.sample(model_fn, (4000, 1, 1, 1), np.random.default_rng(0))
    b = FlowSampler(recipe, "heun", 200).sample(model_fn, (4000, 1, 1, 1), np.random.default_rng(0))
    assert rel(a.numpy(), b.numpy()) < 1e-3
    assert abs(float(a.mean()) - 0.7) < 0.02 and abs(float(a.std()) - 0.3) < 0.02
    assert 10 < adaptive.nfe < 200  # reported, and far fewer than the fixed grid needs
