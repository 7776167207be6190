"""The PyTorch DiR: shapes, the canonical table, identity at init, guidance, causality."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch.models import DiR, DiRBlock  # noqa: E402
from common.params import init_canonical, parameter_table  # noqa: E402
from common.spec import build_spec  # noqa: E402

TINY = dict(hidden_size=64, depth=2, head_size=32, input_size=8, in_channels=3, num_classes=5,
            mix_lora_rank=8, decay_lora_rank=8)


def perturbed(spec, seed=0, scale=0.05):
    """Canonical weights with every tensor nudged, so zero-init layers do something."""
    rng = np.random.default_rng(seed)
    return {name: value + scale * rng.standard_normal(value.shape).astype(np.float32)
            for name, value in init_canonical(spec, seed).items()}


@pytest.mark.parametrize("options", [
    {}, {"scan": "causal"}, {"skip": True, "depth": 3}, {"pos_embed": "learned"},
    {"pos_embed": "none", "learn_sigma": False}, {"patch_size": 4},
])
def test_forward_shape_and_parameters_match_the_table(options):
    spec = build_spec("DiR-Tiny/2", **{**TINY, **options})
    model = DiR.from_spec(spec, seed=1)
    table = parameter_table(spec)
    assert [name for name, _ in model.named_parameters()] == [info.name for info in table]
    assert all(tuple(p.shape) == info.shape for (_, p), info in zip(model.named_parameters(), table))
    assert list(model.state_dict()) == [info.name for info in table]  # sincos is not saved
    x = torch.randn(3, spec.in_channels, spec.input_size, spec.input_size)
    out = model.eval()(x, torch.tensor([0, 500, 999]), torch.tensor([0, 1, 4]))
    assert out.shape == (3, spec.out_channels, spec.input_size, spec.input_size)


def test_canonical_round_trip_is_bit_exact():
    spec = build_spec("DiR-Tiny/2", **TINY, skip=True, pos_embed="learned")
    state = perturbed(spec)
    model = DiR(spec)
    model.load_canonical(state)
    exported = model.canonical_state()
    assert list(exported) == list(state)
    assert all(np.array_equal(exported[name], state[name]) for name in state)


def test_every_block_is_the_identity_at_init_and_the_output_is_zero():
    spec = build_spec("DiR-Tiny/2", **TINY)
    model = DiR.from_spec(spec, seed=0).eval()
    x = torch.randn(2, spec.num_patches, spec.hidden_size)
    c = torch.randn(2, spec.hidden_size)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 2]))
    assert not out.any()  # the final layer is zero-initialised too


def test_out_blocks_fuse_the_skip_and_are_otherwise_identity_at_init():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "skip": True, "depth": 4})
    model = DiR.from_spec(spec, seed=0).eval()
    x, skip = torch.randn(2, spec.num_patches, 64), torch.randn(2, spec.num_patches, 64)
    c = torch.randn(2, 64)
    out_block = model.blocks[spec.num_blocks - 1]
    assert isinstance(out_block, DiRBlock) and out_block.skip_linear is not None
    torch.testing.assert_close(out_block(x, c, skip), out_block.skip_linear(torch.cat([x, skip], -1)))


def test_causal_scan_never_looks_at_later_patches():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "scan": "causal", "in_channels": 1, "learn_sigma": False})
    model = DiR(spec).double().eval()
    model.load_canonical(perturbed(spec, scale=0.3))
    model.double()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[:, :, 6:] = torch.randn(1, 1, 2, 8, dtype=torch.float64)  # change the last patch row
    t, label = torch.tensor([10]), torch.tensor([2])
    a, b = model(x, t, label), model(y, t, label)
    torch.testing.assert_close(a[:, :, :6], b[:, :, :6], rtol=0, atol=1e-12)  # earlier rows untouched
    bidirectional = build_spec("DiR-Tiny/2", **{**TINY, "in_channels": 1, "learn_sigma": False})
    model = DiR(bidirectional).eval()
    model.load_canonical(perturbed(bidirectional, scale=0.3))
    a, b = model(x.float(), t, label), model(y.float(), t, label)
    assert (a[:, :, :6] - b[:, :, :6]).abs().max() > 1e-4


def test_null_class_row_and_condition_dropout():
    from common.conditions import drop_conditions, null_condition

    spec = build_spec("DiR-Tiny/2", **{**TINY, "class_dropout_prob": 0.5})
    model = DiR.from_spec(spec)
    assert model.y_embedder.embedding_table.weight.shape[0] == spec.num_classes + 1
    labels = np.arange(6) % spec.num_classes
    dropped = drop_conditions(spec, labels, np.array([True, False, True, False, False, True]))
    assert dropped.tolist() == [spec.num_classes, 1, spec.num_classes, 3, 4, spec.num_classes]
    emb = model.y_embedder(torch.from_numpy(null_condition(spec, 2)))
    torch.testing.assert_close(emb, model.y_embedder.embedding_table.weight[spec.num_classes].expand(2, -1))
    no_null = build_spec("DiR-Tiny/2", **{**TINY, "class_dropout_prob": 0.0})
    assert DiR.from_spec(no_null).y_embedder.embedding_table.weight.shape[0] == spec.num_classes
    with pytest.raises(ValueError, match="no null condition"):
        null_condition(no_null, 2)


def test_gradients_reach_every_parameter():
    spec = build_spec("DiR-Tiny/2", **{**TINY, "skip": True, "pos_embed": "learned"})
    model = DiR(spec).train()
    model.load_canonical(perturbed(spec, scale=0.1))
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 900]), torch.tensor([0, 3]))
    out.square().mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
