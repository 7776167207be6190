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

Factorised or split scores (``branch``):

* ``"auto"`` (PyNative; what PyTorch does): chunk by chunk, use the one-matmul
  factorised product where the chunk's largest decay sum stays below
  ``MAX_FACTORISED_EXPONENT``, else split that chunk into sub-chunks (each again
  factorised or split, down to pairwise). The choice is a Python ``if`` on tensor
  values, so it cannot be compiled.
* ``"safe"`` (Graph mode, the default under ``GRAPH_MODE``): no data-dependent
  branch. Every chunk is split into sub-chunks at every level (64 -> 16 -> 4, a
  16-token chunk 16 -> 4) and only 4-token blocks are scored pair by pair: the
  split's exponents are bounded by construction (all <= 0), so it is exact for any
  decay and equals the factorised result up to fp32 rounding (~1e-7 relative).

MindSpore idioms on CPU (each measured against the obvious spelling, forward and
backward, in Graph mode and PyNative): products are 3-D ``BatchMatMul`` with its
transpose flags over a flattened batch (4-D/5-D ``matmul`` with ``swapaxes`` is several
times slower); broadcasting an operand and summing over an axis are matmuls with a ones
vector (broadcasting elementwise kernels are ~10x slower than same-shape ones, and
``ReduceSum`` - also the backward of ``Tile`` - ~10x slower than the matmul); the
exclusive cumulative sums are a 0/1 triangular matrix times the log-decays (``CumSum`` is
~4x slower); and the [B, T, H, K] -> (direction, head, time) layout, with the time
reversal of the bidirectional copy, is one row gather whose backward is a gather too
(transpose and flip kernels, and a gather's default scatter backward, are slow).

Backward (``_WKV6``): under "auto" (eager PyNative) a Cell with a hand-written ``bprop`` keeps only
the inputs and the chunk-start states and recomputes the rest a group of chunks at a time in
the backward pass, as PyTorch and Paddle do; under "safe" (Graph mode, ``ms.jit``) autodiff runs
through the forward, which MindSpore 2.10 cannot compile with that ``bprop`` (see ``_WKV6``).

Ops: exp, matmul / batched matmul, gather, tile, elementwise arithmetic, concat, split,
unbind, reshape, comparisons of ``arange`` - all run on CPU, GPU and Ascend (no einsum,
which is GPU-only in MindSpore, and no ``mint.*``).
"""
from __future__ import annotations

import functools

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
# Largest |exponent| a factorised product may carry: exp(30) ~ 1e13 keeps fp32 far from
# overflow and its reciprocal far from the denormals.
MIN_SUB_CHUNK_SIZE = 2  # below this a chunk is scored pair by pair
LOG_DECAY_FLOOR = -1e4
MAX_FACTORISED_EXPONENT = {ms.float32: 30.0, ms.float64: 300.0}
BRANCHES = ("auto", "safe")
# Added to the exponent of a key sub-chunk that is not earlier than the query's: exp() of it
# is exactly 0 in fp32 and fp64 (every other exponent is a finite sum of log-decays >= -1e4),
# so the key drops out of the product, and its gradient with it.
_MASKED_EXPONENT = 4 * LOG_DECAY_FLOOR

_bmm = ops.BatchMatMul()
_bmm_nt = ops.BatchMatMul(transpose_b=True)  # a @ b^T
_bmm_tn = ops.BatchMatMul(transpose_a=True)  # a^T @ b


def default_branch() -> str:
    """``"safe"`` under GRAPH_MODE (no data-dependent Python branch), else ``"auto"``."""
    return "safe" if ms.get_context("mode") == ms.GRAPH_MODE else "auto"


def _compute_dtype(dtype):
    return ms.float64 if dtype == ms.float64 else ms.float32


def _flip_time(x):
    return ops.flip(x, (1,))


# Constants (masks, 0/1 matrices, ones, the layout's indices) are built once in numpy and cached:
# PyNative then runs no ops to make them, and Graph mode folds them at compile time.
@functools.lru_cache(maxsize=256)
def _constant(name: str, dtype, *sizes):
    """The named constant as a Tensor of ``dtype`` (a MindSpore dtype)."""
    np_dtype = ms.dtype_to_nptype(dtype)
    if name == "ones":
        return Tensor(np.ones(sizes, np_dtype))
    (size,) = sizes
    idx = np.arange(size)
    if name == "earlier":  # [t, s]: s < t (strictly lower triangle)
        value = idx[None, :] < idx[:, None]
    elif name == "later":  # [t, s]: s > t
        value = idx[None, :] > idx[:, None]
    elif name == "between":  # [t*s, m]: s < m < t
        value = ((idx[None, :, None] < idx[None, None, :]) & (idx[None, None, :] < idx[:, None, None]))
        value = value.reshape(size * size, size)
    elif name == "not_earlier_exponent":  # [i, j]: _MASKED_EXPONENT where j >= i
        value = (idx[None, :] >= idx[:, None]) * _MASKED_EXPONENT
    elif name == "eye":
        value = np.eye(size)
    else:
        raise ValueError(name)
    return Tensor(value.astype(np_dtype))


def _earlier_mask(size: int, dtype):
    """[size, size] with 1 where column s < row t (strictly lower triangle)."""
    return _constant("earlier", dtype, size)


def _tile_to(x, shape):
    """A constant (no gradient) ``x`` tiled to ``shape`` (same rank): same-shape products are
    ~10x faster than broadcasting ones on MindSpore's CPU kernels."""
    reps = tuple(1 if a == b else b for a, b in zip(x.shape, shape))
    return ops.tile(x, reps) if any(rep != 1 for rep in reps) else x


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _expand(x, shape):
    """``x`` broadcast to ``shape`` (same rank, size-1 axes grow), as matmuls with a ones vector.

    On MindSpore's CPU kernels a broadcasting product is ~10x slower than a same-shape one,
    and the backward of a tiled operand is a ReduceSum that is slower still; a matmul with
    ones is an outer product forward and a matmul backward, both ~10x faster.
    """
    start = 0
    while start < len(shape):
        if x.shape[start] == shape[start]:
            start += 1
            continue
        end = start
        while end < len(shape) and x.shape[end] != shape[end]:
            end += 1
        lead, grow, rest = _prod(x.shape[:start]), _prod(shape[start:end]), _prod(x.shape[end:])
        if rest == 1:
            y = ops.matmul(x.reshape(lead, 1), _constant("ones", x.dtype, 1, grow))
        elif lead == 1:
            y = ops.matmul(_constant("ones", x.dtype, grow, 1), x.reshape(1, rest))
        else:
            y = ops.matmul(_constant("ones", x.dtype, grow, 1), x.reshape(lead, 1, rest))
        x = y.reshape(*x.shape[:start], *shape[start:end], *x.shape[end:])
        start = end
    return x


def _sum_axis(x, axis: int, keepdims: bool = False):
    """x.sum(axis) as a matmul with a ones vector (~5-10x faster than ReduceSum on CPU)."""
    axis = axis % x.ndim
    lead, size, rest = _prod(x.shape[:axis]), x.shape[axis], _prod(x.shape[axis + 1:])
    if rest == 1:
        out = ops.matmul(x.reshape(lead, size), _constant("ones", x.dtype, size, 1))
    elif lead == 1:
        out = ops.matmul(_constant("ones", x.dtype, 1, size), x.reshape(size, rest))
    else:
        out = ops.matmul(_constant("ones", x.dtype, 1, size), x.reshape(lead, size, rest))
    kept = (*x.shape[:axis], 1, *x.shape[axis + 1:])
    return out.reshape(kept if keepdims else kept[:axis] + kept[axis + 1:])


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
def _prefix_matrix(size: int, dtype, reverse: bool):
    """[size, size] 0/1 matrix summing the entries strictly before (after, if ``reverse``) each row."""
    return _constant("later" if reverse else "earlier", dtype, size)


def _exclusive_cumsum(x, dim: int):
    """sum_{j < i} x_j along ``dim`` (-2), as a 0/1 triangular matrix times x: a direct sum of
    the entries before i (exact: no subtraction of an inclusive sum; ~4x faster than CumSum)."""
    size = x.shape[-2]
    return ops.matmul(_prefix_matrix(size, x.dtype, False), x.reshape(-1, size, x.shape[-1])).reshape(x.shape)


def _reverse_exclusive_cumsum(x, dim: int):
    """sum_{j > i} x_j along ``dim`` (-2)."""
    size = x.shape[-2]
    return ops.matmul(_prefix_matrix(size, x.dtype, True), x.reshape(-1, size, x.shape[-1])).reshape(x.shape)


def _pairwise_scores(r, k, w):
    """Each (t, s) pair with its own exponent: exact for any decay, costs S*K per token.

    The exponent w_{s+1} + ... + w_{t-1} is summed directly (a 0/1 matrix times w), not
    taken as a difference of cumulative sums, so a strong decay early in the sub-chunk
    cannot cancel away the precision of the mild ones after it. r, k, w: [M, S, K].
    """
    size, dk = r.shape[-2], r.shape[-1]
    between = _constant("between", w.dtype, size)  # [t*s, m]: s < m < t
    exponent = ops.matmul(between, w)  # [M, t*s, K], <= 0
    keys = _expand(k.expand_dims(1), (k.shape[0], size, size, dk)).reshape(-1, size * size, dk) * ops.exp(exponent)
    # one row of keys per query: [M*t, 1, K] @ [M*t, K, s]
    scores = _bmm_nt(r.reshape(-1, 1, dk), keys.reshape(-1, size, dk)).reshape(-1, size, size)
    return scores * _tile_to(_earlier_mask(size, r.dtype).expand_dims(0), scores.shape)


def _factorisable(w, decay_before):
    """Per chunk [M]: True where exp(sum of |w| over the chunk) stays below exp(MAX_FACTORISED_EXPONENT)."""
    span_total = -ops.stop_gradient(decay_before[:, -1, :] + w[:, -1, :])
    return span_total.max(axis=-1) <= MAX_FACTORISED_EXPONENT[w.dtype]


def _factorised_scores(r, k, w, decay_before):
    """exp(B_{t-1} - B_s) = exp(B_{t-1}) exp(-B_s): one matmul, safe while the span is bounded."""
    size = r.shape[-2]
    scores = _bmm_nt(r * ops.exp(decay_before), k * ops.exp(-(decay_before + w)))
    return scores * _tile_to(_earlier_mask(size, r.dtype).expand_dims(0), scores.shape)


def _within_chunk_scores(r, k, w, decay_before, sub_chunk_size: int, branch: str):
    """scores[t, s] = sum_k r_t k_s exp(w_{s+1} + ... + w_{t-1}) for s < t, else 0.

    r, k, w: [M, L, K] (M: every chunk of every head and batch element); ``decay_before``
    is the exclusive cumsum of w along L. Returns [M, L, L]. "auto" chooses between the
    fast factorised form and the exact split chunk by chunk, so one strongly decaying
    chunk does not slow the rest; "safe" always splits (no data-dependent branch).
    """
    size, dk = r.shape[-2], r.shape[-1]
    if branch == "auto":
        bounded = _factorisable(w, decay_before)
        if bool(bounded.all()):
            return _factorised_scores(r, k, w, decay_before)
        if bool(bounded.any()):
            fast, slow = ops.nonzero(bounded).reshape(-1), ops.nonzero(~bounded).reshape(-1)
            pick = lambda rows: [ops.gather(x, rows, 0) for x in (r, k, w, decay_before)]  # noqa: E731
            # torch's two index_copy calls: both parts stacked, then gathered back into chunk order
            both = ops.concat([_factorised_scores(*pick(fast)),
                               _within_chunk_scores(*pick(slow), sub_chunk_size, branch)], 0)
            return ops.gather(both, ops.argsort(ops.concat([fast, slow], 0)), 0)
    else:  # split at every level: only blocks of at most 4 tokens are scored pair by pair
        while size <= sub_chunk_size and sub_chunk_size >= MIN_SUB_CHUNK_SIZE:
            sub_chunk_size //= 4
    if size <= sub_chunk_size or sub_chunk_size < MIN_SUB_CHUNK_SIZE:
        return _pairwise_scores(r, k, w)
    # Split into sub-chunks. A key in an earlier sub-chunk is scaled by the decay from it to
    # the query's sub-chunk start, the query by the decay from that start: both exponents <= 0.
    n_sub = size // sub_chunk_size
    r_s, k_s, w_s = (x.reshape(-1, n_sub, sub_chunk_size, dk) for x in (r, k, w))
    m = r_s.shape[0]
    local_before = _exclusive_cumsum(w_s, dim=-2)
    local_after = _reverse_exclusive_cumsum(w_s, dim=-2)
    # strictly_between[i*j, m] = j < m < i: whole sub-chunks between key sub-chunk j and query i
    strictly_between = _constant("between", w.dtype, n_sub)
    gap = ops.matmul(strictly_between, _sum_axis(w_s, -2)).reshape(m, n_sub, n_sub, dk)  # [M, i, j, K]
    # key sub-chunks j >= i drop out here (exp(-4e4) = 0) instead of being masked in the scores
    not_earlier = _constant("not_earlier_exponent", w.dtype, n_sub)  # [i, j]
    gap = gap + _tile_to(not_earlier.reshape(1, n_sub, n_sub, 1), gap.shape)
    # keys[i, j] = k_j exp(local_after_j) exp(gap_ij): both factors <= 1, expanded to [M, i, j, S, K]
    full = (m, n_sub, n_sub, sub_chunk_size, dk)
    keys = _expand((k_s * ops.exp(local_after)).expand_dims(1), full) * _expand(ops.exp(gap).expand_dims(3), full)
    keys = keys.reshape(m * n_sub, size, dk)
    queries = (r_s * ops.exp(local_before)).reshape(m * n_sub, sub_chunk_size, dk)
    scores = _bmm_nt(queries, keys).reshape(m, n_sub, sub_chunk_size, n_sub, sub_chunk_size)  # [M, i, S, j, S]
    # Each sub-chunk again ("auto": factorised if it can be, else split four ways, down to pairwise).
    diag = _within_chunk_scores(r_s.reshape(-1, sub_chunk_size, dk), k_s.reshape(-1, sub_chunk_size, dk),
                                w_s.reshape(-1, sub_chunk_size, dk), local_before.reshape(-1, sub_chunk_size, dk),
                                sub_chunk_size // 4, branch)  # [M*n, S, S]
    eye = _constant("eye", r.dtype, n_sub).reshape(1, n_sub, 1, n_sub, 1)
    diag = _expand(diag.reshape(m, n_sub, sub_chunk_size, 1, sub_chunk_size), scores.shape)
    scores = scores + diag * _tile_to(eye, scores.shape)
    return scores.reshape(m, size, size)


def _chunk_transitions(k, v, w):
    """What each chunk does to the state: S_next = chunk_decay * S + chunk_kv.

    k, v, w: [G, N, L, K]. Returns chunk_decay [G, N, K] and chunk_kv [G, N, K, V].
    """
    groups, n_chunks, size, dk = k.shape
    decay_after = _reverse_exclusive_cumsum(w, dim=-2)  # w summed from s+1 to chunk end, <= 0
    keys = (k * ops.exp(decay_after)).reshape(-1, size, dk)
    chunk_kv = _bmm_tn(keys, v.reshape(-1, size, v.shape[-1])).reshape(groups, n_chunks, dk, v.shape[-1])
    return ops.exp(_sum_axis(w, -2)), chunk_kv


def _chunk_states(chunk_decay, chunk_kv):
    """The state at each chunk's start [G, N, K, V], from a short loop over chunks; None for a
    single chunk (its start state is zero)."""
    n_chunks = chunk_kv.shape[1]
    if n_chunks == 1:
        return None
    state_shape = (chunk_kv.shape[0], chunk_kv.shape[2], chunk_kv.shape[3])
    state = ops.zeros(state_shape, chunk_kv.dtype)
    states = []
    # unbind once: indexing chunk c inside the loop makes the backward pass O(T^2)
    decays, kvs = ops.unbind(chunk_decay.expand_dims(-1), 1), ops.unbind(chunk_kv, 1)
    for c in range(n_chunks):
        states.append(state)
        state = _expand(decays[c], state_shape) * state + kvs[c]
    return ops.stack(states, axis=1)


def _chunk_outputs(r, k, v, w, states, sub_chunk_size: int, branch: str):
    """Each chunk's output given the state at its start: within-chunk scores times v plus the
    state read out through the decay from the chunk start. [G, N, L, *] -> [G, N, L, V]."""
    groups, n_chunks, size, dk = r.shape
    dv = v.shape[-1]
    decay_before = _exclusive_cumsum(w, dim=-2)  # w summed from chunk start to t-1, <= 0
    flat = lambda x: x.reshape(-1, size, x.shape[-1])  # noqa: E731
    scores = _within_chunk_scores(flat(r), flat(k), flat(w), flat(decay_before), sub_chunk_size, branch)
    out = _bmm(scores, flat(v))
    if states is not None:
        out = out + _bmm(flat(r * ops.exp(decay_before)), states.reshape(-1, dk, dv))
    return out.reshape(groups, n_chunks, size, dv)


# Chunks are scored (and, in the backward pass, recomputed) in groups of about this many input
# elements, cut across batch, heads and chunks alike: the scores, sub-chunk keys and
# exponentials are several times the inputs' size, so the group bounds that working memory
# whatever the sequence length; 1 MB of fp32 per input keeps a group's elementwise passes in
# the caches (see backends/torch/wkv.py for the measurement).
GROUP_ELEMENTS = 1 << 18
# Graph mode ("safe") differentiates the forward, so its autodiff keeps every group's
# intermediates anyway: there groups bound only a no-grad call's working memory, and each group
# is another copy of the scoring ops in the graph. Larger groups: the DiR-S/2 step (256 tokens,
# batch 8) took 592 ms with 1 << 18 against 553 ms with 1 << 22.
SAFE_GROUP_ELEMENTS = 1 << 22


def _rows(x):
    """[G, N, L, K] -> [G*N, 1, L, K] (None stays None): chunks are independent given their start
    states, so groups are cut across batch, heads and chunks alike."""
    return None if x is None else x.reshape(-1, 1, *x.shape[-2:])


def _row_groups(x, branch: str = "auto"):
    """(start, stop) ranges of the rows (axis 0) of a [M, 1, L, K] tensor of chunks, a group at a time."""
    rows = x.shape[0]
    elements = GROUP_ELEMENTS if branch == "auto" else SAFE_GROUP_ELEMENTS
    size = max(1, elements // max(1, _prod(x.shape[1:])))
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


class _RowGather(nn.Cell):
    """y = x[:, index] for x [B, R, K], with a backward that is a gather too (MindSpore's default
    gather backward is a slow scatter): x's rows each appear once per direction in y, at
    ``inverse`` [D, R]. ``_RowGatherAdjoint`` is the transpose: the D copies gathered back and summed."""

    def construct(self, x, index, inverse):
        return ops.gather(x, index, 1)

    def bprop(self, x, index, inverse, out, dout):
        return _sum_copies(dout, inverse), ops.zeros_like(index), ops.zeros_like(inverse)


class _RowGatherAdjoint(nn.Cell):
    def construct(self, x, index, inverse):
        return _sum_copies(x, inverse)

    def bprop(self, x, index, inverse, out, dout):
        return ops.gather(dout, index, 1), ops.zeros_like(index), ops.zeros_like(inverse)


def _sum_copies(x, inverse):
    """sum_d x[:, inverse[d]] for x [B, D*R, K], inverse [D, R] -> [B, R, K]."""
    copies = ops.unbind(inverse, 0)
    total = ops.gather(x, copies[0], 1)
    for rows in copies[1:]:
        total = total + ops.gather(x, rows, 1)
    return total


_row_gather, _row_gather_adjoint = _RowGather(), _RowGatherAdjoint()


@functools.lru_cache(maxsize=64)
def _layout(length: int, heads: int, bidirectional: bool):
    """The scan's row order. Rows of a [B, T*H, K] input are t*H + h; the scan reads them as
    (direction, h, t), the backward direction with t reversed. Returns (index, inverse):
    index [D*H*T] the input row of each scan row, inverse [D, T*H] the scan row of each
    input row, direction by direction."""
    t, h = np.arange(length), np.arange(heads)
    index = [t[None, :] * heads + h[:, None]]  # [H, T]
    inverse = [h[None, :] * length + t[:, None]]  # [T, H]
    if bidirectional:
        index.append((length - 1 - t)[None, :] * heads + h[:, None])
        inverse.append((heads + h[None, :]) * length + (length - 1 - t)[:, None])
    index = np.concatenate(index).reshape(-1).astype(np.int32)
    return Tensor(index), Tensor(np.concatenate(inverse).reshape(-1, length * heads).astype(np.int32))


def _to_chunks(x, layout, chunk_size: int):
    """[B, T, H, K] -> [G, N, L, K] (G = B * directions * H): heads out of the token axis and, when
    bidirectional, the reversed sequence appended per batch element (both directions in one
    batched scan), in one gather; zero-padded to whole chunks (trailing zeros and zero
    log-decay never reach earlier tokens)."""
    batch, length, heads, dk = x.shape
    x = _row_gather(x.reshape(batch, length * heads, dk), *layout).reshape(-1, length, dk)
    pad = (-length) % chunk_size
    if pad:
        x = ops.concat([x, ops.zeros((x.shape[0], pad, dk), x.dtype)], 1)
    return x.reshape(x.shape[0], -1, chunk_size, dk)


def _from_chunks(x, layout, length: int, heads: int):
    """The adjoint of ``_to_chunks``: [G, N, L, V] -> [B, T, H, V], the directions summed."""
    dv = x.shape[-1]
    x = x.reshape(x.shape[0], -1, dv)
    if x.shape[1] > length:
        x = ops.split(x, (length, x.shape[1] - length), 1)[0]
    batch = x.shape[0] * length // layout[0].shape[0]
    x = _row_gather_adjoint(x.reshape(batch, -1, dv), *layout)
    return x.reshape(batch, length, heads, dv)


def _prepare(r, k, v, w, u, bidirectional: bool, chunk_size: int):
    """[B, T, H, K] inputs -> (r, k, v, u in the compute dtype; chunked r, k, v, w; the layout)."""
    compute = _compute_dtype(r.dtype)
    r, k, v, w = (x.astype(compute) for x in (r, k, v, w))
    # exp(-1e4) is exactly 0 in fp32 and fp64, and every exponent is a sum of log-decays
    # <= 0, so the floor changes no value or gradient; it keeps -inf out of the sums.
    w = ops.clamp(w, min=LOG_DECAY_FLOOR)
    layout = _layout(r.shape[1], r.shape[2], bidirectional)
    chunks = [_to_chunks(x, layout, chunk_size) for x in (r, k, v, w)]
    return r, k, v, u.astype(compute), chunks, layout


def _bonus(r, k, v, u):
    """The current token's own term r_t diag(u) k_t^T v_t, for [B, T, H, K] inputs."""
    weight = _sum_axis(r * k * _expand(u.expand_dims(0).expand_dims(0), r.shape), -1, keepdims=True)  # [B, T, H, 1]
    return _expand(weight, v.shape) * v


def _chunk_parts(r, k, v, w, sub_chunk_size: int, branch: str):
    """A chunk's own contribution: within-chunk output, start-state query, transition (as
    ``backends/torch/wkv.py: _chunk_parts``, where the bounded chunks' shortcut is explained)."""
    m, _, size, dk = r.shape
    flat = lambda x: x.reshape(m, size, x.shape[-1])  # noqa: E731
    decay_before = _exclusive_cumsum(flat(w), dim=-2)
    query = flat(r) * ops.exp(decay_before)
    chunk_decay = ops.exp(_sum_axis(flat(w), -2))  # [M, K]
    if branch == "auto":
        if bool(_factorisable(flat(w), decay_before).all()):
            key = flat(k) * ops.exp(-(decay_before + flat(w)))
            scores = _bmm_nt(query, key) * _tile_to(_earlier_mask(size, r.dtype).expand_dims(0), (m, size, size))
            chunk_kv = _bmm_tn(key * _expand(chunk_decay.expand_dims(1), key.shape), flat(v))
            return _bmm(scores, flat(v)), query, chunk_decay, chunk_kv
    scores = _within_chunk_scores(flat(r), flat(k), flat(w), decay_before, sub_chunk_size, branch)
    chunk_kv = _chunk_transitions(k, v, w)[1].reshape(m, dk, v.shape[-1])
    return _bmm(scores, flat(v)), query, chunk_decay, chunk_kv


def _chunked_scan(r, k, v, w, sub_chunk_size: int, branch: str):
    """The chunked scan [G, N, L, *] -> (outputs [G, N, L, V], chunk-start states [G, N, K, V] or
    None for one chunk): each group of chunk rows scored on its own, the states passed between
    chunks, then each chunk's start state read out. The groups are cut with ``split`` (autodiff
    runs through here in Graph mode: the backward of slicing is a slow strided-slice gradient,
    that of ``split`` a concat)."""
    batch, n_chunks, size, dk = r.shape
    dv = v.shape[-1]
    rows = [_rows(x) for x in (r, k, v, w)]
    groups = _row_groups(rows[0], branch)
    sizes = tuple(stop - start for start, stop in groups)
    cuts = [ops.split(x, sizes, 0) if len(groups) > 1 else (x,) for x in rows]
    parts = [_chunk_parts(*args, sub_chunk_size, branch) for args in zip(*cuts)]
    within = [p[0] for p in parts]
    if n_chunks == 1:
        return (ops.concat(within, 0) if len(parts) > 1 else within[0]).reshape(batch, 1, size, dv), None
    decays, kvs = [p[2] for p in parts], [p[3] for p in parts]
    chunk_decay = ops.concat(decays, 0) if len(parts) > 1 else decays[0]
    chunk_kv = ops.concat(kvs, 0) if len(parts) > 1 else kvs[0]
    states = _chunk_states(chunk_decay.reshape(batch, n_chunks, dk), chunk_kv.reshape(batch, n_chunks, dk, dv))
    state_rows = states.reshape(-1, dk, dv)
    state_cuts = ops.split(state_rows, sizes, 0) if len(groups) > 1 else (state_rows,)
    # each group's start-state read-out while its within-chunk part is still at hand
    out = [p[0] + _bmm(p[1], state) for p, state in zip(parts, state_cuts)]
    return (ops.concat(out, 0) if len(out) > 1 else out[0]).reshape(batch, n_chunks, size, dv), states


def _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size, branch):
    """WKV6 [B, T, H, K] -> ([B, T, H, V], the chunk-start states [G, N, K, V] or None)."""
    length, heads = r.shape[1], r.shape[2]
    r_c, k_c, v_c, u_c, chunks, layout = _prepare(r, k, v, w, u, bidirectional, chunk_size)
    scan, states = _chunked_scan(*chunks, sub_chunk_size, branch)
    return (_from_chunks(scan, layout, length, heads) + _bonus(r_c, k_c, v_c, u_c)).astype(r.dtype), states


def _factorised_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state):
    """The gradients of chunks whose decay is bounded (``_factorisable``), in closed form, no
    autodiff: ``backends/torch/wkv.py: _factorised_chunk_grads`` (its docstring gives the forward it
    inverts). ``_autograd_chunk_grads`` is its reference (tests tie the two)."""
    shapes = [x.shape for x in (r, k, v, w)]
    flat = lambda x: None if x is None else x.reshape(-1, *x.shape[-2:])  # noqa: E731
    r, k, v, w, start_state, grad_out, grad_next_state = (
        flat(x) for x in (r, k, v, w, start_state, grad_out, grad_next_state))
    size = r.shape[-2]
    earlier = _tile_to(_earlier_mask(size, r.dtype).expand_dims(0), (r.shape[0], size, size))
    decay_before = _exclusive_cumsum(w, dim=-2)
    query_decay, key_growth = ops.exp(decay_before), ops.exp(-(decay_before + w))
    query, key = r * query_decay, k * key_growth
    scores = _bmm_nt(query, key) * earlier
    grad_scores = _bmm_nt(grad_out, v) * earlier
    grad_v = _bmm_tn(scores, grad_out)
    grad_query = _bmm(grad_scores, key)
    if start_state is not None:
        grad_query = grad_query + _bmm_nt(grad_out, start_state)
    grad_key = _bmm_tn(grad_scores, query)
    grad_r, grad_k = grad_query * query_decay, grad_key * key_growth
    # d/dw_j: q_t carries w_j for t > j; p_s carries -w_j for s >= j (exact sums, no differences)
    key_term = grad_key * key
    grad_w = _reverse_exclusive_cumsum(grad_query * query - key_term, dim=-2) - key_term
    if grad_next_state is not None:
        key_decay = ops.exp(_reverse_exclusive_cumsum(w, dim=-2))
        decayed_key = k * key_decay
        grad_v = grad_v + _bmm(decayed_key, grad_next_state)
        grad_decayed_key = _bmm_nt(v, grad_next_state)
        grad_k = grad_k + grad_decayed_key * key_decay
        # (k e^A)_s carries w_j for s < j; e^(sum w) carries every w_j
        grad_chunk_decay = _sum_axis(grad_next_state * start_state, -1) * ops.exp(_sum_axis(w, -2))  # [M, K]
        grad_w = (grad_w + _exclusive_cumsum(grad_decayed_key * decayed_key, dim=-2)
                  + _expand(grad_chunk_decay.expand_dims(1), w.shape))
    return [g.reshape(shape) for g, shape in zip((grad_r, grad_k, grad_v, grad_w), shapes)]


def _autograd_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state, sub_chunk_size: int, branch: str):
    """The same gradients as ``_factorised_chunk_grads``, for any decay: ``ms.vjp`` over the
    recomputed chunks [M, 1, L, K] (``_chunk_outputs`` and, given grad_next_state, the state
    transition; their graph freed on return)."""
    if grad_next_state is None:
        _, pullback = ms.vjp(lambda *xs: _chunk_outputs(*xs, None, sub_chunk_size, branch), r, k, v, w)
        return list(pullback(grad_out))

    def outputs_and_next_state(r_p, k_p, v_p, w_p):
        out = _chunk_outputs(r_p, k_p, v_p, w_p, start_state, sub_chunk_size, branch)
        decay, kv = _chunk_transitions(k_p, v_p, w_p)
        return out, _expand(decay.expand_dims(-1), kv.shape) * start_state + kv

    _, pullback = ms.vjp(outputs_and_next_state, r, k, v, w)
    return list(pullback((grad_out, grad_next_state)))


def _local_grads(r, k, v, w, start_state, grad_out, grad_next_state, sub_chunk_size: int, branch: str):
    """The [r, k, v, w] gradients of chunk rows [M, 1, L, K] given their start states [M, 1, K, V]
    and the gradients of their outputs [M, 1, L, V] and of the states after them [M, 1, K, V]
    (both states None for a lone chunk): in closed form where a chunk's decay is bounded, by
    ``ms.vjp`` over the recomputed chunk where it is not, chosen chunk by chunk as "auto" does."""
    args = (r, k, v, w, start_state, grad_out, grad_next_state)
    if branch != "auto":
        return _autograd_chunk_grads(*args, sub_chunk_size, branch)
    flat_w = w.reshape(-1, *w.shape[-2:])
    bounded = _factorisable(flat_w, _exclusive_cumsum(flat_w, dim=-2))
    if bool(bounded.all()):
        return _factorised_chunk_grads(*args)
    if not bool(bounded.any()):
        return _autograd_chunk_grads(*args, sub_chunk_size, branch)
    fast, slow = ops.nonzero(bounded).reshape(-1), ops.nonzero(~bounded).reshape(-1)
    pick = lambda rows: [None if x is None else ops.gather(x, rows, 0) for x in args]  # noqa: E731
    parts = zip(_factorised_chunk_grads(*pick(fast)), _autograd_chunk_grads(*pick(slow), sub_chunk_size, branch))
    # torch's two index_copy calls: both parts stacked, then gathered back into row order
    order = ops.argsort(ops.concat([fast, slow], 0))
    return [ops.gather(ops.concat([a, b], 0), order, 0) for a, b in parts]


def _chunked_scan_backward(r, k, v, w, states, grad_out, sub_chunk_size: int, branch: str):
    """Gradients of ``_chunk_outputs`` (with the states it implies) for chunked [G, N, L, K] inputs.

    The state's gradient runs backwards through the chunks in closed form,
    dS_c = q_c^T dO_c + chunk_decay_c * dS_{c+1} with q = r * exp(decay_before); given it,
    chunks are independent, and each group's local gradients come from ``_local_grads``:
    exactly the gradients autodiff gives over the whole forward pass.
    The inputs carry no graph; returns the [r, k, v, w] gradients, of their shapes.
    """
    after = None  # after[c]: d loss / d (the state after chunk c); None for one chunk
    if states is not None:
        groups, n_chunks, size, dk = r.shape
        dv = v.shape[-1]
        queries = (r * ops.exp(_exclusive_cumsum(w, dim=-2))).reshape(-1, size, dk)
        reads = ops.unbind(_bmm_tn(queries, grad_out.reshape(-1, size, dv)).reshape(groups, n_chunks, dk, dv), 1)
        decays = ops.unbind(ops.exp(_sum_axis(w, -2)).expand_dims(-1), 1)  # [G, K, 1] per chunk
        del queries
        state_shape = (groups, dk, dv)
        after = [None] * n_chunks
        following = ops.zeros(state_shape, r.dtype)
        for c in range(n_chunks - 1, -1, -1):
            after[c] = following
            following = reads[c] + _expand(decays[c], state_shape) * following
        after = ops.stack(after, axis=1)
        del reads, following  # an input's size each, not needed by the recompute
    rows = [_rows(x) for x in (r, k, v, w, states, grad_out, after)]
    parts = _row_groups(rows[0])
    if len(parts) == 1:
        local = _local_grads(*rows, sub_chunk_size, branch)
    else:  # filled a group at a time, not concatenated: no second copy
        local = [ops.zeros(x.shape, x.dtype) for x in rows[:4]]
        for start, stop in parts:
            # slices (views; no gradient flows through them here)
            grads = _local_grads(*(None if x is None else x[start:stop] for x in rows), sub_chunk_size, branch)
            for full, g in zip(local, grads):
                full[start:stop] = g
    return [g.reshape(x.shape) for g, x in zip(local, (r, k, v, w))]


class _WKV6(nn.Cell):
    """WKV6 with a hand-written backward (``bprop``) that keeps only the inputs and the chunk-start
    states [G, N, K, V] (one input's size per direction at K = V = 64), returned as a second
    output: a Cell's ``bprop`` sees its inputs, outputs and output gradients, nothing else.
    Everything else (layout gathers, scores, sub-chunk keys, exponentials) is recomputed a group
    of chunks at a time in the backward pass, its gradients from ``ms.vjp`` over the recomputed
    part, so what a layer holds from its forward to its backward pass does not grow with the
    scores. First-order only (as torch's ``once_differentiable``).

    construct(r, k, v, w, u) -> ([B, T, H, V], the states, or a [1] placeholder for one chunk).

    PyNative only (``wkv6`` takes it for the eager "auto" branch). Compiled - GRAPH_MODE, or
    ``ms.jit`` under PyNative - MindSpore 2.10 fails on a ``bprop`` that calls a function with a
    Python branch which the construct calls too (here ``ops.clamp``'s own dispatch, ``_sum_axis``,
    and, with those worked around, the builtins ``max`` and ``zip``): "RuntimeError: The func
    graph is empty, func graph: ...↱clamp_170, has return: 0". A ``bprop`` cannot avoid calling
    the forward's functions, so Graph mode differentiates the forward itself.
    """

    def __init__(self, bidirectional: bool, chunk_size: int, sub_chunk_size: int, branch: str):
        super().__init__()
        self.bidirectional, self.chunk_size = bidirectional, chunk_size
        self.sub_chunk_size, self.branch = sub_chunk_size, branch

    def construct(self, r, k, v, w, u):
        out, states = _forward(r, k, v, w, u, self.bidirectional, self.chunk_size, self.sub_chunk_size, self.branch)
        if states is None:  # a single chunk starts from zero: nothing to keep
            return out, ops.zeros((1,), out.dtype)
        return out, states

    def bprop(self, r, k, v, w, u, out, dout):
        bidirectional, chunk_size = self.bidirectional, self.chunk_size
        states = out[1] if out[1].ndim == 4 else None

        def prepare(r, k, v, w, u):
            r_c, k_c, v_c, u_c, chunks, _ = _prepare(r, k, v, w, u, bidirectional, chunk_size)
            return (*chunks, _bonus(r_c, k_c, v_c, u_c))

        prepared, pullback = ms.vjp(prepare, r, k, v, w, u)
        layout = _layout(r.shape[1], r.shape[2], bidirectional)
        grad_c = dout[0].astype(prepared[-1].dtype)  # [B, T, H, V]
        chunk_grads = _chunked_scan_backward(*prepared[:4], states, _to_chunks(grad_c, layout, chunk_size),
                                             self.sub_chunk_size, self.branch)
        return pullback((*chunk_grads, grad_c))


@functools.lru_cache(maxsize=64)
def _wkv6_cell(bidirectional: bool, chunk_size: int, sub_chunk_size: int, branch: str) -> _WKV6:
    return _WKV6(bidirectional, chunk_size, sub_chunk_size, branch)


def wkv6(r, k, v, w, u, bidirectional: bool = False,
         chunk_size: int = CHUNK_SIZE, sub_chunk_size: int = SUB_CHUNK_SIZE, branch: str = "auto"):
    """Chunked-parallel WKV6; same arguments and result as ``wkv6_reference``.

    ``branch``: "auto" (data-dependent, PyNative only; the hand-written backward of ``_WKV6``) or
    "safe" (compiles in Graph mode; autodiff through the forward).
    """
    if chunk_size % sub_chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of sub_chunk_size {sub_chunk_size}")
    if branch not in BRANCHES:
        raise ValueError(f"branch '{branch}': allowed {', '.join(BRANCHES)}")
    # A sequence shorter than a chunk is padded only to whole sub-chunks (16 tokens of a
    # 4x4 grid would otherwise be computed as 64).
    chunk_size = min(chunk_size, -(-r.shape[1] // sub_chunk_size) * sub_chunk_size)
    if branch == "auto":  # eager PyNative ("auto" cannot compile): the hand-written backward of _WKV6
        return _wkv6_cell(bidirectional, chunk_size, sub_chunk_size, branch)(r, k, v, w, u)[0]
    return _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size, branch)[0]
