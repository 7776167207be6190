"""WKV6, the RWKV-6 ("Finch") linear-attention recurrence, in PaddlePaddle.

Shapes: r, k, v, w are [B, T, H, K]; w is the log-decay (w <= 0, the per-step
decay is exp(w)); u (the "bonus" of the current token) is [H, K]. Per head, with
state S [K, K] starting at zero:

    o_t = r_t (S + diag(u) k_t^T v_t)
    S   = diag(exp(w_t)) S + k_t^T v_t

``bidirectional=True`` adds the same recurrence run over the reversed sequence
without the bonus, so o_t sees every token s != t through the decays between
them, and the current token once through u.

``wkv6_reference`` is the plain loop. ``wkv6`` is the chunked-parallel form the
model uses: tokens are grouped into chunks (the state is passed between chunks
with one small loop) and each chunk into sub-chunks. Every exponent is a sum of
log-decays over a span of tokens that ends before the query, measured from a
chunk or sub-chunk boundary, so none is positive and nothing overflows in fp32
however strong the decay. The state and all sums are fp32 (fp64 for fp64 input).
"""
from __future__ import annotations

import paddle

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
# Largest |exponent| a factorised product may carry: exp(30) ~ 1e13 keeps fp32 far from
# overflow and its reciprocal far from the denormals.
MIN_SUB_CHUNK_SIZE = 2  # below this a chunk is scored pair by pair
LOG_DECAY_FLOOR = -1e4
MAX_FACTORISED_EXPONENT = {paddle.float32: 30.0, paddle.float64: 300.0}


def _compute_dtype(dtype):
    return paddle.float64 if dtype == paddle.float64 else paddle.float32


def _flip_time(x):
    return x.flip(1)


# ---- reference ----------------------------------------------------------------------
def _scan_reference(r, k, v, w, u):
    batch, length, heads, _ = r.shape
    state = paddle.zeros([batch, heads, r.shape[-1], v.shape[-1]], dtype=r.dtype)
    outputs = []
    for t in range(length):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outputs.append(paddle.einsum("bhk,bhkv->bhv", r[:, t], state + u[None, :, :, None] * kv))
        state = paddle.exp(w[:, t])[..., None] * state + kv
    return paddle.stack(outputs, axis=1)


def wkv6_reference(r, k, v, w, u, bidirectional: bool = False):
    """The sequential recurrence, one token at a time. Returns [B, T, H, K]."""
    dtype = r.dtype
    r, k, v, w, u = (x.astype(_compute_dtype(dtype)) for x in (r, k, v, w, u))
    out = _scan_reference(r, k, v, w, u)
    if bidirectional:
        flipped = [_flip_time(x) for x in (r, k, v, w)]
        out = out + _flip_time(_scan_reference(*flipped, paddle.zeros_like(u)))
    return out.astype(dtype)


# ---- chunked ------------------------------------------------------------------------
def _narrow(x, axis: int, start: int, length: int):
    axis = axis % x.ndim
    return paddle.slice(x, axes=[axis], starts=[start], ends=[start + length])


def _exclusive_cumsum(x, dim: int):
    """sum_{j < i} x_j along ``dim`` (exact: no subtraction of an inclusive sum)."""
    shifted = paddle.concat([paddle.zeros_like(_narrow(x, dim, 0, 1)), _narrow(x, dim, 0, x.shape[dim] - 1)], dim)
    return paddle.cumsum(shifted, axis=dim)


def _reverse_exclusive_cumsum(x, dim: int):
    """sum_{j > i} x_j along ``dim``."""
    return _exclusive_cumsum(x.flip(dim), dim).flip(dim)


def _pairwise_scores(r, k, w):
    """Each (t, s) pair with its own exponent: exact for any decay, costs S*K per token.

    The exponent w_{s+1} + ... + w_{t-1} is summed directly (a 0/1 matrix times w), not
    taken as a difference of cumulative sums, so a strong decay early in the sub-chunk
    cannot cancel away the precision of the mild ones after it.
    """
    size = r.shape[-2]
    idx = paddle.arange(size)
    between = paddle.logical_and(idx[None, :, None] < idx[None, None, :],
                                 idx[None, None, :] < idx[:, None, None])  # [t, s, m]
    lead = list(w.shape[:-2])
    exponent = paddle.matmul(between.astype(w.dtype).reshape([size * size, size]), w)  # <= 0
    exponent = exponent.reshape([*lead, size, size, w.shape[-1]])
    scores = (r.unsqueeze(-2) * k.unsqueeze(-3) * paddle.exp(exponent)).sum(-1)
    return scores * paddle.tril(paddle.ones([size, size], dtype=r.dtype), -1)


def _factorisable(w, decay_before) -> bool:
    """True when exp(sum of |w| over any span) stays below exp(MAX_FACTORISED_EXPONENT)."""
    span_total = -(decay_before[..., -1, :] + w[..., -1, :]).detach()
    return float(span_total.max()) <= MAX_FACTORISED_EXPONENT[w.dtype]


def _within_chunk_scores(r, k, w, decay_before, sub_chunk_size: int):
    """scores[t, s] = sum_k r_t k_s exp(w_{s+1} + ... + w_{t-1}) for s < t, else 0.

    r, k, w: [..., L, K]; ``decay_before`` is the exclusive cumsum of w along L.
    Returns [..., L, L].
    """
    size = r.shape[-2]
    earlier = paddle.tril(paddle.ones([size, size], dtype=r.dtype), -1)
    if _factorisable(w, decay_before):
        # exp(B_{t-1} - B_s) = exp(B_{t-1}) exp(-B_s): one matmul, safe while the span is bounded.
        return paddle.matmul(r * paddle.exp(decay_before), k * paddle.exp(-(decay_before + w)),
                             transpose_y=True) * earlier
    if size <= sub_chunk_size or sub_chunk_size < MIN_SUB_CHUNK_SIZE:
        return _pairwise_scores(r, k, w)
    # Split into sub-chunks. A key in an earlier sub-chunk is scaled by the decay from it to
    # the query's sub-chunk start, the query by the decay from that start: both exponents <= 0.
    # Leading dims are flattened to one: Paddle's kernels stop at rank 6-9 and the recursion
    # below adds two dims per level.
    out_shape = [*r.shape[:-2], size, size]
    lead = [-1]
    n_sub, dk = size // sub_chunk_size, r.shape[-1]
    r_s, k_s, w_s = (x.reshape([*lead, n_sub, sub_chunk_size, dk]) for x in (r, k, w))
    local_before = _exclusive_cumsum(w_s, dim=-2)
    local_after = _reverse_exclusive_cumsum(w_s, dim=-2)
    idx = paddle.arange(n_sub)
    # strictly_between[i, j, m] = j < m < i: whole sub-chunks between key sub-chunk j and query i
    strictly_between = paddle.logical_and(idx[None, :, None] < idx[None, None, :],
                                          idx[None, None, :] < idx[:, None, None])
    sub_totals = w_s.sum(axis=-2)  # [..., m, K]
    gap = paddle.matmul(strictly_between.astype(w.dtype).reshape([n_sub * n_sub, n_sub]), sub_totals)
    gap = gap.reshape([-1, n_sub, n_sub, dk])  # [..., i, j, K]
    keys = k_s.unsqueeze(-4) * paddle.exp(local_after.unsqueeze(-4) + gap.unsqueeze(-2))  # [..., i, j, S, K]
    keys = keys.reshape([-1, n_sub, size, dk])
    scores = paddle.matmul(r_s * paddle.exp(local_before), keys, transpose_y=True)  # [..., i, S, L]
    scores = scores.reshape([-1, n_sub, sub_chunk_size, n_sub, sub_chunk_size])
    earlier_sub = (idx[None, :] < idx[:, None]).astype(r.dtype)  # key sub-chunk j < query sub-chunk i
    scores = scores * earlier_sub[:, None, :, None]
    # Each sub-chunk again: factorised if it can be, else split four ways, down to pairwise.
    diag = _within_chunk_scores(r_s, k_s, w_s, local_before, sub_chunk_size // 4)  # [..., n, S, S]
    eye = paddle.eye(n_sub, dtype=r.dtype)
    scores = scores + diag.unsqueeze(-2) * eye[:, None, :, None]
    return scores.reshape(out_shape)


def _strictly_causal(r, k, v, w, chunk_size: int, sub_chunk_size: int):
    """sum_{s < t} r_t diag(exp(w_{s+1} + ... + w_{t-1})) k_s^T v_s for [B, H, T, K] inputs."""
    batch, heads, length, dk = r.shape
    dv = v.shape[-1]
    if length < chunk_size:  # one chunk, padded only up to whole sub-chunks
        chunk_size = -(-length // sub_chunk_size) * sub_chunk_size
    # A sequence shorter than a chunk is padded only to whole sub-chunks (16 tokens of a
    # 4x4 grid would otherwise be computed as 64).
    chunk_size = min(chunk_size, -(-length // sub_chunk_size) * sub_chunk_size)
    pad = (-length) % chunk_size
    if pad:  # trailing zeros (and zero log-decay) never reach earlier tokens
        r, k, v, w = (paddle.concat([x, paddle.zeros([batch, heads, pad, x.shape[-1]], dtype=x.dtype)], axis=2)
                      for x in (r, k, v, w))
    n_chunks = r.shape[2] // chunk_size
    r, k, v, w = (x.reshape([batch, heads, n_chunks, chunk_size, x.shape[-1]]) for x in (r, k, v, w))
    decay_before = _exclusive_cumsum(w, dim=3)  # w summed from chunk start to t-1, <= 0

    scores = _within_chunk_scores(r, k, w, decay_before, sub_chunk_size)  # [B, H, N, L, L]
    out = paddle.matmul(scores, v)
    if n_chunks > 1:  # the state at each chunk start, from a short loop over chunks
        decay_after = _reverse_exclusive_cumsum(w, dim=3)  # w summed from s+1 to chunk end, <= 0
        chunk_decay = paddle.exp(w.sum(axis=3))  # [B, H, N, K]
        chunk_kv = paddle.matmul(k * paddle.exp(decay_after), v, transpose_x=True)  # [B, H, N, K, V]
        state = paddle.zeros([batch, heads, dk, dv], dtype=r.dtype)
        states = []
        # unbind once: indexing chunk c inside the loop makes the backward pass O(T^2)
        for decay, kv in zip(paddle.unbind(chunk_decay.unsqueeze(-1), axis=2), paddle.unbind(chunk_kv, axis=2)):
            states.append(state)
            state = decay * state + kv
        out = out + paddle.matmul(r * paddle.exp(decay_before), paddle.stack(states, axis=2))
    return out.reshape([batch, heads, n_chunks * chunk_size, dv])[:, :, :length]


def wkv6(r, k, v, w, u, bidirectional: bool = False,
         chunk_size: int = CHUNK_SIZE, sub_chunk_size: int = SUB_CHUNK_SIZE):
    """Chunked-parallel WKV6; same arguments and result as ``wkv6_reference``."""
    if chunk_size % sub_chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of sub_chunk_size {sub_chunk_size}")
    with paddle.amp.auto_cast(enable=False):  # the state stays fp32 under bf16 autocast
        return _wkv6(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size)


def _wkv6(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size):
    dtype = r.dtype
    compute = _compute_dtype(dtype)
    batch = r.shape[0]
    # [B, T, H, K] -> [B, H, T, K]
    r, k, v, w = (x.astype(compute).transpose([0, 2, 1, 3]) for x in (r, k, v, w))
    # exp(-1e4) is exactly 0 in fp32 and fp64, and every exponent is a sum of log-decays
    # <= 0, so the floor changes no value or gradient; it keeps -inf out of the sums.
    w = w.clip(min=LOG_DECAY_FLOOR)
    u = u.astype(compute)
    if bidirectional:  # both directions in one batched call
        flip = lambda x: paddle.concat([x, x.flip(2)], axis=0)  # noqa: E731
        both = _strictly_causal(flip(r), flip(k), flip(v), flip(w), chunk_size, sub_chunk_size)
        out = both[:batch] + both[batch:].flip(2)
    else:
        out = _strictly_causal(r, k, v, w, chunk_size, sub_chunk_size)
    bonus = (r * u[None, :, None, :] * k).sum(-1, keepdim=True) * v
    return (out + bonus).transpose([0, 2, 1, 3]).astype(dtype)
