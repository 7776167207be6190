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
    tensors = [Tensor(x) for x in inputs]
    out = fn(*tensors, **kwargs)
    grads = ms.grad(lambda *xs: (fn(*xs, **kwargs) * Tensor(grad_out)).sum(), grad_position=(0, 1, 2, 3, 4))(*tensors)
    return out.asnumpy(), [g.asnumpy() for g in grads]


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
