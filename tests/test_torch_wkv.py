"""The chunked WKV6 against the plain sequential recurrence (values and all gradients)."""
import pytest

torch = pytest.importorskip("torch")

from backends.torch.wkv import wkv6, wkv6_reference  # noqa: E402


def make_inputs(length, dtype, decay="mixed", batch=2, heads=2, size=8, seed=0):
    """r, k, v, log-decay w, bonus u. ``decay`` picks the log-decay distribution:
    "init" is RWKV-6's init range, "mixed" spans mild to strong, "extreme" adds decays
    far past what fp32 can factorise (per-step factors down to exp(-1e6) and below)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, heads, size)
    r, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    if decay == "init":
        w = -torch.exp(torch.rand(shape, generator=gen, dtype=dtype) * 5 - 6)
    elif decay == "mixed":
        w = -torch.exp(torch.randn(shape, generator=gen, dtype=dtype) * 2)
    else:
        w = -torch.exp(torch.randn(shape, generator=gen, dtype=dtype) * 6)
        w[:, ::5] = -1e6
        w[:, 3::11] = -float("inf")
    u = torch.randn(heads, size, generator=gen, dtype=dtype)
    return r, k, v, w, u


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


def grads_of(out, inputs, grad_out):
    """All input gradients; one that does not reach the output (w at T = 1) is zero."""
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length", [1, 7, 64, 257, 1024])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_chunked_matches_reference_values_and_gradients(length, bidirectional, dtype, tol):
    decays = ["mixed", "init"] if length <= 257 else ["init"]
    for decay in decays:
        inputs = [x.requires_grad_() for x in make_inputs(length, dtype, decay, batch=1 if length > 257 else 2)]
        grad_out = torch.randn_like(inputs[0])
        fast = wkv6(*inputs, bidirectional=bidirectional)
        fast_grads = grads_of(fast, inputs, grad_out)
        ref = wkv6_reference(*inputs, bidirectional=bidirectional)
        ref_grads = grads_of(ref, inputs, grad_out)
        assert fast.dtype == dtype and fast.shape == ref.shape
        assert rel(fast, ref) < tol, decay
        for name, a, b in zip("rkvwu", fast_grads, ref_grads):
            assert rel(a, b) < tol, (decay, name)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length", [7, 64, 257])
def test_the_streamed_path_matches_reference_values_and_gradients(length, bidirectional, monkeypatch):
    """Large inputs stream (KEEP_GATHERED_ELEMENTS exceeded, here forced): a direction at a time,
    a span of chunks gathered at a time, the chunk-start states recomputed in the backward pass."""
    from backends.torch import wkv

    monkeypatch.setattr(wkv, "KEEP_GATHERED_ELEMENTS", 0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        for decay in ("mixed", "extreme"):
            inputs = [x.requires_grad_() for x in make_inputs(length, dtype, decay)]
            grad_out = torch.randn_like(inputs[0])
            fast = wkv6(*inputs, bidirectional=bidirectional)
            ref = wkv6_reference(*inputs, bidirectional=bidirectional)
            assert torch.isfinite(fast).all() and rel(fast, ref) < tol, (dtype, decay)
            for name, a, b in zip("rkvwu", grads_of(fast, inputs, grad_out), grads_of(ref, inputs, grad_out)):
                assert torch.isfinite(a).all() and rel(a, b) < tol, (dtype, decay, name)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_extreme_decays_stay_finite_and_exact(bidirectional, dtype, tol):
    inputs = [x.requires_grad_() for x in make_inputs(200, dtype, "extreme")]
    fast = wkv6(*inputs, bidirectional=bidirectional)
    ref = wkv6_reference(*inputs, bidirectional=bidirectional)
    assert torch.isfinite(fast).all()
    assert rel(fast, ref) < tol
    grads = torch.autograd.grad(fast.square().sum(), inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    for name, a, b in zip("rkvu", [grads[i] for i in (0, 1, 2, 4)], [ref_grads[i] for i in (0, 1, 2, 4)]):
        assert torch.isfinite(a).all() and rel(a, b) < tol, name
    finite = torch.isfinite(inputs[3])  # d/dw at w = -inf is not defined; elsewhere it must agree
    assert torch.isfinite(grads[3][finite]).all()
    assert rel(grads[3][finite], ref_grads[3][finite]) < tol


@pytest.mark.parametrize("chunk_size,sub_chunk_size", [(16, 4), (32, 8), (64, 16), (128, 16)])
def test_every_chunking_gives_the_same_result(chunk_size, sub_chunk_size):
    inputs = make_inputs(150, torch.float64, "mixed")
    ref = wkv6_reference(*inputs, bidirectional=True)
    out = wkv6(*inputs, bidirectional=True, chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)
    assert rel(out, ref) < 1e-12


def test_causal_output_ignores_the_future_and_bidirectional_does_not():
    r, k, v, w, u = make_inputs(96, torch.float64, "init", batch=1)
    cut = 40
    r2, k2, v2 = r.clone(), k.clone(), v.clone()
    for x in (r2, k2, v2):
        x[:, cut + 1:] = torch.randn_like(x[:, cut + 1:])
    causal_a, causal_b = wkv6(r, k, v, w, u), wkv6(r2, k2, v2, w, u)
    torch.testing.assert_close(causal_a[:, : cut + 1], causal_b[:, : cut + 1], rtol=0, atol=1e-12)
    assert (causal_a[:, cut + 1:] - causal_b[:, cut + 1:]).abs().max() > 1e-3
    bi_a, bi_b = wkv6(r, k, v, w, u, bidirectional=True), wkv6(r2, k2, v2, w, u, bidirectional=True)
    assert (bi_a[:, :cut] - bi_b[:, :cut]).abs().max() > 1e-3


def test_bidirectional_counts_the_bonus_once():
    r, k, v, w, u = make_inputs(1, torch.float64)
    expected = (r * u * k).sum(-1, keepdim=True) * v  # one token: only the bonus term
    torch.testing.assert_close(wkv6(r, k, v, w, u, bidirectional=True), expected)
    torch.testing.assert_close(wkv6_reference(r, k, v, w, u, bidirectional=True), expected)


def test_low_precision_inputs_keep_an_fp32_state():
    r, k, v, w, u = make_inputs(130, torch.float32, "init")
    ref = wkv6_reference(r, k, v, w, u)
    out = wkv6(*(x.to(torch.bfloat16) for x in (r, k, v, w, u)))
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), ref) < 2e-2


@pytest.mark.parametrize("bidirectional", [False, True])
def test_chunks_take_the_fast_or_exact_path_independently(bidirectional):
    """Mild chunks factorise, a strongly decaying chunk is split: the mix is still exact."""
    from backends.torch import wkv

    r, k, v, w, u = (x.requires_grad_() for x in make_inputs(200, torch.float64, "init"))
    strong = w.detach().clone()
    strong[:, 64:128] = -5.0  # 64 * 5 > MAX_FACTORISED_EXPONENT: this chunk must not factorise
    strong.requires_grad_()
    assert 64 * 5.0 > wkv.MAX_FACTORISED_EXPONENT[torch.float64]
    out = wkv6(r, k, v, strong, u, bidirectional=bidirectional)
    ref = wkv6_reference(r, k, v, strong, u, bidirectional=bidirectional)
    assert rel(out, ref) < 1e-10
    for a, b in zip(torch.autograd.grad(out.sum(), (r, strong)), torch.autograd.grad(ref.sum(), (r, strong))):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("with_state", [False, True])
def test_closed_form_chunk_gradients_equal_autograd(with_state):
    """The backward's closed form for bounded chunks against autograd over the recomputed chunk (its
    reference), with a start state and a next-state gradient or, for a lone chunk, without."""
    from backends.torch import wkv

    gen = torch.Generator().manual_seed(3)
    rows, size, dk = 6, 32, 8
    r, k, v = (torch.randn(rows, size, dk, generator=gen, dtype=torch.float64) for _ in range(3))
    w = -torch.exp(torch.randn(rows, size, dk, generator=gen, dtype=torch.float64) - 1.5)
    grad_out = torch.randn(rows, size, dk, generator=gen, dtype=torch.float64)
    state = torch.randn(rows, dk, dk, generator=gen, dtype=torch.float64) if with_state else None
    grad_next = torch.randn(rows, dk, dk, generator=gen, dtype=torch.float64) if with_state else None
    assert bool(wkv._factorisable(w, wkv._exclusive_cumsum(w, dim=-2)).all())
    closed = wkv._factorised_chunk_grads(r, k, v, w, state, grad_out, grad_next)
    reference = wkv._autograd_chunk_grads(r, k, v, w, state, grad_out, grad_next, wkv.SUB_CHUNK_SIZE)
    for name, a, b in zip("rkvw", closed, reference):
        assert rel(a, b) < 1e-12, name


@pytest.mark.parametrize("path", ["small", "streamed"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_spans_of_part_of_the_batch_are_exact(bidirectional, path, monkeypatch):
    """Spans of one batch element's chunk (GROUP_ELEMENTS small) in the forward and backward
    passes, a strongly decaying chunk among mild ones and a length that is no multiple of the
    chunk: every gradient still equals the reference's, on the small path (both directions in
    one pass) and the streamed one (a direction at a time, a span gathered at a time, padding
    at the front for the reverse direction, the states recomputed)."""
    from backends.torch import wkv

    if path == "streamed":
        monkeypatch.setattr(wkv, "KEEP_GATHERED_ELEMENTS", 0)
    r, k, v, w, u = make_inputs(300, torch.float64, "init", seed=4)
    w[:, 64:128, 1] = -5.0  # one head's second chunk cannot factorise
    inputs = [x.requires_grad_() for x in (r, k, v, w, u)]
    monkeypatch.setattr(wkv, "GROUP_ELEMENTS", 3 * 64 * 8)
    spans = wkv._spans(2, 5, 2 * 64 * 8)  # a chunk of one batch element (both heads) a span
    assert len(spans) == 10 and spans[1] == (slice(1, 2), 0, 1)
    grad_out = torch.randn_like(inputs[0])
    fast_grads = grads_of(wkv6(*inputs, bidirectional=bidirectional), inputs, grad_out)
    ref_grads = grads_of(wkv6_reference(*inputs, bidirectional=bidirectional), inputs, grad_out)
    for name, a, b in zip("rkvwu", fast_grads, ref_grads):
        assert rel(a, b) < 1e-10, name


def fla_convention_stand_in(calls):
    """fla's ``chunk_rwkv6`` calling convention over our reference: [B, T, H, K] inputs, log-space w,
    ``scale`` defaulting to K^-0.5 on r, causal only, a (output, final state) pair."""
    def chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False):
        calls.append({"scale": scale, "u_zero": bool((u == 0).all())})
        scale = r.shape[-1] ** -0.5 if scale is None else scale
        return wkv6_reference(r * scale, k, v, w, u), None
    return chunk_rwkv6


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fla_adapter_minds_fla_conventions(bidirectional):
    """scale=1.0 (fla's default is K^-0.5), the reverse direction as a second causal call with u = 0."""
    from backends.torch.wkv import wkv6_fla

    inputs = make_inputs(70, torch.float64, "mixed")
    calls = []
    out = wkv6_fla(*inputs, bidirectional=bidirectional, chunk_rwkv6=fla_convention_stand_in(calls))
    assert rel(out, wkv6_reference(*inputs, bidirectional=bidirectional)) < 1e-12
    assert [c["scale"] for c in calls] == [1.0] * (2 if bidirectional else 1)
    assert [c["u_zero"] for c in calls] == ([False, True] if bidirectional else [False])


def test_model_dispatches_to_the_kernel_it_is_given(monkeypatch):
    from backends.torch import models
    from common.spec import build_spec

    spec = build_spec("DiR-Tiny/2", hidden_size=64, depth=2, head_size=32, input_size=8, in_channels=3, num_classes=5,
                      mix_lora_rank=8, decay_lora_rank=8)
    model = models.DiR.from_spec(spec)
    used = []
    monkeypatch.setattr(models, "wkv6_fla", lambda *a, **k: used.append(1) or wkv6(*a, **k))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 4])
    model(x, t, y)
    assert used == []
    model.set_wkv_kernel("fla")
    model(x, t, y)
    assert len(used) == spec.num_blocks
    with pytest.raises(ValueError, match="expected chunked or fla"):
        model.set_wkv_kernel("triton")


def test_wkv_kernel_key_resolves_or_says_why_not():
    from common.config import ConfigError, resolve_wkv_kernel

    assert resolve_wkv_kernel("auto", "torch", on_cuda=True, fla_installed=True) == "fla"
    assert resolve_wkv_kernel("auto", "torch", on_cuda=False, fla_installed=True) == "chunked"
    assert resolve_wkv_kernel("auto", "paddle", on_cuda=True, fla_installed=True) == "chunked"
    assert resolve_wkv_kernel("chunked", "torch", on_cuda=True, fla_installed=True) == "chunked"
    for framework, cuda, installed, why in (("torch", False, True, "needs a CUDA device"),
                                            ("torch", True, False, "requirements/fla.txt"),
                                            ("mindspore", True, True, "PyTorch-only")):
        with pytest.raises(ConfigError, match=f"'wkv_kernel' = 'fla' cannot be used here: .*{why}"):
            resolve_wkv_kernel("fla", framework, on_cuda=cuda, fla_installed=installed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernel needs CUDA")
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_fla_kernel_matches_the_reference_on_cuda(bidirectional, dtype, tol):
    """fla's chunk_rwkv6 (tf32 dots inside, so fp32 is compared at 2e-3) against the fp64 loop,
    values and every gradient, at a length of several chunks."""
    pytest.importorskip("fla")
    from backends.torch.wkv import wkv6_fla

    cpu = make_inputs(300, torch.float64, "init", batch=2, heads=2, size=64)
    inputs = [x.to("cuda", dtype).requires_grad_() for x in cpu]
    grad_out = torch.randn_like(inputs[0])
    out = wkv6_fla(*inputs, bidirectional=bidirectional)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref = wkv6_reference(*ref_inputs, bidirectional=bidirectional)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    assert rel(out.double(), ref) < tol
    for name, a, b in zip("rkvwu", grads, ref_grads):
        assert rel(a.double(), b) < tol, name
