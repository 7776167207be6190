"""The Paddle chunked WKV6 against the plain sequential recurrence (values and all gradients).

The same cases as tests/test_torch_wkv.py, with inputs drawn from numpy (Paddle has no
generator objects); the longest sequence is shorter because Paddle's eager loop of the
reference costs more per step.
"""
import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from backends.paddle.wkv import wkv6, wkv6_reference  # noqa: E402

pytestmark = pytest.mark.paddle


def make_inputs(length, dtype, decay="mixed", batch=2, heads=2, size=8, seed=0):
    """r, k, v, log-decay w, bonus u as numpy arrays (see tests/test_torch_wkv.py for ``decay``)."""
    gen = np.random.default_rng(seed)
    shape = (batch, length, heads, size)
    r, k, v = (gen.standard_normal(shape) for _ in range(3))
    if decay == "init":
        w = -np.exp(gen.random(shape) * 5 - 6)
    elif decay == "mixed":
        w = -np.exp(gen.standard_normal(shape) * 2)
    else:
        w = -np.exp(gen.standard_normal(shape) * 6)
        w[:, ::5] = -1e6
        w[:, 3::11] = -np.inf
    u = gen.standard_normal((heads, size))
    return [x.astype(dtype) for x in (r, k, v, w, u)]


def tensors(arrays, grad=False):
    out = []
    for a in arrays:
        t = paddle.to_tensor(a)
        t.stop_gradient = not grad
        out.append(t)
    return out


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


def grads_of(out, inputs, grad_out):
    """All input gradients; one that does not reach the output (w at T = 1) is zero."""
    grads = paddle.grad([out], inputs, [grad_out], allow_unused=True)
    return [np.zeros(x.shape) if g is None else g.numpy() for x, g in zip(inputs, grads)]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length", [1, 7, 64, 257])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_chunked_matches_reference_values_and_gradients(length, bidirectional, dtype, tol):
    decays = ["mixed", "init"] if length <= 64 else ["mixed"]
    for decay in decays:
        arrays = make_inputs(length, dtype, decay, batch=1 if length > 64 else 2)
        grad_out = paddle.to_tensor(np.random.default_rng(1).standard_normal(arrays[0].shape).astype(dtype))
        inputs = tensors(arrays, grad=True)
        fast = wkv6(*inputs, bidirectional=bidirectional)
        fast_grads = grads_of(fast, inputs, grad_out)
        inputs = tensors(arrays, grad=True)
        ref = wkv6_reference(*inputs, bidirectional=bidirectional)
        ref_grads = grads_of(ref, inputs, grad_out)
        assert fast.dtype == inputs[0].dtype and fast.shape == ref.shape
        assert rel(fast.numpy(), ref.numpy()) < tol, decay
        for name, a, b in zip("rkvwu", fast_grads, ref_grads):
            assert rel(a, b) < tol, (decay, name)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_extreme_decays_stay_finite_and_exact(bidirectional, dtype, tol):
    arrays = make_inputs(100, dtype, "extreme")
    inputs = tensors(arrays, grad=True)
    fast = wkv6(*inputs, bidirectional=bidirectional)
    grads = [g.numpy() for g in paddle.grad([fast.square().sum()], inputs)]
    ref_inputs = tensors(arrays, grad=True)
    ref = wkv6_reference(*ref_inputs, bidirectional=bidirectional)
    ref_grads = [g.numpy() for g in paddle.grad([ref.square().sum()], ref_inputs)]
    assert np.isfinite(fast.numpy()).all()
    assert rel(fast.numpy(), ref.numpy()) < tol
    for name, i in zip("rkvu", (0, 1, 2, 4)):
        assert np.isfinite(grads[i]).all() and rel(grads[i], ref_grads[i]) < tol, name
    finite = np.isfinite(arrays[3])  # d/dw at w = -inf is not defined; elsewhere it must agree
    assert np.isfinite(grads[3][finite]).all()
    assert rel(grads[3][finite], ref_grads[3][finite]) < tol


@pytest.mark.parametrize("chunk_size,sub_chunk_size", [(16, 4), (32, 8), (64, 16), (128, 16)])
def test_every_chunking_gives_the_same_result(chunk_size, sub_chunk_size):
    inputs = tensors(make_inputs(150, np.float64, "mixed"))
    ref = wkv6_reference(*inputs, bidirectional=True)
    out = wkv6(*inputs, bidirectional=True, chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)
    assert rel(out.numpy(), ref.numpy()) < 1e-12


def test_causal_output_ignores_the_future_and_bidirectional_does_not():
    r, k, v, w, u = make_inputs(96, np.float64, "init", batch=1)
    cut = 40
    gen = np.random.default_rng(7)
    r2, k2, v2 = r.copy(), k.copy(), v.copy()
    for x in (r2, k2, v2):
        x[:, cut + 1:] = gen.standard_normal(x[:, cut + 1:].shape)
    a, b = tensors([r, k, v, w, u]), tensors([r2, k2, v2, w, u])
    causal_a, causal_b = wkv6(*a).numpy(), wkv6(*b).numpy()
    np.testing.assert_allclose(causal_a[:, : cut + 1], causal_b[:, : cut + 1], rtol=0, atol=1e-12)
    assert np.abs(causal_a[:, cut + 1:] - causal_b[:, cut + 1:]).max() > 1e-3
    bi_a, bi_b = wkv6(*a, bidirectional=True).numpy(), wkv6(*b, bidirectional=True).numpy()
    assert np.abs(bi_a[:, :cut] - bi_b[:, :cut]).max() > 1e-3


def test_bidirectional_counts_the_bonus_once():
    r, k, v, w, u = make_inputs(1, np.float64)
    expected = (r * u * k).sum(-1, keepdims=True) * v  # one token: only the bonus term
    inputs = tensors([r, k, v, w, u])
    np.testing.assert_allclose(wkv6(*inputs, bidirectional=True).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(wkv6_reference(*inputs, bidirectional=True).numpy(), expected, rtol=1e-12)


def test_low_precision_inputs_keep_an_fp32_state():
    arrays = make_inputs(130, np.float32, "init")
    ref = wkv6_reference(*tensors(arrays)).numpy()
    out = wkv6(*(t.astype("float16") for t in tensors(arrays)))  # Paddle's CPU has no bf16 kernels
    assert out.dtype == paddle.float16
    assert rel(out.astype("float32").numpy(), ref) < 2e-2


def _strong_middle_chunk(length, dtype, chunk, strong):
    """'init' decays with the middle chunk's log-decays set to ``strong`` (too strong to factorise)."""
    arrays = make_inputs(length, dtype, "init", batch=1)
    arrays[3][:, chunk:2 * chunk] = strong
    return arrays


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype,tol,strong", [(np.float64, 1e-10, -30.0), (np.float32, 1e-4, -1e4)])
def test_chunks_take_the_fast_or_exact_path_independently(bidirectional, dtype, tol, strong, monkeypatch):
    """Mild chunks factorise, a strongly decaying chunk is split (its sub-chunks factorised at
    -30 in fp64, pairwise at -1e4 in fp32): the mix is exact in values and every gradient."""
    from backends.paddle import wkv

    assert 16 * abs(strong) > wkv.MAX_FACTORISED_EXPONENT[paddle.float64 if dtype == np.float64 else paddle.float32]
    taken = []
    factorised = wkv._factorised_scores
    monkeypatch.setattr(wkv, "_factorised_scores", lambda r, *a: taken.append(r.shape[0]) or factorised(r, *a))
    arrays = _strong_middle_chunk(48, dtype, 16, strong)
    grad_out = paddle.to_tensor(np.random.default_rng(1).standard_normal(arrays[0].shape).astype(dtype))
    inputs = tensors(arrays, grad=True)
    out = wkv6(*inputs, bidirectional=bidirectional, chunk_size=16, sub_chunk_size=4)
    grads = grads_of(out, inputs, grad_out)
    ref_inputs = tensors(arrays, grad=True)
    ref = wkv6_reference(*ref_inputs, bidirectional=bidirectional)
    ref_grads = grads_of(ref, ref_inputs, grad_out)
    directions = 2 if bidirectional else 1
    # the 2 mild chunks of each head and direction factorise whole; the strong one does not
    assert taken[0] == 2 * 2 * directions, taken
    assert rel(out.numpy(), ref.numpy()) < tol
    for name, a, b in zip("rkvwu", grads, ref_grads):
        assert rel(a, b) < tol, name


# ---- the hand-written backward (the _WKV6 PyLayer) ------------------------------------------
def _plain_autograd(inputs, bidirectional, chunk_size=64, sub_chunk_size=16):
    """The chunked forward with autograd recording every op: what ``_WKV6`` must reproduce."""
    from backends.paddle import wkv

    return wkv._forward(*inputs, bidirectional, chunk_size, sub_chunk_size)[0]


def test_inputs_that_require_grad_take_the_pylayer_and_others_do_not():
    arrays = make_inputs(20, np.float64, batch=1)
    assert wkv6(*tensors(arrays, grad=True)).grad_fn.name() == "GradNodePyLayer__WKV6"
    assert _plain_autograd(tensors(arrays, grad=True), False).grad_fn.name() != "GradNodePyLayer__WKV6"
    assert wkv6(*tensors(arrays)).grad_fn is None
    with paddle.no_grad():
        assert wkv6(*tensors(arrays, grad=True)).grad_fn is None


@pytest.mark.parametrize("bidirectional", [False, True])
def test_pylayer_gradients_equal_autograd_through_the_forward(bidirectional, monkeypatch):
    """Five chunks (T = 300, padded) recomputed in groups of three chunk rows (cutting through
    heads and chunks); one chunk decays too strongly to factorise (its sub-chunks are split
    again) and one reaches the pairwise path, beside chunks that take the closed form."""
    from backends.paddle import wkv

    arrays = make_inputs(300, np.float64, "init", batch=1)
    arrays[3][:, 64:128] = -30.0  # 64 * 30 > 300: split; 16 * 30 > 300: split again; 4 * 30 factorises
    arrays[3][:, 200:208] = -1e4  # even 4 tokens exceed the fp64 bound: pairwise
    directions = 2 if bidirectional else 1
    rows = directions * 2 * 5  # (direction, head, chunk) rows of 64 x 8
    monkeypatch.setattr(wkv, "GROUP_ELEMENTS", 3 * 64 * 8)
    groups = wkv._row_groups(paddle.zeros([rows, 64, 8]))
    assert [(part.start, part.stop) for part in groups] == [(s, min(s + 3, rows)) for s in range(0, rows, 3)]
    pairwise, calls = wkv._pairwise_scores, []
    monkeypatch.setattr(wkv, "_pairwise_scores", lambda *a: calls.append(1) or pairwise(*a))
    grad_out = paddle.to_tensor(np.random.default_rng(1).standard_normal(arrays[0].shape))
    inputs = tensors(arrays, grad=True)
    out = wkv6(*inputs, bidirectional=bidirectional)
    assert out.grad_fn.name() == "GradNodePyLayer__WKV6"
    calls.clear()
    grads = grads_of(out, inputs, grad_out)
    assert calls, "the backward recompute never took the pairwise path"
    plain_inputs = tensors(arrays, grad=True)
    plain = _plain_autograd(plain_inputs, bidirectional)
    plain_grads = grads_of(plain, plain_inputs, grad_out)
    assert rel(out.numpy(), plain.numpy()) < 1e-14
    for name, a, b in zip("rkvwu", grads, plain_grads):
        assert np.isfinite(a).all() and rel(a, b) < 1e-12, name


@pytest.mark.parametrize("with_state", [False, True])
def test_closed_form_chunk_gradients_equal_autograd(with_state):
    """The backward's closed form for bounded chunks against autograd over the recomputed chunk (its
    reference), with a start state and a next-state gradient or, for a lone chunk, without."""
    from backends.paddle import wkv

    gen = np.random.default_rng(3)
    rows, size, dk = 6, 32, 8
    r, k, v, grad_out = (paddle.to_tensor(gen.standard_normal((rows, size, dk))) for _ in range(4))
    w = paddle.to_tensor(-np.exp(gen.standard_normal((rows, size, dk)) - 1.5))
    state = paddle.to_tensor(gen.standard_normal((rows, dk, dk))) if with_state else None
    grad_next = paddle.to_tensor(gen.standard_normal((rows, dk, dk))) if with_state else None
    assert bool(wkv._factorisable(w, wkv._exclusive_cumsum(w, dim=-2)).all())
    with paddle.no_grad():
        closed = wkv._factorised_chunk_grads(r, k, v, w, state, grad_out, grad_next)
        reference = wkv._autograd_chunk_grads(r, k, v, w, state, grad_out, grad_next, wkv.SUB_CHUNK_SIZE)
    for name, a, b in zip("rkvw", closed, reference):
        assert rel(a.numpy(), b.numpy()) < 1e-12, name


@pytest.mark.parametrize("bidirectional", [False, True])
def test_pylayer_gradients_through_backward_and_for_some_inputs_only(bidirectional):
    """``loss.backward()`` and ``paddle.grad`` give the same gradients (the recompute nests a
    backward pass in either), and the reference's: with these mild decays the state carries
    across chunks (the "mixed" decays of the reference test above leave almost nothing of it
    after 64 tokens). Inputs with stop_gradient get none (Paddle requires None there)."""
    arrays = make_inputs(130, np.float64, "init", batch=1)
    grad_out = paddle.to_tensor(np.random.default_rng(2).standard_normal(arrays[0].shape))
    inputs = tensors(arrays, grad=True)
    (wkv6(*inputs, bidirectional=bidirectional) * grad_out).sum().backward()
    plain_inputs = tensors(arrays, grad=True)
    plain_grads = grads_of(_plain_autograd(plain_inputs, bidirectional), plain_inputs, grad_out)
    ref_inputs = tensors(arrays, grad=True)
    ref_grads = grads_of(wkv6_reference(*ref_inputs, bidirectional=bidirectional), ref_inputs, grad_out)
    for name, x, b, ref in zip("rkvwu", inputs, plain_grads, ref_grads):
        assert rel(x.grad.numpy(), b) < 1e-12 and rel(x.grad.numpy(), ref) < 1e-10, name
    some = tensors(arrays)
    for i in (1, 4):  # k and u only
        some[i].stop_gradient = False
    out = wkv6(*some, bidirectional=bidirectional)
    assert out.grad_fn.name() == "GradNodePyLayer__WKV6"
    (out * grad_out).sum().backward()
    assert all(some[i].grad is None for i in (0, 2, 3))
    assert rel(some[1].grad.numpy(), plain_grads[1]) < 1e-12 and rel(some[4].grad.numpy(), plain_grads[4]) < 1e-12


@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_call_without_grad_gives_the_pylayer_output(bidirectional):
    arrays = make_inputs(150, np.float64, "mixed", batch=1)
    inputs = tensors(arrays, grad=True)
    with_grad = wkv6(*inputs, bidirectional=bidirectional).numpy()
    with paddle.no_grad():
        no_grad = wkv6(*inputs, bidirectional=bidirectional).numpy()
    np.testing.assert_array_equal(no_grad, with_grad)
    np.testing.assert_array_equal(wkv6(*tensors(arrays), bidirectional=bidirectional).numpy(), with_grad)
