"""Paddle flow matching (backends/paddle/flow.py) tied to the plain numpy references of common/flow.py."""
import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from backends.paddle.flow import FlowObjective, FlowSampler  # noqa: E402
from backends.paddle.models import DiR  # noqa: E402
from backends.paddle.objectives import build_sampler, guided_model  # noqa: E402
from common.flow import FlowPath, reference_sample  # noqa: E402
from common.objectives import SamplerSettings, check_sampling  # noqa: E402
from common.params import parameter_table  # noqa: E402
from common.recipe import FLOW_PATHS, FLOW_PREDICTIONS, RecipeError, recipe_from_config  # noqa: E402
from common.spec import build_spec  # noqa: E402

pytestmark = pytest.mark.paddle


def flow_recipe(path="linear", prediction="velocity", **extra):
    return recipe_from_config({"objective": "flow", "flow_path": path, "flow_prediction": prediction, **extra})


def tiny_model(seed=0):
    spec = build_spec("DiR-Tiny/2", hidden_size=64, depth=2, input_size=8, in_channels=1, num_classes=4,
                      learn_sigma=False)
    model = DiR(spec)
    rng = np.random.default_rng(seed)  # not the zero-init: adaLN-Zero would make every output 0
    model.load_canonical({p.name: (rng.normal(size=p.shape) * 0.05).astype(np.float32) for p in parameter_table(spec)})
    model.eval()
    return model, spec


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("prediction", FLOW_PREDICTIONS)
@pytest.mark.parametrize("path", FLOW_PATHS)
def test_loss_matches_the_plain_formula(path, prediction):
    recipe = flow_recipe(path, prediction, flow_loss_weight="velocity")
    seen = {}

    class Probe(paddle.nn.Layer):  # records what the network sees; predicts a fixed tensor
        def forward(self, x, t, y):
            seen["x"], seen["t"] = x.numpy(), t.numpy()
            return paddle.full_like(x, 0.25)

    gen = np.random.default_rng(0)
    x1n = gen.standard_normal((3, 1, 4, 4), dtype=np.float32)
    noisen = gen.standard_normal((3, 1, 4, 4), dtype=np.float32)
    t = np.array([0.2, 0.5, 0.8])
    losses = FlowObjective(recipe).training_losses(Probe(), paddle.to_tensor(x1n), paddle.zeros([3], dtype="int64"),
                                                   t=t, noise=paddle.to_tensor(noisen))
    p = FlowPath(path)
    a, s, da, ds = (f(t)[:, None, None, None] for f in (p.alpha, p.sigma, p.d_alpha, p.d_sigma))
    x1n, noisen = x1n.astype(np.float64), noisen.astype(np.float64)
    np.testing.assert_allclose(seen["x"], a * x1n + s * noisen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["t"], 1000 * t, rtol=1e-6)
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
    y = paddle.to_tensor([0, 3])

    def model_fn64(x, model_t):  # the same network for the float64 reference loop
        x = paddle.to_tensor(np.asarray(x, dtype=np.float32))
        with paddle.no_grad():
            return model(x, paddle.full([x.shape[0]], float(model_t)), y).astype("float64").numpy()

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

    def counting(x, t, y):
        calls.append(x.shape[0])
        return model(x, t, y)

    y, null = paddle.to_tensor([1, 2, 3]), paddle.full([3], spec.num_classes, dtype="int64")
    sampler = FlowSampler(recipe, "heun", 5)
    out = sampler.sample(guided_model(counting, y, null, 3.0, 1), (3, 1, 8, 8), np.random.default_rng(0))
    assert out.shape == [3, 1, 8, 8] and sampler.nfe == 9 and calls == [6] * 9


def test_dopri5_is_refused_naming_the_samplers_there_are():
    recipe = flow_recipe("gvp")
    with pytest.raises(RecipeError, match=r"'dopri5' does not exist in the Paddle backend .* euler, heun, sde"):
        build_sampler(recipe, False, SamplerSettings("dopri5"))
    with pytest.raises(RecipeError, match=r"exists in the PyTorch backend only; with paddle use euler, heun or sde"):
        check_sampling(recipe, SamplerSettings("dopri5"), "paddle")
