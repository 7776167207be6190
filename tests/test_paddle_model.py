"""The Paddle DiR: names and layouts of the canonical table, loading errors, and
inference through paddle.jit.to_static (same images as eager)."""
import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from backends.paddle.diffusion import Sampler, guided_model  # noqa: E402
from backends.paddle.models import DiR  # noqa: E402
from backends.paddle.sample import to_static  # noqa: E402
from common.diffusion import make_schedule  # noqa: E402
from common.param_mapping import to_framework  # noqa: E402
from common.params import init_canonical, parameter_table  # noqa: E402
from common.spec import build_spec  # noqa: E402

pytestmark = pytest.mark.paddle

TINY = dict(hidden_size=64, depth=2, head_size=32, input_size=8, num_classes=10, mix_lora_rank=8, decay_lora_rank=16)


def test_parameter_names_and_layout_are_the_documented_mapping():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "skip": True, "pos_embed": "learned"})
    model = DiR(spec)
    own = {name: tuple(p.shape) for name, p in model.named_parameters()}
    expected = {name: value.shape for name, value in to_framework("paddle", init_canonical(spec), spec).items()}
    assert own == expected  # same names as canonical; Linear weights [in, out]; nothing else differs
    assert set(model.state_dict()) == {info.name for info in parameter_table(spec)}  # sincos is no state
    assert own["blocks.0.att.key.weight"] == (64, 64) and own["final_layer.linear.weight"] == (64, 4 * 8)


def test_canonical_round_trip_and_seeded_init():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "scan": "causal"})
    state = init_canonical(spec, 5)
    model = DiR.from_spec(spec, seed=5)
    back = model.canonical_state()
    assert list(back) == [info.name for info in parameter_table(spec)]
    assert all(np.array_equal(back[name], state[name]) for name in state)


def test_load_canonical_names_every_problem():
    spec = build_spec("DiR-Tiny/2", **TINY)
    state = init_canonical(spec)
    state.pop("blocks.1.ffn.key.weight")
    state["blocks.0.att.key.weight"] = state["blocks.0.att.key.weight"].T[:, :3]
    with pytest.raises(ValueError) as err:
        DiR(spec).load_canonical(state)
    assert "missing: blocks.1.ffn.key.weight" in str(err.value)
    assert "wrong shape: blocks.0.att.key.weight" in str(err.value)


def test_cfg_needs_a_null_class():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "class_dropout_prob": 0.0})
    model = DiR.from_spec(spec)
    x = paddle.zeros([2, 4, 8, 8])
    with pytest.raises(ValueError, match="null class"):
        model.forward_with_cfg(x, paddle.to_tensor([1, 1]), paddle.to_tensor([0, 0]), 4.0)


def test_label_dropout_uses_the_null_class_only_in_training():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "class_dropout_prob": 0.5})
    embedder = DiR.from_spec(spec).y_embedder
    labels = paddle.arange(10)
    paddle.seed(0)
    dropped = embedder.token_drop(labels).numpy()
    assert set(dropped) <= set(range(11)) and (dropped == 10).any() and (dropped != 10).any()
    forced = embedder.token_drop(labels, paddle.to_tensor([1, 0] * 5)).numpy()
    assert (forced[::2] == 10).all() and (forced[1::2] == np.arange(1, 10, 2)).all()


def test_to_static_sampling_equals_eager():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "depth": 1})
    rng = np.random.default_rng(3)
    state = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in init_canonical(spec, 3).items()}
    eager = DiR(spec)
    eager.load_canonical(state)
    eager.eval()
    static = DiR(spec)
    static.load_canonical(state)
    static.eval()
    static = to_static(static)
    y = paddle.to_tensor([1, 4, 9])
    sampler = Sampler(make_schedule(1000, "linear", True), "ddim", 3, eta=0.0)
    images = []
    for model in (eager, static):
        images.append(sampler.sample(guided_model(model, y, 2.0, spec.num_classes), (3, 4, 8, 8),
                                     np.random.default_rng(0)).numpy())
    assert isinstance(static.forward, paddle.jit.dy2static.program_translator.StaticFunction)
    assert np.isfinite(images[0]).all()
    np.testing.assert_allclose(images[1], images[0], rtol=1e-5, atol=1e-5)


def test_vae_errors_say_what_to_do(tmp_path):
    from backends.paddle.vae import VAEError, load_vae

    with pytest.raises(VAEError, match="set 'vae_path'"):
        load_vae(None)
    with pytest.raises(VAEError, match="config.json"):
        load_vae(str(tmp_path))
    try:
        import ppdiffusers  # noqa: F401
    except ImportError:
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(VAEError, match="requirements/paddle-vae.txt"):
            load_vae(str(tmp_path))
