"""The spec, presets, canonical table, seeded init and framework mapping (numpy only)."""
import json

import numpy as np
import pytest

from common.checkpoint import CheckpointError, load_canonical, save_canonical
from common.param_mapping import from_framework, to_framework
from common.params import check_state, init_canonical, parameter_count, parameter_table
from common.spec import PRESETS, DiRSpec, SpecError, build_spec

# Parameter counts of the presets at ImageNet-256 latent settings (32x32x4, 1000 classes,
# learn_sigma, sincos), worked out by hand: a block has 20*D^2 + 466*D parameters. The
# README lists the same figures.
PRESET_COUNTS = {
    "DiR-S/2": 38_482_208, "DiR-S/4": 38_537_600, "DiR-S/8": 38_759_168,
    "DiR-B/2": 148_628_000, "DiR-L/2": 519_256_096, "DiR-XL/2": 763_700_000,
    "DiR-Tiny/2": 2_368_800,
}


@pytest.mark.parametrize("name,count", PRESET_COUNTS.items())
def test_preset_parameter_counts(name, count):
    assert parameter_count(build_spec(name)) == count


def test_presets_have_dit_names_and_widths():
    assert {f"DiR-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} <= set(PRESETS)
    spec = build_spec("DiR-XL/2")
    assert (spec.hidden_size, spec.depth, spec.num_heads) == (1152, 28, 18)
    assert build_spec("DiR-S/8").patch_size == 8


def test_same_seed_gives_identical_weights_and_other_seed_differs():
    spec = build_spec("DiR-Tiny/2", input_size=8, skip=True, pos_embed="learned")
    a, b, c = init_canonical(spec, 3), init_canonical(spec, 3), init_canonical(spec, 4)
    assert list(a) == [info.name for info in parameter_table(spec)]
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not np.array_equal(a["blocks.0.att.key.weight"], c["blocks.0.att.key.weight"])
    assert all(v.dtype == np.float32 for v in a.values())


def test_init_follows_rwkv6_and_adaln_zero_rules():
    spec = build_spec("DiR-Tiny/2", depth=4)
    state = init_canonical(spec, 0)
    d = spec.hidden_size
    n = np.arange(d)
    for layer in range(spec.num_blocks):
        r0 = layer / (spec.num_blocks - 1)
        expected = -6 + 5 * (n / (d - 1)) ** (0.7 + 1.3 * r0)
        np.testing.assert_allclose(state[f"blocks.{layer}.att.time_decay"], expected, rtol=1e-6)
        assert not state[f"blocks.{layer}.adaLN_modulation.1.weight"].any()
        assert state[f"blocks.{layer}.att.time_faaaa"].shape == (spec.num_heads, spec.head_size)
    # maa_x = 1 - (n/d)^(1 - layer/n_layer): layer 0 gives 1 - n/d
    np.testing.assert_allclose(state["blocks.0.att.time_maa_x"], 1 - n / d, rtol=1e-6)
    assert not state["final_layer.linear.weight"].any() and not state["final_layer.adaLN_modulation.1.bias"].any()
    bound = np.sqrt(6 / (2 * d))
    key = state["blocks.1.att.key.weight"]
    assert np.abs(key).max() <= bound and np.abs(key).max() > 0.9 * bound  # xavier-uniform
    assert abs(float(state["t_embedder.mlp.0.weight"].std()) - 0.02) < 0.002


def test_skip_layout_follows_uvit():
    spec = build_spec("DiR-Tiny/2", depth=6, skip=True)
    assert spec.num_blocks == 7 and spec.num_in_blocks == 3
    names = {info.name for info in parameter_table(spec)}
    assert {f"blocks.{i}.skip_linear.weight" for i in (4, 5, 6)} <= names
    assert not any(f"blocks.{i}.skip_linear" in n for i in range(4) for n in names)
    assert [spec.skip_source(i) for i in (4, 5, 6)] == [2, 1, 0]


@pytest.mark.parametrize("overrides,field,needle", [
    ({"hidden_size": 100}, "hidden_size", "multiple of head_size"),
    ({"input_size": 15}, "input_size", "multiple of patch_size"),
    ({"scan": "sideways"}, "scan", "causal, bidirectional"),
    ({"pos_embed": "rope"}, "pos_embed", "none, sincos, learned"),
    ({"skip": True, "depth": 1}, "depth", "depth >= 2"),
    ({"class_dropout_prob": 1.5}, "class_dropout_prob", "[0, 1)"),
    ({"depth": "12"}, "depth", "integer"),
])
def test_spec_validation_names_field_value_and_rule(overrides, field, needle):
    with pytest.raises(SpecError) as err:
        build_spec("DiR-S/2", **overrides)
    message = str(err.value)
    assert f"'{field}'" in message and needle in message and repr(list(overrides.values())[-1]) in message


def test_unknown_preset_and_field_suggest_the_closest():
    with pytest.raises(SpecError, match=r"unknown model preset 'DiR-S/3'.*did you mean"):
        build_spec("DiR-S/3")
    with pytest.raises(SpecError, match=r"unknown spec field 'hiden_size'.*did you mean 'hidden_size'"):
        build_spec("DiR-S/2", hiden_size=384)
    with pytest.raises(SpecError, match="unknown spec field 'colour'"):
        DiRSpec.from_dict({"colour": 1})


def test_spec_json_round_trip():
    spec = build_spec("DiR-B/4", skip=True, scan="causal", pos_embed="none", num_classes=7)
    assert DiRSpec.from_json(json.dumps(spec.to_dict())) == spec


def test_framework_mapping_round_trips_and_transposes_paddle_linears():
    spec = build_spec("DiR-Tiny/2", depth=2, skip=True, pos_embed="learned")
    state = init_canonical(spec, 1)
    paddle = to_framework("paddle", state, spec)
    assert paddle["blocks.0.att.key.weight"].shape == state["blocks.0.att.key.weight"].T.shape
    assert paddle["blocks.0.att.time_maa_w2"].shape == state["blocks.0.att.time_maa_w2"].shape
    ms = to_framework("mindspore", state, spec)
    assert "y_embedder.embedding_table.embedding_table" in ms and "blocks.0.att.ln_x.gamma" in ms
    for fw, fw_state in (("torch", state), ("paddle", paddle), ("mindspore", ms)):
        back = from_framework(fw, fw_state, spec)
        assert all(np.array_equal(back[k], state[k]) for k in state)


def test_mapping_lists_every_problem():
    spec = build_spec("DiR-Tiny/2", depth=2)
    state = init_canonical(spec, 0)
    state.pop("blocks.1.ffn.key.weight")
    state["blocks.0.att.key.weight"] = state["blocks.0.att.key.weight"][:, :5]
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        from_framework("torch", state, spec, source="ckpt.pth")
    text = str(err.value)
    assert "ckpt.pth" in text and "missing: blocks.1.ffn.key.weight" in text
    assert "wrong shape: blocks.0.att.key.weight is [128, 5], expected [128, 128]" in text
    assert "unexpected: extra.weight" in text
    with pytest.raises(ValueError, match="missing"):
        check_state(state, spec)


def test_canonical_safetensors_round_trip_and_errors(tmp_path):
    spec = build_spec("DiR-Tiny/2", depth=2, input_size=8, in_channels=1, num_classes=10)
    state = init_canonical(spec, 0)
    path = tmp_path / "w.safetensors"
    save_canonical(path, state, spec)
    loaded, loaded_spec = load_canonical(path)
    assert loaded_spec == spec and all(np.array_equal(loaded[k], state[k]) for k in state)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        load_canonical(truncated)
    with pytest.raises(CheckpointError, match="no such file"):
        load_canonical(tmp_path / "absent.safetensors")
