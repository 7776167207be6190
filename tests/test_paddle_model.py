"""The Paddle DiR: names and layouts of the canonical table, loading errors, and
inference through paddle.jit.to_static (same images as eager)."""
import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from backends.paddle.diffusion import DDPMSampler  # noqa: E402
from backends.paddle.models import DiR  # noqa: E402
from backends.paddle.objectives import generate, guided_model  # noqa: E402
from backends.paddle.sample import SampleAdapter, sample, to_static  # noqa: E402
from common.checkpoint import save_canonical  # noqa: E402
from common.conditions import drop_conditions, null_condition  # noqa: E402
from common.config import SAMPLE_SCHEMA, parse_cli  # noqa: E402
from common.objectives import SamplerSettings  # noqa: E402
from common.param_mapping import to_framework  # noqa: E402
from common.params import init_canonical, parameter_table  # noqa: E402
from common.recipe import recipe_from_config  # noqa: E402
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


def perturbed(spec, seed=3):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in init_canonical(spec, seed).items()}


def test_cfg_needs_a_null_class():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "class_dropout_prob": 0.0})
    model = DiR.from_spec(spec)
    recipe = recipe_from_config({"objective": "ddpm"})
    settings = SamplerSettings("ddim", 2, cfg_scale=4.0)
    with pytest.raises(ValueError, match="no null condition"):
        generate(model, spec, recipe, settings, np.array([0, 1]), np.random.default_rng(0))


def test_null_class_row_and_condition_dropout():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "class_dropout_prob": 0.5})
    model = DiR.from_spec(spec)
    assert model.y_embedder.embedding_table.weight.shape[0] == spec.num_classes + 1
    labels = np.arange(6) % spec.num_classes
    dropped = drop_conditions(spec, labels, np.array([True, False, True, False, False, True]))
    assert dropped.tolist() == [spec.num_classes, 1, spec.num_classes, 3, 4, spec.num_classes]
    emb = model.y_embedder(paddle.to_tensor(null_condition(spec, 2))).numpy()
    table = model.y_embedder.embedding_table.weight.numpy()
    np.testing.assert_array_equal(emb, np.broadcast_to(table[spec.num_classes], emb.shape))
    model.train()  # the embedder only embeds: training mode drops nothing (the trainer draws the drops)
    labels = paddle.arange(spec.num_classes)
    np.testing.assert_array_equal(model.y_embedder(labels).numpy(), table[:spec.num_classes])
    no_null = build_spec("DiR-Tiny/2", **{**TINY, "class_dropout_prob": 0.0})
    assert DiR.from_spec(no_null).y_embedder.embedding_table.weight.shape[0] == spec.num_classes


def test_to_static_sampling_equals_eager():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "depth": 1})
    state = perturbed(spec)
    eager = DiR(spec)
    eager.load_canonical(state)
    eager.eval()
    static = DiR(spec)
    static.load_canonical(state)
    static.eval()
    static = to_static(static)
    y = paddle.to_tensor([1, 4, 9])
    null = paddle.to_tensor(null_condition(spec, 3))
    sampler = DDPMSampler(recipe_from_config({"objective": "ddpm"}), True, "ddim", 3, eta=0.0)
    images = []
    for model in (eager, static):
        images.append(sampler.sample(guided_model(model, y, null, 2.0, spec.in_channels), (3, 4, 8, 8),
                                     np.random.default_rng(0)).numpy())
    assert isinstance(static.forward, paddle.jit.dy2static.program_translator.StaticFunction)
    assert np.isfinite(images[0]).all()
    np.testing.assert_allclose(images[1], images[0], rtol=1e-5, atol=1e-5)


def test_paddle_to_static_key_runs_the_sampler_through_to_static(tmp_path):
    """``paddle_to_static: true`` in a sample config: the network is a static program, the images the eager ones."""
    spec = build_spec("DiR-Tiny/2", **{**TINY, "depth": 1})
    state = perturbed(spec)
    recipe = recipe_from_config({"objective": "flow", "flow_path": "gvp"})
    save_canonical(tmp_path / "w.safetensors", state, spec, {"recipe": recipe.to_json()})
    backend = SampleAdapter()
    backend.setup({"device": "cpu", "paddle_to_static": True})
    assert isinstance(backend.load_model(state, spec).forward, paddle.jit.dy2static.program_translator.StaticFunction)
    raw = {}
    for static in ("true", "false"):
        config, _ = parse_cli(["--ckpt", str(tmp_path / "w.safetensors"), "--out_dir", str(tmp_path / static),
                               "--classes", "[2, 7]", "--num_per_class", "1", "--sampler", "heun",
                               "--num_sampling_steps", "3", "--cfg_scale", "2.0", "--device", "cpu",
                               "--paddle_to_static", static], SAMPLE_SCHEMA, "test")
        raw[static] = sample(config, keep_raw=True)["raw"]
    assert np.isfinite(raw["false"]).all()
    np.testing.assert_allclose(raw["true"], raw["false"], rtol=1e-5, atol=1e-5)


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
