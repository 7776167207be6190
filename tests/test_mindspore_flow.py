"""MindSpore flow matching (backends/mindspore/flow.py) tied to the plain numpy references of common/flow.py.

The checks of tests/test_torch_flow.py (PyNative), the sampler / path matrix cut to its diagonal;
dopri5, PyTorch-only, is refused here.
"""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import Tensor, nn, ops  # noqa: E402

from backends.mindspore.flow import FlowObjective, FlowSampler  # noqa: E402
from backends.mindspore.models import DiR  # noqa: E402
from backends.mindspore.objectives import build_sampler, guided_model  # noqa: E402
from common.flow import FlowPath, reference_sample  # noqa: E402
from common.objectives import SamplerSettings  # noqa: E402
from common.params import parameter_table  # noqa: E402
from common.recipe import FLOW_PATHS, FLOW_PREDICTIONS, RecipeError, recipe_from_config  # noqa: E402
from common.spec import build_spec  # noqa: E402


def flow_recipe(path="linear", prediction="velocity", **extra):
    return recipe_from_config({"objective": "flow", "flow_path": path, "flow_prediction": prediction, **extra})


@pytest.fixture(scope="module")
def tiny():
    spec = build_spec("DiR-Tiny/2", hidden_size=64, depth=2, input_size=8, in_channels=1, num_classes=4,
                      learn_sigma=False)
    model = DiR(spec)
    rng = np.random.default_rng(0)  # not the zero-init: adaLN-Zero would make every output 0
    model.load_canonical({p.name: (rng.normal(size=p.shape) * 0.05).astype(np.float32) for p in parameter_table(spec)})
    model.set_train(False)
    return model, spec


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("prediction", FLOW_PREDICTIONS)
@pytest.mark.parametrize("path", FLOW_PATHS)
def test_loss_matches_the_plain_formula(path, prediction):
    recipe = flow_recipe(path, prediction, flow_loss_weight="velocity")
    seen = {}

    class Probe(nn.Cell):  # records what the network sees; predicts a fixed tensor
        def construct(self, x, t, y):
            seen["x"], seen["t"] = x.asnumpy(), t.asnumpy()
            return ops.full_like(x, 0.25)

    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((3, 1, 4, 4)).astype(np.float32)
    noise = rng.standard_normal((3, 1, 4, 4)).astype(np.float32)
    t = np.array([0.2, 0.5, 0.8])
    losses = FlowObjective(recipe).training_losses(Probe(), Tensor(x1), Tensor(np.zeros(3, np.int64)), t=t,
                                                   noise=Tensor(noise))
    p = FlowPath(path)
    a, s, da, ds = (f(t)[:, None, None, None] for f in (p.alpha, p.sigma, p.d_alpha, p.d_sigma))
    x1n, noisen = x1.astype(np.float64), noise.astype(np.float64)
    np.testing.assert_allclose(seen["x"], a * x1n + s * noisen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["t"], 1000 * t, rtol=1e-6)
    out = 0.25
    if prediction == "velocity":
        expected = ((out - (da * x1n + ds * noisen)) ** 2).mean(axis=(1, 2, 3))
    else:
        weight = (p.drift_var(t) / p.sigma(t)) ** 2
        error = out - noisen if prediction == "noise" else out * s + noisen
        expected = weight * (error**2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(losses["loss"].asnumpy(), expected, rtol=2e-5)
    assert set(losses) == {"loss", "mse"}


# Each sampler once and each path / prediction once (PyNative forwards are slow on CPU; the
# sampler arithmetic is the same for every pair, the pairs differ only in common/flow.py's numbers).
@pytest.mark.parametrize("sampler,steps,path,prediction", [("euler", 4, "linear", "velocity"),
                                                           ("heun", 3, "gvp", "noise"), ("sde", 4, "vp", "score")])
def test_samplers_match_the_numpy_reference_with_a_real_network(tiny, sampler, steps, path, prediction):
    model, spec = tiny
    recipe = flow_recipe(path, prediction)
    y = Tensor(np.array([0, 3]))

    def model_fn64(x, model_t):  # the same network for the float64 reference loop
        x = Tensor(np.asarray(x, dtype=np.float32))
        return model(x, Tensor(np.full(x.shape[0], model_t, np.float32)), y).asnumpy().astype(np.float64)

    fast = FlowSampler(recipe, sampler, steps).sample(lambda x, t: model(x, t, y), (2, 1, 8, 8),
                                                       np.random.default_rng(5))
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((2, 1, 8, 8), dtype=np.float32)
    reference = reference_sample(recipe, model_fn64, x0, sampler, steps, rng)
    assert rel(fast.asnumpy(), reference) < 1e-5


def test_guided_sampling_doubles_the_batch_and_counts_evaluations(tiny):
    model, spec = tiny
    recipe = flow_recipe()
    calls = []

    def counting(x, t, y):
        calls.append(x.shape[0])
        return model(x, t, y)

    y, null = Tensor(np.array([1, 2, 3])), Tensor(np.full(3, spec.num_classes))
    sampler = FlowSampler(recipe, "heun", 5)
    out = sampler.sample(guided_model(counting, y, null, 3.0, 1), (3, 1, 8, 8), np.random.default_rng(0))
    assert out.shape == (3, 1, 8, 8) and sampler.nfe == 9 and calls == [6] * 9


def test_dopri5_is_refused_naming_the_samplers_there_are():
    with pytest.raises(RecipeError, match="'dopri5' .* PyTorch backend only; the MindSpore backend has euler, heun and sde"):
        build_sampler(flow_recipe(), False, SamplerSettings(sampler="dopri5"))
