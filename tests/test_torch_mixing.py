"""The fused token mixing of ``backends/torch/mixing.py`` against its plain references: values,
every gradient, the token shift's adjoint, and what the fused forms keep for the backward pass."""
import pytest

torch = pytest.importorskip("torch")

from backends.torch import mixing  # noqa: E402
from backends.torch.models import DiR  # noqa: E402
from backends.torch.wkv import wkv6  # noqa: E402
from common.spec import build_spec  # noqa: E402

SHIFTS = {
    "causal": {"scan": "causal"},
    "bidirectional": {"scan": "bidirectional"},
    "q_shift": {"scan": "bidirectional", "token_shift": "q_shift", "scan_order": "alternate"},
}


def random_block(shift: str, dtype=torch.float64, width=32, tokens=16, seed=1):
    """Block 1 of a small model (scan order 'alternate' makes it non-raster), every parameter random
    (the zero init would hide most gradient terms)."""
    spec = build_spec("DiR-Tiny/2", input_size=2 * int(tokens ** 0.5), in_channels=4, num_classes=10, depth=2,
                      hidden_size=width, head_size=8, mix_lora_rank=4, decay_lora_rank=4, **SHIFTS[shift])
    model = DiR.from_spec(spec, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    return model.blocks[1]


def values_and_grads(fn, module, inputs, seed=5):
    """fn(module, *inputs) and the gradients of a random projection of its outputs with respect
    to the inputs and every parameter of the module (None where the outputs do not reach)."""
    outputs = fn(module, *inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs)
    wrt = [*inputs, *module.parameters()]
    return outputs, torch.autograd.grad(loss, wrt, allow_unused=True)


def assert_tied(fast, reference, tol):
    (fast_out, fast_grads), (ref_out, ref_grads) = fast, reference
    for a, b in zip((o.detach() for o in fast_out), (o.detach() for o in ref_out)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert float((a - b).abs().max()) <= tol * float(b.detach().abs().max())
    for i, (a, b) in enumerate(zip(fast_grads, ref_grads)):
        assert (a is None) == (b is None), i
        if b is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, i
            assert float((a - b).abs().max()) <= tol * float(b.abs().max()), i


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_time_mix_inputs_equal_the_reference(shift, dtype, tol):
    block = random_block(shift, dtype)
    x = torch.randn(2, 16, 32, dtype=dtype, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert_tied(values_and_grads(mixing.time_mix_inputs, block.att, (x,)),
                values_and_grads(mixing.time_mix_inputs_reference, block.att, (x,)), tol)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_channel_mix_equals_the_reference(shift, dtype, tol):
    block = random_block(shift, dtype)
    x = torch.randn(2, 16, 32, dtype=dtype, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert_tied(values_and_grads(mixing.channel_mix, block.ffn, (x,)),
                values_and_grads(mixing.channel_mix_reference, block.ffn, (x,)), tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_gated_output_equals_the_reference(dtype, tol):
    block = random_block("bidirectional", dtype)
    gen = torch.Generator().manual_seed(0)
    y, gate_pre = (torch.randn(2, 16, 32, dtype=dtype, generator=gen, requires_grad=True) for _ in range(2))
    assert_tied(values_and_grads(mixing.gated_output, block.att, (y, gate_pre)),
                values_and_grads(mixing.gated_output_reference, block.att, (y, gate_pre)), tol)


@pytest.mark.parametrize("shift", SHIFTS)
def test_token_blocks_are_exact(shift, monkeypatch):
    """Blocks of 3 tokens of the 2 x 16 (a remainder of one; the channel mix's 4x width: one token):
    the forward values and every gradient equal the reference's as with one block."""
    monkeypatch.setattr(mixing, "ROW_BLOCK_ELEMENTS", 3 * 2 * 32)
    assert len(mixing._token_blocks(2, 16, 32)) == 6
    block = random_block(shift)
    gen = torch.Generator().manual_seed(0)
    x, y, gate_pre = (torch.randn(2, 16, 32, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    assert_tied(values_and_grads(mixing.time_mix_inputs, block.att, (x,)),
                values_and_grads(mixing.time_mix_inputs_reference, block.att, (x,)), 1e-12)
    assert_tied(values_and_grads(mixing.channel_mix, block.ffn, (x,)),
                values_and_grads(mixing.channel_mix_reference, block.ffn, (x,)), 1e-12)
    assert_tied(values_and_grads(mixing.gated_output, block.att, (y, gate_pre)),
                values_and_grads(mixing.gated_output_reference, block.att, (y, gate_pre)), 1e-12)


class _NormModulateArgs(torch.nn.Module):
    """norm_modulate's arguments as a module, so ``values_and_grads`` differentiates shift and scale."""

    def __init__(self, dtype, gen):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.randn(2, 32, dtype=dtype, generator=gen))
        self.scale = torch.nn.Parameter(torch.randn(2, 32, dtype=dtype, generator=gen))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_norm_modulate_equals_the_reference(dtype, tol, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    args = _NormModulateArgs(dtype, gen)
    x = (torch.randn(2, 16, 32, dtype=dtype, generator=gen) * 3 + 1).requires_grad_()
    fast = lambda m, x: mixing.norm_modulate(x, m.shift, m.scale, 1e-6)  # noqa: E731
    reference = lambda m, x: mixing.norm_modulate_reference(x, m.shift, m.scale, 1e-6)  # noqa: E731
    assert_tied(values_and_grads(fast, args, (x,)), values_and_grads(reference, args, (x,)), tol)
    monkeypatch.setattr(mixing, "ROW_BLOCK_ELEMENTS", 3 * 2 * 32)  # blocks of 6 rows
    assert_tied(values_and_grads(fast, args, (x,)), values_and_grads(reference, args, (x,)), tol)


def test_outputs_the_loss_does_not_reach_get_no_gradient_terms():
    block = random_block("bidirectional")
    x = torch.randn(2, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for pick in range(5):  # r, k, v, gate_pre, log_decay: the loss reads one of them
        fast = mixing.time_mix_inputs(block.att, x)[pick].sum()
        ref = mixing.time_mix_inputs_reference(block.att, x)[pick].sum()
        params = [x, *block.att.parameters()]
        for a, b in zip(torch.autograd.grad(fast, params, allow_unused=True),
                        torch.autograd.grad(ref, params, allow_unused=True)):
            assert (a is None and b is None) or (a is not None and b is None and float(a.abs().max()) == 0) or \
                float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("shift", SHIFTS)
def test_token_shift_transpose_is_the_adjoint(shift):
    block = random_block(shift)
    att = block.att
    gen = torch.Generator().manual_seed(0)
    x, g = (torch.randn(3, 16, 32, dtype=torch.float64, generator=gen) for _ in range(2))
    shifted = mixing.token_shift(x, att.bidirectional, att.q_shift_index)
    back = mixing.token_shift_transpose(g, att.bidirectional, att.q_shift_index)
    assert abs(float((shifted * g).sum() - (x * back).sum())) < 1e-12 * float(x.abs().sum() * g.abs().max())
    # and it is what autograd gives
    leaf = x.clone().requires_grad_()
    (auto,) = torch.autograd.grad(mixing.token_shift(leaf, att.bidirectional, att.q_shift_index), leaf, g)
    assert torch.equal(auto, back)


def test_bf16_autocast_keeps_the_reference_precision():
    """Under bf16 autocast the fused backward runs its products in bf16 as the forward did; its
    gradients stay as close to the fp32 ones as the reference's are."""
    block = random_block("bidirectional", torch.float32)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    exact = values_and_grads(mixing.time_mix_inputs_reference, block.att, (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = values_and_grads(mixing.time_mix_inputs, block.att, (x,))
        ref = values_and_grads(mixing.time_mix_inputs_reference, block.att, (x,))
    for a, b in zip(fast[0], ref[0]):
        assert a.dtype == b.dtype  # bf16 projections, fp32 log-decay, as the reference
    for a, b, e in zip(fast[1], ref[1], exact[1]):
        if e is None:
            continue
        assert a.dtype == e.dtype
        scale = float(e.abs().max())
        assert float((a - e).abs().max()) <= max(4 * float((b - e).abs().max()), 0.02 * scale)


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for the backward pass while fn() runs
    (parameters excluded)."""
    seen = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("shift", ["causal", "bidirectional"])
def test_a_block_keeps_under_half_of_what_autograd_keeps(shift):
    """Saved for the backward pass by TimeMix + ChannelMix at 1024 tokens, in D-sized fp32 tensors
    per token. The fused forms keep each mix's input x, r, k, v, the log-decay, the gate, the WKV
    output and the group norm's statistics, relu(Wk xk) (4), sigmoid(Wr xr) and Wv k^2, and at
    this small size the WKV's chunk-start states (D/8 a direction at head size 8): 14.25 causal,
    14.5 bidirectional. Autograd through the references keeps 36.7."""
    width, tokens = 64, 1024
    block = random_block(shift, torch.float32, width=width, tokens=tokens)
    x = torch.randn(1, tokens, width, requires_grad=True)
    unit = tokens * width * 4
    fused = saved_bytes(lambda: block.ffn(block.att(x))) / unit

    def reference():
        att = block.att
        r, k, v, gate_pre, log_decay = mixing.time_mix_inputs_reference(att, x)
        heads = (1, tokens, att.num_heads, att.head_size)
        y = wkv6(r.view(heads), k.view(heads), v.view(heads), log_decay.view(heads), att.time_faaaa,
                        bidirectional=att.bidirectional)
        mixing.channel_mix_reference(block.ffn, mixing.gated_output_reference(att, y.reshape(1, tokens, width),
                                                                             gate_pre))

    plain = saved_bytes(reference) / unit
    assert fused <= 14.6, fused  # 14.25 causal, 14.5 bidirectional
    assert plain >= 36.5, plain  # 36.6, 36.75

