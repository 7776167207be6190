"""The MindSpore chunked WKV6 against its sequential recurrence (values and all gradients),
for both score branches ("auto": PyNative, data-dependent like PyTorch; "safe": what Graph
mode compiles). Mirrors tests/test_torch_wkv.py at lengths a 2-core CPU runs quickly."""
import functools

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import Tensor, ops  # noqa: E402

from backends.mindspore.wkv import wkv6, wkv6_reference  # noqa: E402

ms.set_device("CPU")


def make_inputs(length, dtype, decay="mixed", batch=2, heads=2, size=8, seed=0):
    """r, k, v, log-decay w, bonus u as numpy (see tests/test_torch_wkv.py for the decay kinds)."""
    rng = np.random.default_rng(seed)
    shape = (batch, length, heads, size)
    r, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    if decay == "init":
        w = -np.exp(rng.random(shape) * 5 - 6)
    elif decay == "mixed":
        w = -np.exp(rng.standard_normal(shape) * 2)
    else:
        w = -np.exp(rng.standard_normal(shape) * 6)
        w[:, ::5] = -1e6
        w[:, 3::11] = -np.inf
    u = rng.standard_normal((heads, size)).astype(dtype)
    return r, k, v, w.astype(dtype), u


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


def values_and_grads(fn, inputs, grad_out, **kwargs):
    """fn's output and its vector-Jacobian product with grad_out for every input (one forward pass)."""
    out, vjp = ms.vjp(lambda *xs: fn(*xs, **kwargs), *(Tensor(x) for x in inputs))
    return out.asnumpy(), [g.asnumpy() for g in vjp(Tensor(grad_out))]


@functools.lru_cache(maxsize=None)
def reference(length, bidirectional, dtype_name, decay):
    """Values and gradients of the sequential loop (shared by both branches: it is the slow part)."""
    dtype = np.dtype(dtype_name).type
    inputs = make_inputs(length, dtype, decay, batch=1)
    grad_out = np.random.default_rng(1).standard_normal(inputs[0].shape).astype(dtype)
    return inputs, grad_out, values_and_grads(wkv6_reference, inputs, grad_out, bidirectional=bidirectional)


@pytest.mark.parametrize("branch", ["auto", "safe"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length,decay", [(1, "mixed"), (70, "mixed"), (70, "init")])
def test_chunked_matches_reference_values_and_gradients(length, decay, bidirectional, branch):
    inputs, grad_out, (ref, ref_grads) = reference(length, bidirectional, "float32", decay)
    fast, fast_grads = values_and_grads(wkv6, inputs, grad_out, bidirectional=bidirectional, branch=branch)
    assert fast.dtype == np.float32 and fast.shape == ref.shape
    assert rel(fast, ref) < 1e-4, decay
    for name, a, b in zip("rkvwu", fast_grads, ref_grads):
        assert rel(a, b) < 1e-4, (decay, name)


@pytest.mark.parametrize("branch", ["auto", "safe"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_float64_is_exact(bidirectional, branch):
    inputs = [Tensor(x) for x in make_inputs(70, np.float64, "mixed", batch=1)]
    ref = wkv6_reference(*inputs, bidirectional=bidirectional).asnumpy()
    out = wkv6(*inputs, bidirectional=bidirectional, branch=branch).asnumpy()
    assert out.dtype == np.float64 and rel(out, ref) < 1e-10


@pytest.mark.parametrize("branch", ["auto", "safe"])
def test_extreme_decays_stay_finite_and_exact(branch):
    inputs = make_inputs(90, np.float32, "extreme", batch=1)
    fast = wkv6(*(Tensor(x) for x in inputs), bidirectional=True, branch=branch).asnumpy()
    ref = wkv6_reference(*(Tensor(x) for x in inputs), bidirectional=True).asnumpy()
    assert np.isfinite(fast).all()
    assert rel(fast, ref) < 1e-4
    grads = ms.grad(lambda *xs: wkv6(*xs, bidirectional=True, branch=branch).square().sum(),
                    grad_position=(0, 1, 2, 4))(*(Tensor(x) for x in inputs))
    assert all(np.isfinite(g.asnumpy()).all() for g in grads)


@pytest.mark.parametrize("chunk_size,sub_chunk_size", [(16, 4), (32, 8), (64, 16)])
def test_every_chunking_gives_the_same_result(chunk_size, sub_chunk_size):
    inputs = [Tensor(x) for x in make_inputs(100, np.float64, "mixed", batch=1)]
    ref = wkv6_reference(*inputs, bidirectional=True).asnumpy()
    out = wkv6(*inputs, bidirectional=True, chunk_size=chunk_size, sub_chunk_size=sub_chunk_size).asnumpy()
    assert rel(out, ref) < 1e-12


def test_causal_output_ignores_the_future_and_bidirectional_does_not():
    r, k, v, w, u = make_inputs(40, np.float64)
    changed = [x.copy() for x in (r, k, v, w)]
    for x in changed:
        x[:, 30:] += 1.0
    for bidirectional in (False, True):
        a = wkv6(*(Tensor(x) for x in (r, k, v, w, u)), bidirectional=bidirectional).asnumpy()
        b = wkv6(*(Tensor(x) for x in (*changed, u)), bidirectional=bidirectional).asnumpy()
        same = np.allclose(a[:, :30], b[:, :30], atol=1e-12)
        assert same != bidirectional


def test_bad_arguments_are_refused():
    inputs = [Tensor(x) for x in make_inputs(8, np.float32)]
    with pytest.raises(ValueError, match="multiple of sub_chunk_size"):
        wkv6(*inputs, chunk_size=24, sub_chunk_size=16)
    with pytest.raises(ValueError, match="branch"):
        wkv6(*inputs, branch="fast")
    assert ops.isfinite(wkv6(*inputs)).all()


def _strong_second_chunk(dtype, strong, length=32, chunk=16):
    """'init' decays (batch 1) with the second chunk's log-decays set to ``strong``, too strong to
    factorise over a chunk."""
    r, k, v, w, u = make_inputs(length, dtype, "init", batch=1)
    w[:, chunk:2 * chunk] = strong
    return r, k, v, w, u


@functools.lru_cache(maxsize=None)
def strong_reference(dtype_name, strong):
    """Values and gradients of the causal loop over _strong_second_chunk (shared by both branches)."""
    dtype = np.dtype(dtype_name).type
    inputs = _strong_second_chunk(dtype, strong)
    grad_out = np.random.default_rng(1).standard_normal(inputs[0].shape).astype(dtype)
    return inputs, grad_out, values_and_grads(wkv6_reference, inputs, grad_out)


STRONG_CASES = [("float64", -30.0, 1e-10), ("float32", -1e4, 1e-4)]  # sub-chunks factorise / go pairwise


@pytest.mark.parametrize("dtype_name,strong,tol", STRONG_CASES)
def test_chunks_take_the_fast_or_exact_path_independently(dtype_name, strong, tol, monkeypatch):
    """"auto": the mild chunk factorises whole, the strongly decaying one is split (its sub-chunks
    factorised at -30 in fp64, pairwise at -1e4 in fp32); values and every gradient exact."""
    from backends.mindspore import wkv

    inputs, grad_out, (ref, ref_grads) = strong_reference(dtype_name, strong)
    assert 16 * abs(strong) > wkv.MAX_FACTORISED_EXPONENT[ms.float64 if dtype_name == "float64" else ms.float32]
    taken = []
    factorised = wkv._factorised_scores
    monkeypatch.setattr(wkv, "_factorised_scores", lambda r, *a: taken.append(r.shape[0]) or factorised(r, *a))
    out, grads = values_and_grads(wkv6, inputs, grad_out, chunk_size=16, sub_chunk_size=4)
    assert taken[0] == 2, taken  # one mild chunk per head (2)
    assert rel(out, ref) < tol
    for name, a, b in zip("rkvwu", grads, ref_grads):
        assert rel(a, b) < tol, name


def graph_values_and_grads(inputs, grad_out, bidirectional, chunk_size=64, sub_chunk_size=16):
    """wkv6 with branch="safe" compiled by ``ms.jit`` (Graph mode): its values and gradients."""
    sens = Tensor(grad_out)

    def forward(r, k, v, w, u):
        return wkv6(r, k, v, w, u, bidirectional=bidirectional, chunk_size=chunk_size,
                    sub_chunk_size=sub_chunk_size, branch="safe")

    def loss(r, k, v, w, u):
        return (forward(r, k, v, w, u) * sens).sum()

    grad_fn = ms.grad(loss, grad_position=(0, 1, 2, 3, 4))

    def both(r, k, v, w, u):  # one compiled graph
        return forward(r, k, v, w, u), grad_fn(r, k, v, w, u)

    out, grads = ms.jit(both)(*(Tensor(x) for x in inputs))
    return out.asnumpy(), [g.asnumpy() for g in grads]


@pytest.mark.parametrize("dtype_name,strong,tol", STRONG_CASES)
def test_graph_mode_split_is_exact_for_mixed_decays(dtype_name, strong, tol):
    """Graph mode's branch-free split (no factorised product anywhere) against the loop, values
    and gradients, with a mild chunk next to a strongly (fp64) or extremely (fp32) decaying one."""
    inputs, grad_out, (ref, ref_grads) = strong_reference(dtype_name, strong)
    out, grads = graph_values_and_grads(inputs, grad_out, False, chunk_size=16, sub_chunk_size=4)
    assert rel(out, ref) < tol
    for name, a, b in zip("rkvwu", grads, ref_grads):
        assert rel(a, b) < tol, name


def test_graph_mode_split_is_exact_for_extreme_decays():
    """Decays down to exp(-1e6) and exp(-inf) (floored at -1e4), default chunking over 40 tokens
    (one 48-token chunk split 16 -> 4 -> pairwise), both directions: compiled values and
    gradients against the loop."""
    inputs = make_inputs(40, np.float32, "extreme", batch=1)
    grad_out = np.random.default_rng(1).standard_normal(inputs[0].shape).astype(np.float32)
    ref, ref_grads = values_and_grads(wkv6_reference, inputs, grad_out, bidirectional=True)
    out, grads = graph_values_and_grads(inputs, grad_out, True)
    assert np.isfinite(out).all() and rel(out, ref) < 1e-4
    for name, a, b in zip("rkvu", [grads[i] for i in (0, 1, 2, 4)], [ref_grads[i] for i in (0, 1, 2, 4)]):
        assert np.isfinite(a).all() and rel(a, b) < 1e-4, name
    finite = np.isfinite(inputs[3])  # d/dw at w = -inf is not defined; elsewhere it must agree
    assert np.isfinite(grads[3][finite]).all() and rel(grads[3][finite], ref_grads[3][finite]) < 1e-4


def test_graph_mode_path_splits_down_to_four_token_blocks(monkeypatch):
    """"safe" never factorises and scores pair by pair only 4-token blocks (a 64-token chunk
    16 -> 4, a 16-token one - the demo's 4x4 grid - 16 -> 4), the cheap exact form Graph mode
    compiles; "auto" with mild decays factorises whole chunks (``_chunk_parts``' own product: the
    split scorer is never called) and never goes pairwise."""
    from backends.mindspore import wkv

    calls = []
    for name in ("_within_chunk_scores", "_pairwise_scores"):
        original = getattr(wkv, name)
        monkeypatch.setattr(wkv, name, lambda r, *a, _name=name, _f=original: calls.append((_name, r.shape[-2]))
                            or _f(r, *a))
    for length in (16, 64):
        inputs = [Tensor(x) for x in make_inputs(length, np.float32, "init", batch=1)]
        calls.clear()
        wkv6(*inputs, bidirectional=True, branch="safe")
        assert ("_pairwise_scores", 4) in calls and {name for name, _ in calls} == {
            "_within_chunk_scores", "_pairwise_scores"}, (length, calls)
        assert {size for name, size in calls if name == "_pairwise_scores"} == {4}, (length, calls)
        calls.clear()
        wkv6(*inputs, bidirectional=True, branch="auto")
        assert calls == [], (length, calls)


# ---- the hand-written backward ("auto": the _WKV6 Cell's bprop) -----------------------------
def _autodiff_values_and_grads(inputs, grad_out, bidirectional, chunk_size, sub_chunk_size):
    """Plain autodiff through the forward (what "safe" and Graph mode differentiate)."""
    from backends.mindspore import wkv

    def forward(*xs):
        return wkv._forward(*xs, bidirectional, chunk_size, sub_chunk_size, "auto")[0]

    return values_and_grads(forward, inputs, grad_out)


def _spy(monkeypatch, module, name):
    """Record the calls of ``module.name`` (the first argument's shape), still calling it."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(a[0].shape) or original(*a, **kw))
    return calls


BACKWARD_TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("decay", ["init", "mixed", "strong"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_hand_written_backward_matches_autodiff(dtype_name, bidirectional, decay, grouped, monkeypatch):
    """150 tokens in three 64-token chunks (the state gradient runs back over chunks), whole or
    in groups of two chunks (GROUP_ELEMENTS small), with mild "init" decays (the state carried between
    chunks stays large: under "mixed" it decays to ~exp(-450), which would hide an error in the
    chunk-to-chunk gradient), "mixed" decays, or a second chunk decaying
    too strongly to factorise (-30 in fp64: split sub-chunks; -1e4 in fp32: down to pairwise):
    values and every gradient equal autodiff through the forward."""
    from backends.mindspore import wkv

    dtype = np.dtype(dtype_name).type
    r, k, v, w, u = make_inputs(150, dtype, "mixed" if decay == "mixed" else "init", batch=1)
    if decay == "strong":
        w[:, 64:128] = -30.0 if dtype_name == "float64" else -1e4
    grad_out = np.random.default_rng(1).standard_normal(r.shape).astype(dtype)
    groups = 1
    if grouped:
        rows = (2 if bidirectional else 1) * r.shape[2] * 3  # (direction, head, chunk) rows of 64 x K
        monkeypatch.setattr(wkv, "GROUP_ELEMENTS", (rows // 2) * 64 * r.shape[3])
        groups = 2
    ref, ref_grads = _autodiff_values_and_grads((r, k, v, w, u), grad_out, bidirectional, 64, 16)
    scans = _spy(monkeypatch, wkv, "_chunked_scan_backward")
    local = _spy(monkeypatch, wkv, "_local_grads")
    out, grads = values_and_grads(wkv6, (r, k, v, w, u), grad_out, bidirectional=bidirectional)
    assert len(scans) == 1 and scans[0][1] == 3 and len(local) == groups, (scans, local)
    tol = BACKWARD_TOLERANCE[dtype_name]
    assert out.dtype == dtype and rel(out, ref) < tol
    for name, a, b in zip("rkvwu", grads, ref_grads):
        assert a.dtype == dtype and rel(a, b) < tol, name


@pytest.mark.parametrize("with_state", [False, True])
def test_closed_form_chunk_gradients_equal_autograd(with_state):
    """The backward's closed form for bounded chunks against ``ms.vjp`` over the recomputed chunk
    (its reference), with a start state and a next-state gradient or, for a lone chunk, without."""
    from backends.mindspore import wkv

    rng = np.random.default_rng(3)
    rows, size, dk = 6, 32, 8
    r, k, v, grad_out = (Tensor(rng.standard_normal((rows, 1, size, dk))) for _ in range(4))
    w = Tensor(-np.exp(rng.standard_normal((rows, 1, size, dk)) - 1.5))
    state = Tensor(rng.standard_normal((rows, 1, dk, dk))) if with_state else None
    grad_next = Tensor(rng.standard_normal((rows, 1, dk, dk))) if with_state else None
    flat_w = w.reshape(rows, size, dk)
    assert bool(wkv._factorisable(flat_w, wkv._exclusive_cumsum(flat_w, dim=-2)).all())
    closed = wkv._factorised_chunk_grads(r, k, v, w, state, grad_out, grad_next)
    reference = wkv._autograd_chunk_grads(r, k, v, w, state, grad_out, grad_next, wkv.SUB_CHUNK_SIZE, "auto")
    for name, a, b in zip("rkvw", closed, reference):
        assert a.shape == b.shape and rel(a.asnumpy(), b.asnumpy()) < 1e-12, name


@pytest.mark.parametrize("bidirectional", [False, True])
def test_hand_written_backward_of_a_single_chunk(bidirectional, monkeypatch):
    """40 tokens, one 48-token chunk (no state between chunks): the same gradients as autodiff."""
    from backends.mindspore import wkv

    inputs = make_inputs(40, np.float64, "mixed", batch=1)
    grad_out = np.random.default_rng(1).standard_normal(inputs[0].shape)
    ref, ref_grads = _autodiff_values_and_grads(inputs, grad_out, bidirectional, 48, 16)
    scans = _spy(monkeypatch, wkv, "_chunked_scan_backward")
    out, grads = values_and_grads(wkv6, inputs, grad_out, bidirectional=bidirectional)
    assert len(scans) == 1 and scans[0][1] == 1
    assert rel(out, ref) < 1e-12
    for name, a, b in zip("rkvwu", grads, ref_grads):
        assert rel(a, b) < 1e-12, name


def test_graph_mode_takes_autodiff_with_groups(monkeypatch):
    """"safe" compiled by ms.jit differentiates the forward (no bprop: MindSpore cannot compile it),
    its chunk rows scored in groups of five: the same values and gradients as the eager hand-written
    backward over the same groups."""
    from backends.mindspore import wkv

    inputs = make_inputs(150, np.float64, "mixed", batch=1)
    grad_out = np.random.default_rng(1).standard_normal(inputs[0].shape)
    rows = np.empty((2 * inputs[0].shape[2] * 3, 1, 64, inputs[0].shape[3]))  # [G*N, 1, L, K]
    monkeypatch.setattr(wkv, "GROUP_ELEMENTS", 5 * rows[0].size)
    monkeypatch.setattr(wkv, "SAFE_GROUP_ELEMENTS", 5 * rows[0].size)
    assert wkv._row_groups(rows, "safe") == wkv._row_groups(rows) == [(0, 5), (5, 10), (10, 12)]
    out, grads = graph_values_and_grads(inputs, grad_out, True)
    ref, ref_grads = values_and_grads(wkv6, inputs, grad_out, bidirectional=True)
    assert rel(out, ref) < 1e-10
    for name, a, b in zip("rkvwu", grads, ref_grads):
        assert rel(a, b) < 1e-10, name
