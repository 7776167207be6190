"""2-D token shift and scan orders (common/scan_orders.py, and each block of the PyTorch DiR).

Every vectorised form is tied to a plain token-by-token loop: the orders to walks written
out, q_shift to Vision-RWKV's quarter-by-quarter copy, a permuted block to a raster block
run on tokens picked one by one. Paddle and MindSpore are tied to PyTorch by their parity
tests (families q_shift, alternate, zigzag).
"""
import json

import numpy as np
import pytest

from common.params import parameter_table
from common.scan_orders import (
    ORDER_NAMES, SCAN_ORDER_CHOICES, TOKEN_SHIFT_CHOICES, BlockLayout, block_order_name, grid_neighbours,
    inverse_order, q_shift_index, q_shift_reference, token_order,
)
from common.spec import DiRSpec, SpecError, build_spec

TINY = dict(hidden_size=64, depth=4, head_size=32, input_size=10, in_channels=1, num_classes=3,
            mix_lora_rank=8, decay_lora_rank=8, learn_sigma=False)


def walk(name, grid):
    """The orders, token by token, as a person would describe them."""
    tokens = []
    for outer in range(grid):
        inner = range(grid)
        if name.startswith("snake") and outer % 2:
            inner = reversed(range(grid))
        for i in inner:
            row, column = (outer, i) if name.endswith("rows") else (i, outer)
            tokens.append(row * grid + column)
    return np.array(tokens)


@pytest.mark.parametrize("grid", [1, 2, 3, 5, 16])
def test_orders_are_the_walks_they_name(grid):
    for name in ORDER_NAMES:
        order = token_order(name, grid)
        np.testing.assert_array_equal(order, walk(name, grid))
        assert sorted(order) == list(range(grid * grid))  # a permutation
        np.testing.assert_array_equal(order[inverse_order(order)], np.arange(grid * grid))
    # the snakes step only between grid neighbours, also where a row (column) turns
    for name in ("snake_rows", "snake_columns"):
        rows, columns = np.divmod(token_order(name, grid), grid)
        assert np.all(np.abs(np.diff(rows)) + np.abs(np.diff(columns)) == 1)


def test_which_block_reads_in_which_order():
    assert [block_order_name("raster", i) for i in range(4)] == ["rows"] * 4
    assert [block_order_name("alternate", i) for i in range(4)] == ["rows", "columns", "rows", "columns"]
    assert [block_order_name("zigzag", i) for i in range(4)] == ["snake_rows", "snake_columns"] * 2


@pytest.mark.parametrize("name", ORDER_NAMES)
def test_neighbours_are_the_grid_neighbours_in_every_order(name):
    grid = 4
    order = token_order(name, grid)
    neighbours = grid_neighbours(order, grid)
    for j, token in enumerate(order):
        row, column = divmod(int(token), grid)
        for q, (d_row, d_column) in enumerate([(0, -1), (0, 1), (-1, 0), (1, 0)]):
            r, c = row + d_row, column + d_column
            expected = grid * grid if not (0 <= r < grid and 0 <= c < grid) else int(np.flatnonzero(order == r * grid + c)[0])
            assert neighbours[q, j] == expected, (name, j, q)


def test_q_shift_reference_is_vision_rwkv_quarters():
    """On a 3x3 grid with one channel per quarter, read the copies off by hand."""
    x = np.arange(9 * 4, dtype=np.float32).reshape(1, 9, 4) + 1  # token t, quarter q -> 4t + q + 1
    out = q_shift_reference(x, 3)
    centre = out[0, 4]  # row 1, column 1
    assert centre.tolist() == [x[0, 3, 0], x[0, 5, 1], x[0, 1, 2], x[0, 7, 3]]  # left, right, above, below
    corner = out[0, 0]  # nothing left of it, nothing above
    assert corner.tolist() == [0, x[0, 1, 1], 0, x[0, 3, 3]]


@pytest.mark.parametrize("name", ORDER_NAMES)
def test_the_gather_index_is_q_shift_in_any_order(name):
    grid, rng = 5, np.random.default_rng(0)
    x = rng.standard_normal((2, grid * grid, 12)).astype(np.float32)
    order = token_order(name, grid)
    index = q_shift_index(grid_neighbours(order, grid))
    n, t, d = x.shape
    padded = np.concatenate([x[:, order], np.zeros((n, 1, d), np.float32)], 1).reshape(n, 4 * (t + 1), d // 4)
    shifted = padded[:, index].reshape(n, t, d)  # what the backends do, in the block's order
    np.testing.assert_array_equal(shifted, q_shift_reference(x, grid)[:, order])


def test_the_spec_fields_their_checks_and_older_specs():
    spec = build_spec("DiR-Tiny/2", token_shift="q_shift", scan_order="zigzag")
    assert DiRSpec.from_json(spec.to_json()) == spec
    older = {k: v for k, v in spec.to_dict().items() if k not in ("token_shift", "scan_order")}
    assert (DiRSpec.from_dict(older).token_shift, DiRSpec.from_dict(older).scan_order) == ("raster", "raster")
    assert TOKEN_SHIFT_CHOICES == ("raster", "q_shift") and SCAN_ORDER_CHOICES == ("raster", "alternate", "zigzag")
    with pytest.raises(SpecError, match="spec field 'scan_order' = 'spiral': allowed: raster, alternate, zigzag"):
        build_spec("DiR-Tiny/2", scan_order="spiral")
    with pytest.raises(SpecError, match="'token_shift' = 'q_shift': q_shift mixes the right and lower"):
        build_spec("DiR-Tiny/2", token_shift="q_shift", scan="causal")
    with pytest.raises(SpecError, match="'hidden_size' = 66: must be a multiple of 4 for q_shift"):
        build_spec("DiR-Tiny/2", hidden_size=66, head_size=33, pos_embed="none", token_shift="q_shift")
    # parameter-free: every setting has the same canonical table
    tables = {(ts, so): [(i.name, i.shape) for i in parameter_table(build_spec("DiR-Tiny/2", token_shift=ts,
                                                                                 scan_order=so))]
              for ts in TOKEN_SHIFT_CHOICES for so in SCAN_ORDER_CHOICES}
    assert len({json.dumps(t) for t in tables.values()}) == 1


def test_block_layouts():
    spec = build_spec("DiR-Tiny/2", **TINY, token_shift="q_shift", scan_order="alternate")
    first, second = BlockLayout(spec, 0), BlockLayout(spec, 1)
    assert first.order is None and first.inverse is None  # raster: no gather at all
    np.testing.assert_array_equal(second.order, token_order("columns", 5))
    assert first.q_shift_index.shape == (4 * 25,)
    assert BlockLayout(build_spec("DiR-Tiny/2", **TINY), 1).q_shift_index is None


# ---- the PyTorch blocks ---------------------------------------------------------------------

def _torch_block(spec, index, seed=0):
    torch = pytest.importorskip("torch")
    from backends.torch.models import DiR
    from tests.test_torch_model import perturbed

    model = DiR(spec).double().eval()
    model.load_canonical(perturbed(spec, seed=seed, scale=0.3))
    model.double()
    return torch, model.blocks[index]


@pytest.mark.parametrize("token_shift,scan_order,scan", [
    ("raster", "alternate", "bidirectional"), ("raster", "zigzag", "causal"),
    ("q_shift", "alternate", "bidirectional"), ("q_shift", "zigzag", "bidirectional"),
])
def test_a_permuted_block_is_a_raster_block_on_tokens_picked_one_by_one(token_shift, scan_order, scan):
    spec = build_spec("DiR-Tiny/2", **TINY, token_shift=token_shift, scan_order=scan_order, scan=scan)
    torch, block = _torch_block(spec, 1)
    order = token_order(block_order_name(scan_order, 1), spec.grid_size)
    x = torch.randn(2, spec.num_patches, spec.hidden_size, dtype=torch.float64)
    c = torch.randn(2, spec.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        out = block(x, c)
        # the reference: tokens taken one at a time into a plain sequence, shifted by the plain
        # rule (previous / next token, or q_shift_reference on the raster grid), then put back
        sequence = torch.stack([x[:, int(token)] for token in order], 1)
        block.order = None
        if token_shift == "q_shift":
            for mix in (block.att, block.ffn):
                mix.q_shift_index = None
            from backends.torch import mixing  # the home of token_shift, which the fused mixes call

            plain = mixing.token_shift
            inverse = inverse_order(order)

            def shift_by_loops(seq, bidirectional, _index=None):
                raster = torch.stack([seq[:, int(inverse[token])] for token in range(len(order))], 1)
                shifted = torch.from_numpy(q_shift_reference(raster.numpy(), spec.grid_size))
                return torch.stack([shifted[:, int(token)] for token in order], 1)

            mixing.token_shift = shift_by_loops
            try:
                reference_sequence = block(sequence, c)
            finally:
                mixing.token_shift = plain
        else:
            reference_sequence = block(sequence, c)
        reference = torch.empty_like(x)
        for j, token in enumerate(order):
            reference[:, int(token)] = reference_sequence[:, j]
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scan_order", ["alternate", "zigzag"])
def test_causal_blocks_look_only_at_earlier_tokens_of_their_order(scan_order):
    spec = build_spec("DiR-Tiny/2", **TINY, scan="causal", scan_order=scan_order)
    for index in (0, 1):
        torch, block = _torch_block(spec, index, seed=index)
        order = token_order(block_order_name(scan_order, index), spec.grid_size)
        x = torch.randn(1, spec.num_patches, spec.hidden_size, dtype=torch.float64)
        c = torch.randn(1, spec.hidden_size, dtype=torch.float64)
        j = 11  # change the token read 12th
        y = x.clone()
        y[:, int(order[j])] += torch.randn(spec.hidden_size, dtype=torch.float64)
        with torch.no_grad():
            a, b = block(x, c)[:, order], block(y, c)[:, order]  # in the block's order
        torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-12)
        assert (a[:, j + 1:] - b[:, j + 1:]).abs().amax(-1).min() > 1e-6  # every later token saw it


def test_a_checkpoint_loads_with_any_setting_and_sampling_uses_the_saved_one(tmp_path):
    torch = pytest.importorskip("torch")
    from backends.torch.models import DiR
    from backends.torch.sample import load_model
    from common.formats import write_checkpoint
    from tests.test_torch_model import perturbed

    trained = build_spec("DiR-Tiny/2", **TINY, token_shift="q_shift", scan_order="zigzag")
    state = perturbed(trained, scale=0.2)
    path = tmp_path / "zigzag.safetensors"
    write_checkpoint(path, "safetensors", state, trained)
    model, spec, _ = load_model(str(path), "ema", "cpu")
    assert (spec.token_shift, spec.scan_order) == ("q_shift", "zigzag")
    x, t, y = torch.randn(2, 1, 10, 10), torch.tensor([3.0, 700.0]), torch.tensor([0, 2])
    reference = DiR(trained)
    reference.load_canonical(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference.eval()(x, t, y), rtol=0, atol=0)
        raster = DiR(build_spec("DiR-Tiny/2", **TINY))
        raster.load_canonical(state)  # the same table: loads, and computes something else
        assert (raster.eval()(x, t, y) - reference(x, t, y)).abs().max() > 1e-3


def test_train_configs_take_both_keys_and_name_a_bad_value(tmp_path):
    from common.config import TRAIN_SCHEMA, ConfigError, parse_cli
    from common.data import build_source
    from common.training import model_spec

    argv = ["--dataset", "digits", "--image_size", "8", "--model", "DiR-Tiny/2"]
    config = parse_cli([*argv, "--token_shift", "q_shift", "--scan_order", "alternate"], TRAIN_SCHEMA, "train")[0]
    spec = model_spec(config, build_source(config))
    assert (spec.token_shift, spec.scan_order) == ("q_shift", "alternate")
    default = model_spec(parse_cli(argv, TRAIN_SCHEMA, "train")[0], build_source(config))
    assert (default.token_shift, default.scan_order) == ("raster", "raster")
    with pytest.raises((ConfigError, SystemExit)):
        parse_cli([*argv, "--scan_order", "spiral"], TRAIN_SCHEMA, "train")
