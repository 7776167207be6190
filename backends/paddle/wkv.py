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
model uses, the same algorithm as ``backends/torch/wkv.py``: tokens are grouped
into chunks (the state is passed between chunks with one small loop) and each
chunk into sub-chunks. Every exponent is a sum of log-decays over a span of
tokens that ends before the query, measured from a chunk or sub-chunk boundary,
so none is positive and nothing overflows in fp32 however strong the decay. The
state and all sums are fp32 (fp64 for fp64 input).

Paddle idioms on CPU (each measured against the obvious spelling, fwd+bwd): the
[B, T, H, K] -> (direction, head, time) layout of the scan, with the time reversal of the
bidirectional copy, is one row gather (Paddle's transpose and flip kernels are ~10-30x
slower); the exclusive cumulative sums are the cumsum kernel's own ``exclusive`` /
``reverse`` flags (one op, no concat, slice or flip); tensors are cut with ``split`` /
``unbind`` (the backward of basic slicing is ~10x slower); and a small operand of a
product (a mask, the bonus, a decay) is expanded to the full shape first (the backward of
a broadcasting product is ~3-10x slower). As in PyTorch, a hand-written backward (``_WKV6``,
a PyLayer) keeps only the inputs and the chunk-start states and recomputes the rest a group
of chunks at a time.
"""
from __future__ import annotations

import math

import paddle
from paddle import _C_ops

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
# Largest |exponent| a factorised product may carry: exp(30) ~ 1e13 keeps fp32 far from
# overflow and its reciprocal far from the denormals.
MIN_SUB_CHUNK_SIZE = 2  # below this a chunk is scored pair by pair
LOG_DECAY_FLOOR = -1e4
MAX_FACTORISED_EXPONENT = {paddle.float32: 30.0, paddle.float64: 300.0}


def _compute_dtype(dtype):
    return paddle.float64 if dtype == paddle.float64 else paddle.float32


def _reverse(x, axis: int):
    """``x.flip(axis)`` as a gather with a reversed index (Paddle's flip kernel is ~10x slower)."""
    axis = axis % x.ndim
    return paddle.gather(x, paddle.arange(x.shape[axis] - 1, -1, -1), axis=axis)


def _flip_time(x):
    return _reverse(x, 1)


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
def _exclusive_cumsum(x, dim: int):
    """sum_{j < i} x_j along ``dim`` (exact: the kernel's running sum, no subtraction of an inclusive sum)."""
    return _C_ops.cumsum(x, dim % x.ndim, False, True, False)  # (x, axis, flatten, exclusive, reverse)


def _reverse_exclusive_cumsum(x, dim: int):
    """sum_{j > i} x_j along ``dim``."""
    return _C_ops.cumsum(x, dim % x.ndim, False, True, True)


def _earlier(size: int, dtype):
    """[size, size] with 1 where column s < row t (strictly lower triangle)."""
    return paddle.tril(paddle.ones([size, size], dtype=dtype), -1)


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
    return scores * _earlier(size, r.dtype).expand(scores.shape)


def _factorisable(w, decay_before):
    """Per chunk [...]: True where exp(sum of |w| over the chunk) stays below exp(MAX_FACTORISED_EXPONENT)."""
    span_total = -(decay_before[..., -1, :] + w[..., -1, :]).detach()
    return span_total.max(axis=-1) <= MAX_FACTORISED_EXPONENT[w.dtype]


def _factorised_scores(r, k, w, decay_before):
    """exp(B_{t-1} - B_s) = exp(B_{t-1}) exp(-B_s): one matmul, safe while the span is bounded."""
    size = r.shape[-2]
    scores = paddle.matmul(r * paddle.exp(decay_before), k * paddle.exp(-(decay_before + w)), transpose_y=True)
    return scores * _earlier(size, r.dtype).expand(scores.shape)  # an expanded mask: ~10x faster backward


def _within_chunk_scores(r, k, w, decay_before, sub_chunk_size: int):
    """scores[t, s] = sum_k r_t k_s exp(w_{s+1} + ... + w_{t-1}) for s < t, else 0.

    r, k, w: [..., L, K]; ``decay_before`` is the exclusive cumsum of w along L.
    Returns [..., L, L]. The choice between the fast factorised form and the exact
    split is made chunk by chunk, so one strongly decaying chunk does not slow the rest.
    """
    size = r.shape[-2]
    out_shape = [*r.shape[:-2], size, size]
    bounded = _factorisable(w, decay_before)
    if bool(bounded.all()):
        return _factorised_scores(r, k, w, decay_before)
    if bool(bounded.any()):
        r_f, k_f, w_f, before_f = (x.reshape([-1, *x.shape[-2:]]) for x in (r, k, w, decay_before))
        bounded = bounded.reshape([-1])
        fast, slow = paddle.nonzero(bounded).squeeze(1), paddle.nonzero(~bounded).squeeze(1)
        pick = lambda rows: [paddle.gather(x, rows) for x in (r_f, k_f, w_f, before_f)]  # noqa: E731
        # torch's two index_copy calls: both parts stacked, then gathered back into chunk order
        both = paddle.concat([_factorised_scores(*pick(fast)), _within_chunk_scores(*pick(slow), sub_chunk_size)])
        return paddle.gather(both, paddle.argsort(paddle.concat([fast, slow]))).reshape(out_shape)
    if size <= sub_chunk_size or sub_chunk_size < MIN_SUB_CHUNK_SIZE:
        return _pairwise_scores(r, k, w)
    # Split into sub-chunks. A key in an earlier sub-chunk is scaled by the decay from it to
    # the query's sub-chunk start, the query by the decay from that start: both exponents <= 0.
    # Leading dims are flattened to one: Paddle's kernels stop at rank 6-9 and the recursion
    # below adds two dims per level.
    n_sub, dk = size // sub_chunk_size, r.shape[-1]
    r_s, k_s, w_s = (x.reshape([-1, n_sub, sub_chunk_size, dk]) for x in (r, k, w))
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
    scores = scores * earlier_sub[:, None, :, None].expand(scores.shape)
    # Each sub-chunk again: factorised if it can be, else split four ways, down to pairwise.
    diag = _within_chunk_scores(r_s, k_s, w_s, local_before, sub_chunk_size // 4)  # [..., n, S, S]
    eye = paddle.eye(n_sub, dtype=r.dtype)
    scores = scores + diag.unsqueeze(-2).expand(scores.shape) * eye[:, None, :, None].expand(scores.shape)
    return scores.reshape(out_shape)


def _chunk_transitions(k, v, w):
    """What each chunk does to the state: S_next = chunk_decay * S + chunk_kv.

    k, v, w: [..., N, L, K]. Returns chunk_decay [..., N, K] and chunk_kv [..., N, K, V].
    """
    decay_after = _reverse_exclusive_cumsum(w, dim=-2)  # w summed from s+1 to chunk end, <= 0
    return paddle.exp(w.sum(axis=-2)), paddle.matmul(k * paddle.exp(decay_after), v, transpose_x=True)


def _chunk_states(chunk_decay, chunk_kv):
    """The state at each chunk's start [..., N, K, V], from a short loop over chunks; None for a
    single chunk (its start state is zero)."""
    if chunk_kv.shape[-3] == 1:
        return None
    kvs = paddle.unbind(chunk_kv, axis=-3)
    state = paddle.zeros_like(kvs[0])
    states = []
    # unbind once: indexing chunk c inside the loop makes the backward pass O(T^2)
    for decay, kv in zip(paddle.unbind(chunk_decay.unsqueeze(-1), axis=-3), kvs):
        states.append(state)
        state = decay.expand(state.shape) * state + kv
    return paddle.stack(states, axis=-3)


def _chunk_outputs(r, k, v, w, states, sub_chunk_size: int):
    """Each chunk's output given the state at its start: within-chunk scores times v plus the
    state read out through the decay from the chunk start. [..., N, L, *] -> [..., N, L, V]."""
    decay_before = _exclusive_cumsum(w, dim=-2)  # w summed from chunk start to t-1, <= 0
    scores = _within_chunk_scores(r, k, w, decay_before, sub_chunk_size)  # [..., N, L, L]
    if states is None:
        return paddle.matmul(scores, v)
    return paddle.matmul(scores, v) + paddle.matmul(r * paddle.exp(decay_before), states)


# Chunks are scored (and, in the backward pass, recomputed) in groups of about this many input
# elements, cut across batch, heads and chunks alike: the scores, sub-chunk keys and
# exponentials are several times the inputs' size, so the group bounds that working memory
# whatever the sequence length; 1 MB of fp32 per input keeps a group's elementwise passes in
# the caches (see backends/torch/wkv.py for the measurement).
GROUP_ELEMENTS = 1 << 18


def _rows(x):
    """[..., L, K] -> [M, L, K] (None stays None): chunks are independent given their start states."""
    return None if x is None else x.reshape([-1, *x.shape[-2:]])


def _row_groups(x):
    """Slices of the rows of a [M, L, K] tensor of chunks, a group of about GROUP_ELEMENTS at a time."""
    rows = x.shape[0]
    size = max(1, GROUP_ELEMENTS // max(1, math.prod(x.shape[1:])))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _cut(x, groups):
    """[M, *] -> one part per group of ``_row_groups`` (None stays None): slices (views) where no
    gradient is recorded, since ``split`` copies; ``split`` where one is, since the backward of
    slicing is ~10x slower."""
    if x is None:
        return [None] * len(groups)
    if x.stop_gradient or not paddle.is_grad_enabled():
        return [x[part] for part in groups]
    return paddle.split(x, [part.stop - part.start for part in groups], axis=0)


def _layout(length: int, heads: int, bidirectional: bool):
    """The scan's row order. Rows of a [B, T*H, K] input are t*H + h; the scan reads them as
    (direction, h, t), the backward direction with t reversed. Returns (index, inverse):
    index [D*H*T] the input row of each scan row, inverse [D, T*H] the scan row of each
    input row, direction by direction."""
    t, h = paddle.arange(length), paddle.arange(heads)
    index = t[None, :] * heads + h[:, None]  # [H, T]
    inverse = h[None, :] * length + t[:, None]  # [T, H]
    if bidirectional:
        index = paddle.concat([index, (length - 1 - t)[None, :] * heads + h[:, None]], axis=0)
        inverse = paddle.concat([inverse, (heads + h[None, :]) * length + (length - 1 - t)[:, None]], axis=0)
    return index.reshape([-1]), inverse.reshape([-1, length * heads])


def _to_chunks(x, layout, chunk_size: int):
    """[B, T, H, K] -> [G, N, L, K] (G = B * directions * H): heads out of the token axis and, when
    bidirectional, the reversed sequence appended per batch element (both directions in one
    batched scan), in one gather (Paddle's transpose and flip kernels are ~10-30x slower);
    zero-padded to whole chunks (trailing zeros and zero log-decay never reach earlier tokens)."""
    batch, length, heads, dk = x.shape
    x = paddle.gather(x.reshape([batch, length * heads, dk]), layout[0], axis=1).reshape([-1, length, dk])
    pad = (-length) % chunk_size
    if pad:
        x = paddle.concat([x, paddle.zeros([x.shape[0], pad, dk], dtype=x.dtype)], axis=1)
    return x.reshape([x.shape[0], -1, chunk_size, dk])


def _from_chunks(x, layout, length: int, heads: int):
    """The adjoint of ``_to_chunks``: [G, N, L, V] -> [B, T, H, V], the directions summed."""
    dv = x.shape[-1]
    x = x.reshape([x.shape[0], -1, dv])
    if x.shape[1] > length:
        x = paddle.split(x, [length, x.shape[1] - length], axis=1)[0]
    batch = x.shape[0] * length // layout[0].shape[0]
    x = x.reshape([batch, -1, dv])
    copies = paddle.unbind(layout[1], axis=0)
    out = paddle.gather(x, copies[0], axis=1)
    for rows in copies[1:]:
        out = out + paddle.gather(x, rows, axis=1)
    return out.reshape([batch, length, heads, dv])


def _prepare(r, k, v, w, u, bidirectional: bool, chunk_size: int):
    """[B, T, H, K] inputs -> (r, k, v, u in the compute dtype; chunked r, k, v, w; the layout)."""
    compute = _compute_dtype(r.dtype)
    r, k, v, w = (x.astype(compute) for x in (r, k, v, w))
    # exp(-1e4) is exactly 0 in fp32 and fp64, and every exponent is a sum of log-decays
    # <= 0, so the floor changes no value or gradient; it keeps -inf out of the sums.
    w = w.clip(min=LOG_DECAY_FLOOR)
    layout = _layout(r.shape[1], r.shape[2], bidirectional)
    chunks = [_to_chunks(x, layout, chunk_size) for x in (r, k, v, w)]
    return r, k, v, u.astype(compute), chunks, layout


def _bonus(r, k, v, u):
    """The current token's own term r_t diag(u) k_t^T v_t, for [B, T, H, K] inputs (the small
    operands expanded first: the backward of a broadcasting product is ~3x slower)."""
    weight = (r * k * u[None, None].expand(r.shape)).sum(-1, keepdim=True)
    return weight.expand(v.shape) * v


def _leaf(x):
    """A detached view of ``x`` that records a graph of its own: a leaf of a backward recompute."""
    x = x.detach()
    x.stop_gradient = False
    return x


def _backward_grads(outputs, grad_outputs, leaves):
    """The gradients of sum(outputs * grad_outputs) with respect to ``leaves`` (None where one is
    not reached), for use inside a PyLayer's backward. Through ``paddle.autograd.backward`` and
    the leaves' ``.grad``: a ``paddle.grad`` inside a PyLayer backward that itself runs under
    ``paddle.grad`` segfaults in Paddle 3.3.1 (under ``loss.backward()`` it works), a nested
    ``backward`` works under both. The leaves are fresh (``_leaf``), so nothing else accumulates."""
    paddle.autograd.backward(list(outputs), list(grad_outputs))
    return [x.grad for x in leaves]


def _factorised_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state):
    """The gradients of chunks whose decay is bounded (``_factorisable``), in closed form, no
    autodiff: ``backends/torch/wkv.py: _factorised_chunk_grads`` (its docstring gives the forward it
    inverts). ``_autograd_chunk_grads`` is its reference (tests tie the two)."""
    earlier = _earlier(r.shape[-2], r.dtype)
    decay_before = _exclusive_cumsum(w, dim=-2)
    query_decay, key_growth = paddle.exp(decay_before), paddle.exp(-(decay_before + w))
    query, key = r * query_decay, k * key_growth
    scores = paddle.matmul(query, key, transpose_y=True) * earlier
    grad_scores = paddle.matmul(grad_out, v, transpose_y=True) * earlier
    grad_v = paddle.matmul(scores, grad_out, transpose_x=True)
    grad_query = paddle.matmul(grad_scores, key)
    if start_state is not None:
        grad_query = grad_query + paddle.matmul(grad_out, start_state, transpose_y=True)
    grad_key = paddle.matmul(grad_scores, query, transpose_x=True)
    grad_r, grad_k = grad_query * query_decay, grad_key * key_growth
    # d/dw_j: q_t carries w_j for t > j; p_s carries -w_j for s >= j (exact sums, no differences)
    key_term = grad_key * key
    grad_w = _reverse_exclusive_cumsum(grad_query * query - key_term, dim=-2) - key_term
    if grad_next_state is not None:
        key_decay = paddle.exp(_reverse_exclusive_cumsum(w, dim=-2))
        decayed_key = k * key_decay
        grad_v = grad_v + paddle.matmul(decayed_key, grad_next_state)
        grad_decayed_key = paddle.matmul(v, grad_next_state, transpose_y=True)
        grad_k = grad_k + grad_decayed_key * key_decay
        # (k e^A)_s carries w_j for s < j; e^(sum w) carries every w_j
        grad_chunk_decay = (grad_next_state * start_state).sum(-1) * paddle.exp(w.sum(axis=-2))  # [..., K]
        grad_w = grad_w + _exclusive_cumsum(grad_decayed_key * decayed_key, dim=-2) + grad_chunk_decay.unsqueeze(-2)
    return [grad_r, grad_k, grad_v, grad_w]


def _autograd_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state, sub_chunk_size: int):
    """The same gradients as ``_factorised_chunk_grads``, for any decay: autograd over the
    recomputed chunks (``_chunk_outputs`` and, given grad_next_state, the state transition)."""
    with paddle.enable_grad():
        leaves = [_leaf(x) for x in (r, k, v, w)]
        out = _chunk_outputs(*leaves, start_state, sub_chunk_size)
        if grad_next_state is None:
            grads = _backward_grads([out], [grad_out], leaves)
        else:
            decay, kv = _chunk_transitions(*leaves[1:])
            next_state = decay.unsqueeze(-1).expand(kv.shape) * start_state + kv
            grads = _backward_grads([out, next_state], [grad_out, grad_next_state], leaves)
    return [paddle.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _local_grads(r, k, v, w, start_state, grad_out, grad_next_state, sub_chunk_size: int):
    """Chunk-local gradients [M, L, *], in closed form where a chunk's decay is bounded and by
    autograd over the recomputed chunk where it is not, chosen chunk by chunk as the forward does."""
    bounded = _factorisable(w, _exclusive_cumsum(w, dim=-2))
    if bool(bounded.all()):
        return _factorised_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state)
    if not bool(bounded.any()):
        return _autograd_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state, sub_chunk_size)
    fast, slow = paddle.nonzero(bounded).squeeze(1), paddle.nonzero(~bounded).squeeze(1)
    args = (r, k, v, w, start_state, grad_out, grad_next_state)
    pick = lambda rows: [None if x is None else paddle.gather(x, rows) for x in args]  # noqa: E731
    parts = zip(_factorised_chunk_grads(*pick(fast)), _autograd_chunk_grads(*pick(slow), sub_chunk_size))
    # torch's two index_copy calls: both parts stacked, then gathered back into row order
    order = paddle.argsort(paddle.concat([fast, slow]))
    return [paddle.gather(paddle.concat([a, b]), order) for a, b in parts]


def _chunked_scan_backward(r, k, v, w, states, grad_out, sub_chunk_size: int):
    """Gradients of ``_chunk_outputs`` (with the states it implies) for chunked [G, N, L, K] inputs.

    The state's gradient runs backwards through the chunks in closed form,
    dS_c = q_c^T dO_c + chunk_decay_c * dS_{c+1} with q = r * exp(decay_before); given it,
    chunks are independent, and each group's local gradients come from ``_local_grads``:
    exactly the gradients autograd gives over the whole forward pass.
    The inputs carry no graph; returns the [r, k, v, w] gradients, of their shapes.
    """
    after = None  # after[c]: d loss / d (the state after chunk c); None for one chunk
    if states is not None:
        read_grad = paddle.matmul(r * paddle.exp(_exclusive_cumsum(w, dim=-2)), grad_out, transpose_x=True)
        chunk_decay = paddle.exp(w.sum(axis=-2)).unsqueeze(-1)  # [G, N, K, 1]
        reads, decays = paddle.unbind(read_grad, axis=1), paddle.unbind(chunk_decay, axis=1)
        after = [None] * len(reads)
        following = paddle.zeros_like(reads[0])
        for c in range(len(reads) - 1, -1, -1):
            after[c] = following
            following = reads[c] + decays[c] * following
        after = paddle.stack(after, axis=1)
        del read_grad, reads, following  # an input's size each, not needed by the recompute
    rows = [_rows(x) for x in (r, k, v, w, states, grad_out, after)]
    groups = _row_groups(rows[0])
    if len(groups) == 1:
        local = _local_grads(*rows, sub_chunk_size)
    else:  # filled a group at a time, not concatenated: no second copy
        local = [paddle.empty_like(x) for x in rows[:4]]
        for part, args in zip(groups, zip(*(_cut(x, groups) for x in rows))):
            for full, g in zip(local, _local_grads(*args, sub_chunk_size)):
                full[part] = g
    return [g.reshape(x.shape) for g, x in zip(local, (r, k, v, w))]


def _chunk_parts(r, k, v, w, sub_chunk_size: int):
    """A chunk's own contribution: within-chunk output, start-state query, transition (as
    ``backends/torch/wkv.py: _chunk_parts``, where the bounded chunks' shortcut is explained)."""
    decay_before = _exclusive_cumsum(w, dim=-2)
    query = r * paddle.exp(decay_before)
    chunk_decay = paddle.exp(w.sum(axis=-2))  # [M, K]
    if bool(_factorisable(w, decay_before).all()):
        key = k * paddle.exp(-(decay_before + w))
        scores = paddle.matmul(query, key, transpose_y=True)
        scores = scores * _earlier(r.shape[-2], r.dtype).expand(scores.shape)
        chunk_kv = paddle.matmul(key * chunk_decay.unsqueeze(-2).expand(key.shape), v, transpose_x=True)
    else:
        scores = _within_chunk_scores(r, k, w, decay_before, sub_chunk_size)
        chunk_kv = _chunk_transitions(k, v, w)[1]
    return paddle.matmul(scores, v), query, chunk_decay, chunk_kv


def _chunked_scan(r, k, v, w, sub_chunk_size: int):
    """The chunked scan [G, N, L, *] -> (outputs [G, N, L, V], chunk-start states [G, N, K, V] or
    None for one chunk): each group of chunk rows scored on its own, the states passed between
    chunks, then each chunk's start state read out."""
    rows = [_rows(x) for x in (r, k, v, w)]
    groups = _row_groups(rows[0])
    parts = [_chunk_parts(*args, sub_chunk_size) for args in zip(*(_cut(x, groups) for x in rows))]
    join = lambda i: paddle.concat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]  # noqa: E731
    if r.shape[1] == 1:
        return join(0).reshape(v.shape), None
    lead = r.shape[:2]  # [G, N]
    states = _chunk_states(join(2).reshape([*lead, -1]), join(3).reshape([*lead, *parts[0][3].shape[-2:]]))
    # each group's start-state read-out while its within-chunk part is still at hand
    out = [within + paddle.matmul(query, state)
           for (within, query, _, _), state in zip(parts, _cut(_rows(states), groups))]
    return (paddle.concat(out) if len(out) > 1 else out[0]).reshape(v.shape), states


def _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size):
    """WKV6 [B, T, H, K] -> ([B, T, H, V], the chunk-start states [G, N, K, V] or None)."""
    length, heads = r.shape[1], r.shape[2]
    r_c, k_c, v_c, u_c, chunks, layout = _prepare(r, k, v, w, u, bidirectional, chunk_size)
    scan, states = _chunked_scan(*chunks, sub_chunk_size)
    return (_from_chunks(scan, layout, length, heads) + _bonus(r_c, k_c, v_c, u_c)).astype(r.dtype), states


class _WKV6(paddle.autograd.PyLayer):
    """WKV6 with a hand-written backward that keeps only the inputs and the chunk-start states
    [G, N, K, V] (one input's size per direction at K = V = 64). Everything else (layout
    gathers, scores, sub-chunk keys, exponentials) is recomputed a group of chunks at a time in
    the backward pass, so its memory does not grow with the sequence. Paddle runs the forward
    without a graph and wants one gradient per tensor input, None where it has stop_gradient."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size):
        out, states = _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size)
        ctx.save_for_backward(r, k, v, w, u, states)
        ctx.options = (bidirectional, chunk_size, sub_chunk_size)
        ctx.needs_grad = [not x.stop_gradient for x in (r, k, v, w, u)]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        bidirectional, chunk_size, sub_chunk_size = ctx.options
        *inputs, states = ctx.saved_tensor()
        # loss.backward() may run outside the forward's autocast-off region
        with paddle.amp.auto_cast(enable=False), paddle.no_grad():
            with paddle.enable_grad():
                leaves = [_leaf(x) for x in inputs]
                r_c, k_c, v_c, u_c, chunks, layout = _prepare(*leaves, bidirectional, chunk_size)
            grad_c = grad_out.detach().astype(r_c.dtype)  # [B, T, H, V]
            chunk_grads = _chunked_scan_backward(*(x.detach() for x in chunks), states,
                                                 _to_chunks(grad_c, layout, chunk_size), sub_chunk_size)
            with paddle.enable_grad():
                grads = _backward_grads([*chunks, _bonus(r_c, k_c, v_c, u_c)], [*chunk_grads, grad_c], leaves)
        return tuple((paddle.zeros_like(x) if g is None else g) if needs else None
                     for x, g, needs in zip(leaves, grads, ctx.needs_grad))


def wkv6(r, k, v, w, u, bidirectional: bool = False,
         chunk_size: int = CHUNK_SIZE, sub_chunk_size: int = SUB_CHUNK_SIZE):
    """Chunked-parallel WKV6; same arguments and result as ``wkv6_reference``."""
    if chunk_size % sub_chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of sub_chunk_size {sub_chunk_size}")
    # A sequence shorter than a chunk is padded only to whole sub-chunks (16 tokens of a
    # 4x4 grid would otherwise be computed as 64).
    chunk_size = min(chunk_size, -(-r.shape[1] // sub_chunk_size) * sub_chunk_size)
    with paddle.amp.auto_cast(enable=False):  # the state stays fp32 under bf16 autocast
        if paddle.is_grad_enabled() and any(not x.stop_gradient for x in (r, k, v, w, u)):
            return _WKV6.apply(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size)
        return _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size)[0]
