"""The fused token mixing of ``backends/paddle/mixing.py`` against its plain references: values,
every gradient, the token shift's adjoint, and what the fused forms keep for the backward pass.

The cases of tests/test_torch_mixing.py, with random values drawn from numpy (Paddle has no
generator objects). Its bf16-autocast case cannot run (Paddle's CPU build has no bf16 kernels and
``paddle.amp.auto_cast`` has no effect on CPU); a test of its premise, that each backward runs
under its forward's autocast, stands in for it.
"""
import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from backends.paddle import mixing  # noqa: E402
from backends.paddle.models import DiR  # noqa: E402
from backends.paddle.wkv import wkv6  # noqa: E402
from common.spec import build_spec  # noqa: E402

pytestmark = pytest.mark.paddle

SHIFTS = {
    "causal": {"scan": "causal"},
    "bidirectional": {"scan": "bidirectional"},
    "q_shift": {"scan": "bidirectional", "token_shift": "q_shift", "scan_order": "alternate"},
}


def random_block(shift: str, dtype="float64", width=32, tokens=16, seed=1):
    """Block 1 of a small model (scan order 'alternate' makes it non-raster), every parameter random
    (the zero init would hide most gradient terms)."""
    spec = build_spec("DiR-Tiny/2", input_size=2 * int(tokens ** 0.5), in_channels=4, num_classes=10, depth=2,
                      hidden_size=width, head_size=8, mix_lora_rank=4, decay_lora_rank=4, **SHIFTS[shift])
    model = DiR.from_spec(spec, seed=seed)
    # Layer.to / Layer.double also cast the int64 index buffers; floating_only keeps them (what Layer.float does)
    model._to_impl(dtype=dtype, floating_only=True, include_sublayers=True)
    gen = np.random.default_rng(seed)
    with paddle.no_grad():
        for p in model.parameters():
            p.set_value((gen.standard_normal(p.shape) * 0.3).astype(dtype))
    return model.blocks[1]


def tensor(array, grad=False):
    x = paddle.to_tensor(array)
    x.stop_gradient = not grad
    return x


def random_inputs(count, dtype, shape=(2, 16, 32), grad=True, seed=0):
    gen = np.random.default_rng(seed)
    return [tensor(gen.standard_normal(shape).astype(dtype), grad) for _ in range(count)]


def values_and_grads(fn, module, inputs, seed=5):
    """fn(module, *inputs) and the gradients of a random projection of its outputs with respect
    to the inputs and every parameter of the module (None where the outputs do not reach)."""
    outputs = fn(module, *inputs)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    gen = np.random.default_rng(seed)
    loss = sum((o * tensor(gen.standard_normal(o.shape)).astype(o.dtype)).sum() for o in outputs)
    wrt = [*inputs, *module.parameters()]
    return outputs, paddle.grad([loss], wrt, allow_unused=True)


def max_abs(x) -> float:
    return float(np.abs(np.asarray(x, dtype=np.float64)).max())


def assert_tied(fast, reference, tol):
    (fast_out, fast_grads), (ref_out, ref_grads) = fast, reference
    assert len(fast_out) == len(ref_out)
    for a, b in zip(fast_out, ref_out):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert max_abs(a.numpy() - b.numpy()) <= tol * max_abs(b.numpy())
    assert len(fast_grads) == len(ref_grads)
    for i, (a, b) in enumerate(zip(fast_grads, ref_grads)):
        assert (a is None) == (b is None), i
        if b is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, i
            assert max_abs(b.numpy()) > 0, i  # a gradient the random block reaches
            assert max_abs(a.numpy() - b.numpy()) <= tol * max_abs(b.numpy()), i


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_fused_time_mix_inputs_equal_the_reference(shift, dtype, tol):
    block = random_block(shift, dtype)
    (x,) = random_inputs(1, dtype)
    assert_tied(values_and_grads(mixing.time_mix_inputs, block.att, (x,)),
                values_and_grads(mixing.time_mix_inputs_reference, block.att, (x,)), tol)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_fused_channel_mix_equals_the_reference(shift, dtype, tol):
    block = random_block(shift, dtype)
    (x,) = random_inputs(1, dtype)
    assert_tied(values_and_grads(mixing.channel_mix, block.ffn, (x,)),
                values_and_grads(mixing.channel_mix_reference, block.ffn, (x,)), tol)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_fused_gated_output_equals_the_reference(dtype, tol):
    block = random_block("bidirectional", dtype)
    y, gate_pre = random_inputs(2, dtype)
    assert_tied(values_and_grads(mixing.gated_output, block.att, (y, gate_pre)),
                values_and_grads(mixing.gated_output_reference, block.att, (y, gate_pre)), tol)


class _NormModulateArgs(paddle.nn.Layer):
    """norm_modulate's arguments as a layer, so ``values_and_grads`` differentiates shift and scale."""

    def __init__(self, dtype, gen):
        super().__init__()
        self.shift, self.scale = (self.create_parameter([2, 32], dtype=dtype) for _ in range(2))
        for p in (self.shift, self.scale):
            p.set_value(gen.standard_normal((2, 32)).astype(dtype))


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_fused_norm_modulate_equals_the_reference(dtype, tol):
    """Values and the gradients of x, shift and scale (torch's case; Paddle's form does not block,
    so its blocked half has no counterpart). x without a gradient gets None, shift and scale theirs."""
    gen = np.random.default_rng(0)
    args = _NormModulateArgs(dtype, gen)
    x = tensor((gen.standard_normal((2, 16, 32)) * 3 + 1).astype(dtype), grad=True)
    fast = lambda m, x: mixing.norm_modulate(x, m.shift, m.scale, 1e-6)  # noqa: E731
    reference = lambda m, x: mixing.norm_modulate_reference(x, m.shift, m.scale, 1e-6)  # noqa: E731
    assert_tied(values_and_grads(fast, args, (x,)), values_and_grads(reference, args, (x,)), tol)
    frozen = tensor(x.numpy())
    fast_grads = values_and_grads(fast, args, (frozen,))
    assert fast_grads[1][0] is None
    assert_tied(fast_grads, values_and_grads(reference, args, (frozen,)), tol)


def test_outputs_the_loss_does_not_reach_get_no_gradient_terms():
    block = random_block("bidirectional")
    (x,) = random_inputs(1, "float64")
    for pick in range(5):  # r, k, v, gate_pre, log_decay: the loss reads one of them
        fast = mixing.time_mix_inputs(block.att, x)[pick].sum()
        ref = mixing.time_mix_inputs_reference(block.att, x)[pick].sum()
        params = [x, *block.att.parameters()]
        for i, (a, b) in enumerate(zip(paddle.grad([fast], params, allow_unused=True),
                                       paddle.grad([ref], params, allow_unused=True))):
            if b is None:  # the fused form gives zeros for a parameter of a branch the loss skips
                assert a is None or max_abs(a.numpy()) == 0, (pick, i)
            else:
                assert a is not None, (pick, i)
                assert max_abs(a.numpy() - b.numpy()) <= 1e-12 * max(1.0, max_abs(b.numpy())), (pick, i)


def test_inputs_without_gradient_get_none_and_inference_takes_the_reference():
    """A PyLayer must give None for an input with stop_gradient; under paddle.no_grad nothing is
    recorded (the reference runs) and the values are the same."""
    block = random_block("q_shift")
    (x,) = random_inputs(1, "float64", grad=False)
    out = mixing.channel_mix(block.ffn, x)
    assert not out.stop_gradient
    out.sum().backward()  # Paddle raises here if the backward gives x a gradient
    assert x.grad is None
    assert all(p.grad is not None and max_abs(p.grad.numpy()) > 0 for p in block.ffn.parameters())
    with paddle.no_grad():
        plain = mixing.channel_mix(block.ffn, x)
    assert plain.stop_gradient
    assert max_abs(plain.numpy() - out.numpy()) <= 1e-12 * max_abs(out.numpy())


@pytest.mark.filterwarnings("ignore:amp_guard can only be enabled")  # the backward's own auto_cast, on CPU
def test_each_backward_runs_under_its_forwards_autocast(monkeypatch):
    """The bf16 case of tests/test_torch_mixing.py cannot run here (Paddle's CPU build has no bf16
    kernels; ``auto_cast`` has no effect on CPU), so this checks its premise: each fused backward
    runs under the ``paddle.amp.auto_cast`` arguments of its forward, though the loss is
    differentiated outside it, and leaves the gradients as they are without autocast."""
    from paddle.amp.auto_cast import amp_state

    seen = []
    for name in ("_time_mix_inputs_backward", "_gated_output_backward", "_channel_mix_backward"):
        def recording(*args, _original=getattr(mixing, name), _name=name):
            state = amp_state()
            seen.append((_name, None if state is None else (state["level"], state["dtype"])))
            return _original(*args)

        monkeypatch.setattr(mixing, name, recording)
    block = random_block("bidirectional", "float32")
    (x,) = random_inputs(1, "float32")
    weights = tensor(np.random.default_rng(3).standard_normal(x.shape).astype("float32"))
    plain = paddle.grad([(block.ffn(block.att(x)) * weights).sum()], [x, *block.parameters()], allow_unused=True)
    assert sorted(seen) == [("_channel_mix_backward", None), ("_gated_output_backward", None),
                            ("_time_mix_inputs_backward", None)]
    seen.clear()
    with pytest.warns(UserWarning, match="no effect"), paddle.amp.auto_cast(level="O1", dtype="bfloat16"):
        out = block.ffn(block.att(x))
    cast = paddle.grad([(out * weights).sum()], [x, *block.parameters()], allow_unused=True)
    assert sorted(seen) == [(name, ("O1", "bfloat16")) for name in
                            ("_channel_mix_backward", "_gated_output_backward", "_time_mix_inputs_backward")]
    for a, b in zip(cast, plain):
        assert (a is None) == (b is None)
        if b is not None:
            assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("shift", SHIFTS)
def test_token_shift_transpose_is_the_adjoint(shift):
    block = random_block(shift)
    att = block.att
    x, g = random_inputs(2, "float64", shape=(3, 16, 32), grad=False)
    shifted = mixing.token_shift(x, att.bidirectional, att.q_shift_index)
    back = mixing.token_shift_transpose(g, att.bidirectional, att.q_shift_index)
    assert back.shape == x.shape
    assert abs(float((shifted * g).sum() - (x * back).sum())) < 1e-12 * float(x.abs().sum() * g.abs().max())
    # and it is what autograd gives
    leaf = tensor(x.numpy(), grad=True)
    (auto,) = paddle.grad([mixing.token_shift(leaf, att.bidirectional, att.q_shift_index)], [leaf], [g])
    assert np.array_equal(auto.numpy(), back.numpy())


def saved_bytes(fn, module):
    """Bytes of the distinct tensors autograd keeps for the backward pass while fn() runs
    (the module's parameters excluded), by ``paddle.autograd.saved_tensors_hooks``, which also
    sees what a PyLayer's ``save_for_backward`` keeps."""
    parameters = {p.data_ptr() for p in module.parameters()}
    seen = {}

    def pack(x):
        if x._is_initialized() and x.data_ptr() not in parameters:
            seen[x.data_ptr()] = x.numel().item() * x.element_size()
        return x

    with paddle.autograd.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("shift", ["causal", "bidirectional"])
def test_a_block_keeps_under_half_of_what_autograd_keeps(shift):
    """Saved for the backward pass by TimeMix + ChannelMix at 1024 tokens, in D-sized fp32 tensors
    per token. The fused forms keep each mix's input x, r, k, v, the log-decay, the gate, the WKV
    output and the group norm's statistics, relu(Wk xk) (4), sigmoid(Wr xr) and Wv k^2 (14.25, as
    torch's), and the WKV's chunk-start states (D/8 a direction at head size 8): 14.38 causal,
    14.5 bidirectional, byte for byte what PyTorch keeps. Autograd through the references keeps 36.1."""
    width, tokens = 64, 1024
    block = random_block(shift, "float32", width=width, tokens=tokens)
    (x,) = random_inputs(1, "float32", shape=(1, tokens, width))
    unit = tokens * width * 4
    fused = saved_bytes(lambda: block.ffn(block.att(x)), block) / unit

    def reference():
        att = block.att
        r, k, v, gate_pre, log_decay = mixing.time_mix_inputs_reference(att, x)
        heads = [1, tokens, att.num_heads, att.head_size]
        y = wkv6(r.reshape(heads), k.reshape(heads), v.reshape(heads), log_decay.reshape(heads), att.time_faaaa,
                 bidirectional=att.bidirectional)
        mixing.channel_mix_reference(block.ffn, mixing.gated_output_reference(att, y.reshape([1, tokens, width]),
                                                                             gate_pre))

    plain = saved_bytes(reference, block) / unit
    assert fused == pytest.approx({"causal": 14.38, "bidirectional": 14.5}[shift], abs=0.02), fused
    assert plain >= 36.0, plain  # 36.06, 36.19
