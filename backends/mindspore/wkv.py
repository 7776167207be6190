"""WKV6, the RWKV-6 ("Finch") linear-attention recurrence, in MindSpore.

Shapes: r, k, v, w are [B, T, H, K]; w is the log-decay (w <= 0, the per-step
decay is exp(w)); u (the "bonus" of the current token) is [H, K]. Per head, with
state S [K, K] starting at zero:

    o_t = r_t (S + diag(u) k_t^T v_t)
    S   = diag(exp(w_t)) S + k_t^T v_t

``bidirectional=True`` adds the same recurrence run over the reversed sequence
without the bonus, so o_t sees every token s != t through the decays between
them, and the current token once through u.

``wkv6_reference`` is the plain loop. ``wkv6`` is the chunked-parallel form the
model uses, the same algorithm as ``backends/torch/wkv.py``: tokens are grouped
into chunks (the state is passed between chunks with one small loop) and each
chunk into sub-chunks. Every exponent is a sum of log-decays over a span of
tokens that ends before the query, measured from a chunk or sub-chunk boundary,
so none is positive and nothing overflows in fp32 however strong the decay. The
state and all sums are fp32 (fp64 for fp64 input).

Factorised or pairwise scores (``branch``):

* ``"auto"`` (PyNative; what PyTorch does): per call, look at the data and use the
  one-matmul factorised product while the largest decay sum over a chunk stays
  below ``MAX_FACTORISED_EXPONENT``, else split into sub-chunks with pairwise
  exponents. The choice is a Python ``if`` on a tensor value, so it cannot be
  compiled.
* ``"safe"`` (Graph mode, the default under ``GRAPH_MODE``): never factorise;
  always the recursive split into sub-chunks (16, then 4), pairwise at the bottom. It is the branch "auto" takes for
  strong decays, exact for any decay (no exponent is positive), and equals the
  factorised result up to fp32 rounding (measured ~1e-7 relative), so Graph and
  PyNative agree with PyTorch to the same tolerance.

Ops: cumsum, exp, matmul, broadcasting arithmetic, concat, flip, reshape/transpose,
comparisons of ``arange`` - all run on CPU, GPU and Ascend (no einsum, which is
GPU-only in MindSpore, and no ``mint.*``).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
# Largest |exponent| a factorised product may carry: exp(30) ~ 1e13 keeps fp32 far from
# overflow and its reciprocal far from the denormals.
MIN_SUB_CHUNK_SIZE = 2  # below this a chunk is scored pair by pair
LOG_DECAY_FLOOR = -1e4
MAX_FACTORISED_EXPONENT = {ms.float32: 30.0, ms.float64: 300.0}
BRANCHES = ("auto", "safe")


def default_branch() -> str:
    """``"safe"`` under GRAPH_MODE (no data-dependent Python branch), else ``"auto"``."""
    return "safe" if ms.get_context("mode") == ms.GRAPH_MODE else "auto"


def _compute_dtype(dtype):
    return ms.float64 if dtype == ms.float64 else ms.float32


def _flip_time(x):
    return ops.flip(x, (1,))


def _earlier_mask(size: int, dtype):
    """[size, size] with 1 where column s < row t (strictly lower triangle)."""
    idx = ops.arange(size)
    return (idx[None, :] < idx[:, None]).astype(dtype)


# ---- reference ----------------------------------------------------------------------
def _scan_reference(r, k, v, w, u):
    batch, length, heads, dk = r.shape
    state = ops.zeros((batch, heads, dk, v.shape[-1]), r.dtype)
    outputs = []
    for t in range(length):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outputs.append((r[:, t, :, :, None] * (state + u[None, :, :, None] * kv)).sum(axis=2))
        state = ops.exp(w[:, t])[..., None] * state + kv
    return ops.stack(outputs, axis=1)


def wkv6_reference(r, k, v, w, u, bidirectional: bool = False):
    """The sequential recurrence, one token at a time. Returns [B, T, H, K]."""
    dtype = r.dtype
    r, k, v, w, u = (x.astype(_compute_dtype(dtype)) for x in (r, k, v, w, u))
    out = _scan_reference(r, k, v, w, u)
    if bidirectional:
        flipped = [_flip_time(x) for x in (r, k, v, w)]
        out = out + _flip_time(_scan_reference(*flipped, ops.zeros_like(u)))
    return out.astype(dtype)


# ---- chunked ------------------------------------------------------------------------
def _exclusive_cumsum(x, dim: int):
    """sum_{j < i} x_j along ``dim`` (exact: no subtraction of an inclusive sum)."""
    dim = dim % x.ndim
    first = ops.zeros_like(ops.narrow(x, dim, 0, 1))
    shifted = ops.concat([first, ops.narrow(x, dim, 0, x.shape[dim] - 1)], dim)
    return ops.cumsum(shifted, dim)


def _reverse_exclusive_cumsum(x, dim: int):
    """sum_{j > i} x_j along ``dim``."""
    dim = dim % x.ndim
    return ops.flip(_exclusive_cumsum(ops.flip(x, (dim,)), dim), (dim,))


def _pairwise_scores(r, k, w):
    """Each (t, s) pair with its own exponent: exact for any decay, costs S*K per token.

    The exponent w_{s+1} + ... + w_{t-1} is summed directly (a 0/1 matrix times w), not
    taken as a difference of cumulative sums, so a strong decay early in the sub-chunk
    cannot cancel away the precision of the mild ones after it.
    """
    size = r.shape[-2]
    idx = ops.arange(size)
    between = ops.logical_and(idx[None, :, None] < idx[None, None, :], idx[None, None, :] < idx[:, None, None])  # [t, s, m]
    between = between.astype(w.dtype).reshape(size * size, size)
    exponent = ops.matmul(between, w).reshape(*w.shape[:-2], size, size, w.shape[-1])  # <= 0
    scores = (r[..., :, None, :] * k[..., None, :, :] * ops.exp(exponent)).sum(-1)
    return scores * _earlier_mask(size, r.dtype)


def _factorisable(w, decay_before) -> bool:
    """True when exp(sum of |w| over any span) stays below exp(MAX_FACTORISED_EXPONENT)."""
    span_total = -ops.stop_gradient(decay_before[..., -1, :] + w[..., -1, :])
    return float(span_total.max()) <= MAX_FACTORISED_EXPONENT[w.dtype]


def _within_chunk_scores(r, k, w, decay_before, sub_chunk_size: int, branch: str):
    """scores[t, s] = sum_k r_t k_s exp(w_{s+1} + ... + w_{t-1}) for s < t, else 0.

    r, k, w: [..., L, K]; ``decay_before`` is the exclusive cumsum of w along L.
    Returns [..., L, L].
    """
    size = r.shape[-2]
    if branch == "auto" and _factorisable(w, decay_before):
        # exp(B_{t-1} - B_s) = exp(B_{t-1}) exp(-B_s): one matmul, safe while the span is bounded.
        earlier = _earlier_mask(size, r.dtype)
        return ops.matmul(r * ops.exp(decay_before), (k * ops.exp(-(decay_before + w))).swapaxes(-1, -2)) * earlier
    if size <= sub_chunk_size or sub_chunk_size < MIN_SUB_CHUNK_SIZE:
        return _pairwise_scores(r, k, w)
    # Split into sub-chunks. A key in an earlier sub-chunk is scaled by the decay from it to
    # the query's sub-chunk start, the query by the decay from that start: both exponents <= 0.
    lead = r.shape[:-2]
    n_sub, dk = size // sub_chunk_size, r.shape[-1]
    r_s, k_s, w_s = (x.reshape(*lead, n_sub, sub_chunk_size, dk) for x in (r, k, w))
    local_before = _exclusive_cumsum(w_s, dim=-2)
    local_after = _reverse_exclusive_cumsum(w_s, dim=-2)
    idx = ops.arange(n_sub)
    # strictly_between[i, j, m] = j < m < i: whole sub-chunks between key sub-chunk j and query i
    strictly_between = ops.logical_and(idx[None, :, None] < idx[None, None, :], idx[None, None, :] < idx[:, None, None])
    between = strictly_between.astype(w.dtype).reshape(n_sub * n_sub, n_sub)
    gap = ops.matmul(between, w_s.sum(axis=-2)).reshape(*lead, n_sub, n_sub, dk)  # [..., i, j, K]
    keys = k_s.expand_dims(-4) * ops.exp(local_after.expand_dims(-4) + gap.expand_dims(-2))  # [..., i, j, S, K]
    keys = keys.reshape(*lead, n_sub, size, dk)
    scores = ops.matmul(r_s * ops.exp(local_before), keys.swapaxes(-1, -2))  # [..., i, S, L]
    scores = scores.reshape(*lead, n_sub, sub_chunk_size, n_sub, sub_chunk_size)
    earlier_sub = _earlier_mask(n_sub, r.dtype)  # key sub-chunk j < query sub-chunk i
    scores = scores * earlier_sub[:, None, :, None]
    # Each sub-chunk again: factorised if it can be, else split four ways, down to pairwise.
    diag = _within_chunk_scores(r_s, k_s, w_s, local_before, sub_chunk_size // 4, branch)  # [..., n, S, S]
    eye = ops.eye(n_sub, n_sub, r.dtype)
    scores = scores + diag.expand_dims(-2) * eye[:, None, :, None]
    return scores.reshape(*lead, size, size)


def _strictly_causal(r, k, v, w, chunk_size: int, sub_chunk_size: int, branch: str):
    """sum_{s < t} r_t diag(exp(w_{s+1} + ... + w_{t-1})) k_s^T v_s for [B, H, T, K] inputs."""
    batch, heads, length, dk = r.shape
    dv = v.shape[-1]
    # A sequence shorter than a chunk is padded only to whole sub-chunks (16 tokens of a
    # 4x4 grid would otherwise be computed as 64).
    chunk_size = min(chunk_size, -(-length // sub_chunk_size) * sub_chunk_size)
    pad = (-length) % chunk_size
    if pad:  # trailing zeros (and zero log-decay) never reach earlier tokens
        r, k, v, w = (ops.concat([x, ops.zeros((batch, heads, pad, x.shape[-1]), x.dtype)], 2) for x in (r, k, v, w))
    n_chunks = r.shape[2] // chunk_size
    r, k, v, w = (x.reshape(batch, heads, n_chunks, chunk_size, x.shape[-1]) for x in (r, k, v, w))
    decay_before = _exclusive_cumsum(w, dim=3)  # w summed from chunk start to t-1, <= 0

    scores = _within_chunk_scores(r, k, w, decay_before, sub_chunk_size, branch)  # [B, H, N, L, L]
    out = ops.matmul(scores, v)
    if n_chunks > 1:  # the state at each chunk start, from a short loop over chunks
        decay_after = _reverse_exclusive_cumsum(w, dim=3)  # w summed from s+1 to chunk end, <= 0
        chunk_decay = ops.exp(w.sum(axis=3))  # [B, H, N, K]
        chunk_kv = ops.matmul((k * ops.exp(decay_after)).swapaxes(-1, -2), v)  # [B, H, N, K, V]
        state = ops.zeros((batch, heads, dk, dv), r.dtype)
        states = []
        # unbind once: indexing chunk c inside the loop makes the backward pass O(T^2)
        decays, kvs = ops.unbind(chunk_decay.expand_dims(-1), 2), ops.unbind(chunk_kv, 2)
        for c in range(n_chunks):
            states.append(state)
            state = decays[c] * state + kvs[c]
        out = out + ops.matmul(r * ops.exp(decay_before), ops.stack(states, axis=2))
    return out.reshape(batch, heads, n_chunks * chunk_size, dv)[:, :, :length]


def wkv6(r, k, v, w, u, bidirectional: bool = False,
         chunk_size: int = CHUNK_SIZE, sub_chunk_size: int = SUB_CHUNK_SIZE, branch: str = "auto"):
    """Chunked-parallel WKV6; same arguments and result as ``wkv6_reference``.

    ``branch``: "auto" (data-dependent, PyNative only) or "safe" (compiles in Graph mode).
    """
    if chunk_size % sub_chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of sub_chunk_size {sub_chunk_size}")
    if branch not in BRANCHES:
        raise ValueError(f"branch '{branch}': allowed {', '.join(BRANCHES)}")
    dtype = r.dtype
    compute = _compute_dtype(dtype)
    batch = r.shape[0]
    # [B, T, H, K] -> [B, H, T, K]
    r, k, v, w = (x.astype(compute).swapaxes(1, 2) for x in (r, k, v, w))
    # exp(-1e4) is exactly 0 in fp32 and fp64, and every exponent is a sum of log-decays
    # <= 0, so the floor changes no value or gradient; it keeps -inf out of the sums.
    w = ops.clamp(w, min=LOG_DECAY_FLOOR)
    u = u.astype(compute)
    if bidirectional:  # both directions in one batched call
        both = _strictly_causal(*(ops.concat([x, ops.flip(x, (2,))], 0) for x in (r, k, v, w)),
                                chunk_size, sub_chunk_size, branch)
        out = both[:batch] + ops.flip(both[batch:], (2,))
    else:
        out = _strictly_causal(r, k, v, w, chunk_size, sub_chunk_size, branch)
    bonus = (r * u[None, :, None, :] * k).sum(-1, keepdims=True) * v
    return (out + bonus).swapaxes(1, 2).astype(dtype)
