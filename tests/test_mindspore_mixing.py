"""The fused token mixing of ``backends/mindspore/mixing.py`` against its plain references: values,
every gradient (inputs and parameters), eager and compiled (``ms.jit``: Graph mode takes the fused
Cells' hand-written ``bprop`` too), the token shift's adjoint, and what the fused Cells keep for the
backward pass. Mirrors tests/test_torch_mixing.py, except:

* no bf16 autocast test: MindSpore's CPU kernels have no bf16 matmul, and the MindSpore backend runs
  fp32 (there is no autocast for the fused backward to follow);
* no saved-bytes test: MindSpore has no saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks)
  to count what autodiff keeps; what a fused Cell's ``bprop`` can keep is its inputs and outputs, and
  ``test_the_fused_cells_keep_only_narrow_extras`` checks those outputs instead;
* no token-blocking test (torch's ``test_token_blocks_are_exact``, and norm_modulate's blocked
  rerun): the MindSpore forms do not run over blocks of tokens (no ``ROW_BLOCK_ELEMENTS``).
"""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import Parameter, Tensor, nn  # noqa: E402

from backends.mindspore import mixing  # noqa: E402
from backends.mindspore.models import DiR  # noqa: E402
from common.spec import build_spec  # noqa: E402

ms.set_device("CPU")

SHIFTS = {
    "causal": {"scan": "causal"},
    "bidirectional": {"scan": "bidirectional"},
    "q_shift": {"scan": "bidirectional", "token_shift": "q_shift", "scan_order": "alternate"},
}
# fp32: MindSpore's CPU tanh (and exp) are hundreds to thousands of ulp off torch's correctly rounded
# ones, but the fused and plain forms call the same kernels on the same values, so the two differ by
# the order of the sums only (measured: 3e-7 of the largest gradient); 2e-5 as torch's test.
TOLERANCES = [(ms.float64, 1e-12), (ms.float32, 2e-5)]


def random_block(shift: str, dtype=ms.float64, width=32, tokens=16, seed=1):
    """Block 1 of a small model (scan order 'alternate' makes it non-raster), every parameter random
    (the zero init would hide most gradient terms) and of ``dtype``: new Parameters, since a
    Parameter's ``set_dtype`` leaves the gradients MindSpore returns for it in the old dtype."""
    spec = build_spec("DiR-Tiny/2", input_size=2 * int(tokens ** 0.5), in_channels=4, num_classes=10, depth=2,
                      hidden_size=width, head_size=8, mix_lora_rank=4, decay_lora_rank=4, **SHIFTS[shift])
    model = DiR.from_spec(spec, seed=seed)
    rng = np.random.default_rng(seed)
    for _, cell in model.cells_and_names():
        for attr, param in list(cell._params.items()):
            setattr(cell, attr, Parameter(Tensor(rng.standard_normal(param.shape) * 0.3, dtype), name=param.name))
    return model.blocks[1]


def random_inputs(count, dtype, shape=(2, 16, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal(shape), dtype) for _ in range(count)]


def values_and_grads(fn, module, inputs, compiled=False, seed=5):
    """fn(module, *inputs) and the gradients of a random projection of its outputs with respect to
    the inputs and every parameter of the module (zeros where the outputs do not reach), as numpy;
    ``compiled``: the whole step through ``ms.jit`` (Graph mode)."""
    params = module.trainable_params()
    rng = np.random.default_rng(seed)
    dtype = inputs[0].dtype
    probe = fn(module, *inputs)
    probe = probe if isinstance(probe, tuple) else (probe,)
    projections = [Tensor(rng.standard_normal(o.shape), dtype) for o in probe]

    def loss(*xs):
        outputs = fn(module, *xs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        total = (outputs[0] * projections[0]).sum()
        for o, p in zip(outputs[1:], projections[1:]):
            total = total + (o * p).sum()
        return total, outputs

    step = ms.value_and_grad(loss, grad_position=tuple(range(len(inputs))), weights=params, has_aux=True)
    if compiled:
        step = ms.jit(step)
    (_, outputs), (input_grads, param_grads) = step(*inputs)
    input_grads = input_grads if isinstance(input_grads, tuple) else (input_grads,)
    return [o.asnumpy() for o in outputs], [g.asnumpy() for g in (*input_grads, *param_grads)]


def assert_tied(fast, reference, tol):
    (fast_out, fast_grads), (ref_out, ref_grads) = fast, reference
    assert len(fast_out) == len(ref_out) and len(fast_grads) == len(ref_grads)
    for a, b in zip(fast_out, ref_out):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.abs(a - b).max() <= tol * np.abs(b).max()
    for i, (a, b) in enumerate(zip(fast_grads, ref_grads)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        if not b.any():  # a parameter the outputs do not reach (time_faaaa, ln_x, output)
            assert not a.any(), i
        else:
            assert np.abs(a - b).max() <= tol * np.abs(b).max(), i


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["fp64", "fp32"])
def test_fused_time_mix_inputs_equal_the_reference(shift, dtype, tol, compiled):
    block = random_block(shift, dtype)
    inputs = random_inputs(1, dtype)
    fast = values_and_grads(mixing.time_mix_inputs, block.att, inputs, compiled)
    assert len(fast[0]) == 5 and len(fast[1]) == 1 + len(block.att.trainable_params())
    assert_tied(fast, values_and_grads(mixing.time_mix_inputs_reference, block.att, inputs, compiled), tol)


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["fp64", "fp32"])
def test_fused_channel_mix_equals_the_reference(shift, dtype, tol, compiled):
    block = random_block(shift, dtype)
    inputs = random_inputs(1, dtype)
    assert_tied(values_and_grads(mixing.channel_mix, block.ffn, inputs, compiled),
                values_and_grads(mixing.channel_mix_reference, block.ffn, inputs, compiled), tol)


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["fp64", "fp32"])
def test_fused_gated_output_equals_the_reference(dtype, tol, compiled):
    block = random_block("bidirectional", dtype)
    inputs = random_inputs(2, dtype)
    assert_tied(values_and_grads(mixing.gated_output, block.att, inputs, compiled),
                values_and_grads(mixing.gated_output_reference, block.att, inputs, compiled), tol)


class _NormModulateArgs(nn.Cell):
    """norm_modulate's arguments as a Cell, so ``values_and_grads`` differentiates shift and scale."""

    def __init__(self, dtype, seed=1):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.shift = Parameter(Tensor(rng.standard_normal((2, 32)), dtype), name="shift")
        self.scale = Parameter(Tensor(rng.standard_normal((2, 32)), dtype), name="scale")


def _fused_norm_modulate(args, x):
    return mixing.norm_modulate(x, args.shift, args.scale, 1e-6)


def _reference_norm_modulate(args, x):
    return mixing.norm_modulate_reference(x, args.shift, args.scale, 1e-6)


# fp32: the values and shift's and scale's gradients are the same kernels on the same values (measured:
# equal); x's gradient is the LayerNorm backward's difference of three terms of about its own size,
# summed in another order than autodiff's, so it differs by about an ulp of them (measured: 1e-7 of
# the largest gradient, PyNative and jit); 1e-6 leaves ten times that (torch's test allows 2e-5).
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("dtype,tol", [(ms.float64, 1e-12), (ms.float32, 1e-6)], ids=["fp64", "fp32"])
def test_fused_norm_modulate_equals_the_reference(dtype, tol, compiled):
    args = _NormModulateArgs(dtype)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 16, 32)) * 3 + 1, dtype)
    fast = values_and_grads(_fused_norm_modulate, args, [x], compiled)
    assert len(fast[0]) == 1 and len(fast[1]) == 3  # x, shift, scale
    assert_tied(fast, values_and_grads(_reference_norm_modulate, args, [x], compiled), tol)


_sum_tokens = mixing._sum_tokens
_sum_each_sample = mixing._sum_each_sample


def _tripled_sum_tokens(x):
    return 3 * _sum_tokens(x)


def _tripled_sum_each_sample(x):
    return 3 * _sum_each_sample(x)


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
def test_the_hand_written_backward_runs_eagerly_and_compiled(compiled, monkeypatch):
    """With the backward's per-channel sums tripled, the per-channel gradients (time_maa_*,
    time_decay) come out tripled, the matrices' not: the fused Cells' ``bprop`` is what runs, not
    autodiff through their construct (fresh Cells, so no graph cached before the patch is reused)."""
    monkeypatch.setattr(mixing, "_sum_tokens", _tripled_sum_tokens)
    monkeypatch.setattr(mixing, "_time_mix_cell", mixing._TimeMixInputs)
    monkeypatch.setattr(mixing, "_channel_mix_cell", mixing._ChannelMix)
    block = random_block("bidirectional")
    inputs = random_inputs(1, ms.float64)
    for fast, reference, module in [(mixing.time_mix_inputs, mixing.time_mix_inputs_reference, block.att),
                                    (mixing.channel_mix, mixing.channel_mix_reference, block.ffn)]:
        names = ["x"] + [p.name.split(".", 3)[-1] for p in module.trainable_params()]
        fast_grads = values_and_grads(fast, module, inputs, compiled)[1]
        ref_grads = values_and_grads(reference, module, inputs, compiled)[1]
        tripled = [name for name, a, b in zip(names, fast_grads, ref_grads)
                   if b.any() and np.abs(a - 3 * b).max() <= 1e-12 * np.abs(b).max()]
        tied = [name for name, a, b in zip(names, fast_grads, ref_grads)
                if np.abs(a - b).max() <= 1e-12 * np.abs(b).max()]
        per_channel = [name for name in names if name.startswith(("time_maa_", "time_decay")) and
                       name not in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2")]
        assert sorted(tripled) == sorted(per_channel) and len(tied) == len(names) - len(per_channel), names


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
def test_the_norm_modulate_backward_runs_eagerly_and_compiled(compiled, monkeypatch):
    """As above for norm_modulate: with its per-sample sums tripled, shift's and scale's gradients
    come out tripled and x's not."""
    monkeypatch.setattr(mixing, "_sum_each_sample", _tripled_sum_each_sample)
    monkeypatch.setattr(mixing, "_norm_modulate_cell", mixing._NormModulate)
    args = _NormModulateArgs(ms.float64)
    (x,) = random_inputs(1, ms.float64)
    (grad_x, grad_shift, grad_scale), (ref_x, ref_shift, ref_scale) = (
        values_and_grads(fn, args, [x], compiled)[1] for fn in (_fused_norm_modulate, _reference_norm_modulate))
    assert np.abs(grad_x - ref_x).max() <= 1e-12 * np.abs(ref_x).max()
    for a, b in [(grad_shift, ref_shift), (grad_scale, ref_scale)]:
        assert np.abs(a - 3 * b).max() <= 1e-12 * np.abs(b).max()


def test_outputs_the_loss_does_not_reach_get_no_gradient_terms():
    block = random_block("bidirectional")
    (x,) = random_inputs(1, ms.float64)
    params = block.att.trainable_params()
    for pick in range(5):  # r, k, v, gate_pre, log_decay: the loss reads one of them
        grads = []
        for fn in (mixing.time_mix_inputs, mixing.time_mix_inputs_reference):
            step = ms.grad(lambda a, _fn=fn: _fn(block.att, a)[pick].sum(), grad_position=0, weights=params)
            input_grad, param_grads = step(x)
            grads.append([g.asnumpy() for g in (input_grad, *param_grads)])
        reached = 0
        for a, b in zip(*grads):
            if not b.any():
                assert not a.any(), pick  # exactly zero, as the reference
            else:
                reached += 1
                assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), pick
        assert reached >= 5, pick  # x, the mix LoRA and the branch's own parameters at least


@pytest.mark.parametrize("shift", SHIFTS)
def test_token_shift_transpose_is_the_adjoint(shift):
    att = random_block(shift).att
    x, g = random_inputs(2, ms.float64, shape=(3, 16, 32))
    shifted = mixing.token_shift(x, att.bidirectional, att.q_shift_index).asnumpy()
    back = mixing.token_shift_transpose(g, att.bidirectional, att.q_shift_index).asnumpy()
    xn, gn = x.asnumpy(), g.asnumpy()
    assert abs((shifted * gn).sum() - (xn * back).sum()) < 1e-12 * np.abs(xn).sum() * np.abs(gn).max()
    assert np.abs(back).max() > 0
    # and it is what autodiff gives
    _, pullback = ms.vjp(lambda a: mixing.token_shift(a, att.bidirectional, att.q_shift_index), x)
    (auto,) = pullback(g)
    assert np.array_equal(auto.asnumpy(), back)


def test_the_fused_cells_keep_only_narrow_extras():
    """What a fused Cell's ``bprop`` can hold is its inputs and outputs: beyond the public results,
    only the GroupNorm's per-head statistics [NT, H, 1], channel mixing's relu(Wk xk) [N, T, F],
    sigmoid(Wr xr) and Wv k^2 [N, T, D], and the LayerNorm's per-token statistics [N, T, 1] (what
    torch's fused forms save); time mixing has no extra output (its LoRA activations are recomputed)."""
    block = random_block("bidirectional")
    att, ffn = block.att, block.ffn
    (x,) = random_inputs(1, ms.float64)
    n, t, d = x.shape
    shift, index = mixing._shift_inputs(att)
    maa = ms.ops.stack([att.time_maa_w, att.time_maa_k, att.time_maa_v, att.time_maa_r, att.time_maa_g], 0)
    outputs = mixing._time_mix_cell(*shift)(
        x, index, att.time_maa_x, maa, att.time_maa_w1, att.time_maa_w2, att.time_decay, att.time_decay_w1,
        att.time_decay_w2, att.key.weight, att.value.weight, att.receptance.weight, att.gate.weight)
    assert [o.shape for o in outputs] == [(n, t, d)] * 5
    for a, b in zip(outputs[:5], mixing.time_mix_inputs_reference(att, x)):
        assert np.abs(a.asnumpy() - b.asnumpy()).max() <= 1e-12 * np.abs(b.asnumpy()).max()
    y, gate_pre = random_inputs(2, ms.float64, seed=1)
    outputs = mixing._gated_output_cell(att.ln_x.num_groups, att.ln_x.eps)(y, gate_pre, att.ln_x.gamma,
                                                                           att.ln_x.beta, att.output.weight)
    assert [o.shape for o in outputs] == [(n, t, d), (n * t, att.num_heads, 1), (n * t, att.num_heads, 1)]
    shift, index = mixing._shift_inputs(ffn)
    outputs = mixing._channel_mix_cell(*shift)(x, index, ffn.time_maa_k, ffn.time_maa_r, ffn.key.weight,
                                               ffn.receptance.weight, ffn.value.weight)
    f = ffn.key.weight.shape[0]
    assert [o.shape for o in outputs] == [(n, t, d), (n, t, f), (n, t, d), (n, t, d)]
    hidden, gate, value = (o.asnumpy() for o in outputs[1:])
    assert hidden.min() >= 0 and 0 < gate.min() and gate.max() < 1
    assert np.abs(gate * value - outputs[0].asnumpy()).max() == 0
    shift, scale = random_inputs(2, ms.float64, shape=(n, d), seed=2)
    outputs = mixing._norm_modulate_cell(1e-6)(x, shift, scale)
    assert [o.shape for o in outputs] == [(n, t, d), (n, t, 1), (n, t, 1)]
    reference = mixing.norm_modulate_reference(x, shift, scale, 1e-6).asnumpy()
    assert np.abs(outputs[0].asnumpy() - reference).max() <= 1e-12 * np.abs(reference).max()
    mean, inv_std = (o.asnumpy() for o in outputs[1:])
    xn = x.asnumpy()
    assert np.abs(mean - xn.mean(-1, keepdims=True)).max() <= 1e-12
    assert np.abs(inv_std - 1 / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)).max() <= 1e-12 * inv_std.max()
