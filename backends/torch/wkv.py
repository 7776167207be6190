"""WKV6, the RWKV-6 ("Finch") linear-attention recurrence, in PyTorch.

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

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
# Largest |exponent| a factorised product may carry: exp(30) ~ 1e13 keeps fp32 far from
# overflow and its reciprocal far from the denormals.
MIN_SUB_CHUNK_SIZE = 2  # below this a chunk is scored pair by pair
LOG_DECAY_FLOOR = -1e4
MAX_FACTORISED_EXPONENT = {torch.float32: 30.0, torch.float64: 300.0}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flip_time(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


# ---- reference ----------------------------------------------------------------------
def _scan_reference(r, k, v, w, u):
    batch, length, heads, _ = r.shape
    state = r.new_zeros(batch, heads, r.shape[-1], v.shape[-1])
    outputs = []
    for t in range(length):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outputs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], state + u[None, :, :, None] * kv))
        state = torch.exp(w[:, t])[..., None] * state + kv
    return torch.stack(outputs, dim=1)


def wkv6_reference(r, k, v, w, u, bidirectional: bool = False):
    """The sequential recurrence, one token at a time. Returns [B, T, H, K]."""
    dtype = r.dtype
    r, k, v, w, u = (x.to(_compute_dtype(dtype)) for x in (r, k, v, w, u))
    out = _scan_reference(r, k, v, w, u)
    if bidirectional:
        flipped = [_flip_time(x) for x in (r, k, v, w)]
        out = out + _flip_time(_scan_reference(*flipped, torch.zeros_like(u)))
    return out.to(dtype)


# ---- chunked ------------------------------------------------------------------------
def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{j < i} x_j along ``dim`` (exact: no subtraction of an inclusive sum)."""
    shifted = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.shape[dim] - 1)], dim)
    return torch.cumsum(shifted, dim)


def _reverse_exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{j > i} x_j along ``dim``."""
    return _exclusive_cumsum(x.flip(dim), dim).flip(dim)


def _pairwise_scores(r, k, w):
    """Each (t, s) pair with its own exponent: exact for any decay, costs S*K per token.

    The exponent w_{s+1} + ... + w_{t-1} is summed directly (a 0/1 matrix times w), not
    taken as a difference of cumulative sums, so a strong decay early in the sub-chunk
    cannot cancel away the precision of the mild ones after it.
    """
    size = r.shape[-2]
    idx = torch.arange(size, device=r.device)
    between = (idx[None, :, None] < idx[None, None, :]) & (idx[None, None, :] < idx[:, None, None])  # [t, s, m]
    exponent = torch.einsum("tsm,...mk->...tsk", between.to(w.dtype), w)  # <= 0
    scores = (r[..., :, None, :] * k[..., None, :, :] * torch.exp(exponent)).sum(-1)
    return scores * torch.ones(size, size, dtype=r.dtype, device=r.device).tril(-1)


def _bounded(chunk_total):
    """Per chunk [...]: True where exp(-chunk_total), the chunk's log-decay summed [..., K], stays below
    exp(MAX_FACTORISED_EXPONENT) in every channel."""
    return (-chunk_total.detach()).amax(dim=-1) <= MAX_FACTORISED_EXPONENT[chunk_total.dtype]


def _factorisable(w, decay_before):
    """Per chunk [...]: True where exp(sum of |w| over the chunk) stays below exp(MAX_FACTORISED_EXPONENT)."""
    return _bounded(decay_before[..., -1, :] + w[..., -1, :])


def _factorised_scores(r, k, w, decay_before):
    """exp(B_{t-1} - B_s) = exp(B_{t-1}) exp(-B_s): one matmul, safe while the span is bounded."""
    size = r.shape[-2]
    earlier = torch.ones(size, size, dtype=r.dtype, device=r.device).tril(-1)
    return ((r * torch.exp(decay_before)) @ (k * torch.exp(-(decay_before + w))).transpose(-1, -2)) * earlier


def _within_chunk_scores(r, k, w, decay_before, sub_chunk_size: int):
    """scores[t, s] = sum_k r_t k_s exp(w_{s+1} + ... + w_{t-1}) for s < t, else 0.

    r, k, w: [..., L, K]; ``decay_before`` is the exclusive cumsum of w along L.
    Returns [..., L, L]. The choice between the fast factorised form and the exact
    split is made chunk by chunk, so one strongly decaying chunk does not slow the rest.
    """
    size = r.shape[-2]
    bounded = _factorisable(w, decay_before)
    if bool(bounded.all()):
        return _factorised_scores(r, k, w, decay_before)
    if bool(bounded.any()):
        lead = r.shape[:-2]
        r_f, k_f, w_f, before_f = (x.reshape(-1, *x.shape[-2:]) for x in (r, k, w, decay_before))
        fast, slow = bounded.reshape(-1).nonzero().squeeze(1), (~bounded).reshape(-1).nonzero().squeeze(1)
        scores = r_f.new_zeros(r_f.shape[0], size, size)
        scores = scores.index_copy(0, fast, _factorised_scores(r_f[fast], k_f[fast], w_f[fast], before_f[fast]))
        scores = scores.index_copy(0, slow, _within_chunk_scores(r_f[slow], k_f[slow], w_f[slow], before_f[slow],
                                                                 sub_chunk_size))
        return scores.reshape(*lead, size, size)
    if size <= sub_chunk_size or sub_chunk_size < MIN_SUB_CHUNK_SIZE:
        return _pairwise_scores(r, k, w)
    # Split into sub-chunks. A key in an earlier sub-chunk is scaled by the decay from it to
    # the query's sub-chunk start, the query by the decay from that start: both exponents <= 0.
    lead = r.shape[:-2]
    n_sub, dk = size // sub_chunk_size, r.shape[-1]
    r_s, k_s, w_s = (x.reshape(*lead, n_sub, sub_chunk_size, dk) for x in (r, k, w))
    local_before = _exclusive_cumsum(w_s, dim=-2)
    local_after = _reverse_exclusive_cumsum(w_s, dim=-2)
    idx = torch.arange(n_sub, device=r.device)
    # strictly_between[i, j, m] = j < m < i: whole sub-chunks between key sub-chunk j and query i
    strictly_between = (idx[None, :, None] < idx[None, None, :]) & (idx[None, None, :] < idx[:, None, None])
    gap = torch.einsum("ijm,...mk->...ijk", strictly_between.to(w.dtype), w_s.sum(dim=-2))  # [..., i, j, K]
    keys = k_s.unsqueeze(-4) * torch.exp(local_after.unsqueeze(-4) + gap.unsqueeze(-2))  # [..., i, j, S, K]
    keys = keys.reshape(*lead, n_sub, size, dk)
    scores = (r_s * torch.exp(local_before)) @ keys.transpose(-1, -2)  # [..., i, S, L]
    scores = scores.reshape(*lead, n_sub, sub_chunk_size, n_sub, sub_chunk_size)
    earlier_sub = (idx[None, :] < idx[:, None]).to(r.dtype)  # key sub-chunk j < query sub-chunk i
    scores = scores * earlier_sub[:, None, :, None]
    # Each sub-chunk again: factorised if it can be, else split four ways, down to pairwise.
    diag = _within_chunk_scores(r_s, k_s, w_s, local_before, sub_chunk_size // 4)  # [..., n, S, S]
    eye = torch.eye(n_sub, dtype=r.dtype, device=r.device)
    scores = scores + diag.unsqueeze(-2) * eye[:, None, :, None]
    return scores.reshape(*lead, size, size)


def _chunk_transitions(k, v, w):
    """What each chunk does to the state: S_next = chunk_decay * S + chunk_kv.

    k, v, w: [..., N, L, K]. Returns chunk_decay [..., N, K] and chunk_kv [..., N, K, V].
    """
    decay_after = _reverse_exclusive_cumsum(w, dim=-2)  # w summed from s+1 to chunk end, <= 0
    return torch.exp(w.sum(dim=-2)), (k * torch.exp(decay_after)).transpose(-1, -2) @ v


def _chunk_states(chunk_decay, chunk_kv):
    """The state at each chunk's start [..., N, K, V], from a short loop over chunks; None for a
    single chunk (its start state is zero)."""
    if chunk_kv.shape[-3] == 1:
        return None
    state = torch.zeros_like(chunk_kv[..., 0, :, :])
    states = []
    # unbind once: indexing chunk c inside the loop would make a backward pass build a
    # full-size gradient per chunk, O(T^2) in all
    for decay, kv in zip(chunk_decay.unsqueeze(-1).unbind(-3), chunk_kv.unbind(-3)):
        states.append(state)
        state = torch.addcmul(kv, decay, state)  # decay * state + kv in one pass
    return torch.stack(states, dim=-3)


def _chunk_outputs(r, k, v, w, states, sub_chunk_size: int):
    """Each chunk's output given the state at its start: within-chunk scores times v plus the
    state read out through the decay from the chunk start. [..., N, L, *] -> [..., N, L, V]."""
    decay_before = _exclusive_cumsum(w, dim=-2)  # w summed from chunk start to t-1, <= 0
    scores = _within_chunk_scores(r, k, w, decay_before, sub_chunk_size)  # [..., N, L, L]
    if states is None:
        return scores @ v
    return scores @ v + (r * torch.exp(decay_before)) @ states


# Chunks are gathered, scored (and, in the backward pass, recomputed) in spans of about this many
# input elements (``_spans``): the scores, sub-chunk keys and exponentials are several times the
# inputs' size, so the span bounds that working memory whatever the sequence length. A span is
# 1 MB of fp32 per input, so the dozens of
# elementwise passes of its backward run from the caches: with 16 MB groups (1 << 22) WKV6's
# forward+backward (6 heads of 64, bidirectional, 2-core EPYC) took about twice as long: 256 against
# 132 ms at 256 tokens and batch 16, 249 against 109 ms at 4096 tokens.
GROUP_ELEMENTS = 1 << 18


def _spans(batch: int, n_chunks: int, chunk_elements: int):
    """What to gather at a time: (batch slice, first chunk, end chunk) spans of about
    GROUP_ELEMENTS input elements, ``chunk_elements`` (H·L·K) being one batch element's chunk.
    Runs of whole chunks while a chunk of the whole batch fits; otherwise a chunk of part of the
    batch."""
    per_batch = max(1, GROUP_ELEMENTS // max(1, chunk_elements))
    if per_batch < batch:
        return [(slice(b, min(b + per_batch, batch)), c, c + 1) for c in range(n_chunks) for b in range(0, batch, per_batch)]
    per_span = per_batch // batch
    return [(slice(None), c, min(c + per_span, n_chunks)) for c in range(0, n_chunks, per_span)]


def _factorised_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state):
    """The gradients of chunks whose decay is bounded (``_factorisable``), in closed form: the
    factorised forward's products run backwards, with no autograd graph and no recomputed scores
    beyond one matmul. ``_autograd_chunk_grads`` is its reference (tests tie the two).

    r, k, w [..., L, K], v and grad_out [..., L, V]; start_state and grad_next_state [..., K, V],
    or both None for a lone chunk (zero start state, next state unused). With B the exclusive
    cumulative sum of w from the chunk start and A the reverse one to its end, the forward is
        q = r e^B,  p = k e^-(B + w),  scores = (q p^T) * earlier,  out = scores v + q S,
        S_next = e^(sum w) S + (k e^A)^T v,
    so every exponent a gradient meets is one the forward already bounded.
    """
    size = r.shape[-2]
    earlier = torch.ones(size, size, dtype=r.dtype, device=r.device).tril(-1)
    decay_before = _exclusive_cumsum(w, dim=-2)
    query_decay, key_growth = torch.exp(decay_before), torch.exp(-(decay_before + w))
    query, key = r * query_decay, k * key_growth
    scores = (query @ key.transpose(-1, -2)) * earlier
    grad_scores = (grad_out @ v.transpose(-1, -2)) * earlier
    grad_v = scores.transpose(-1, -2) @ grad_out
    grad_query = grad_scores @ key
    if start_state is not None:
        grad_query = grad_query + grad_out @ start_state.transpose(-1, -2)
    grad_key = grad_scores.transpose(-1, -2) @ query
    grad_r, grad_k = grad_query * query_decay, grad_key * key_growth
    # d/dw_j: q_t carries w_j for t > j; p_s carries -w_j for s >= j (exact sums, no differences)
    key_term = grad_key * key
    grad_w = _reverse_exclusive_cumsum(grad_query * query - key_term, dim=-2) - key_term
    if grad_next_state is not None:
        key_decay = torch.exp(_reverse_exclusive_cumsum(w, dim=-2))
        decayed_key = k * key_decay
        grad_v = grad_v + decayed_key @ grad_next_state
        grad_decayed_key = v @ grad_next_state.transpose(-1, -2)
        grad_k = grad_k + grad_decayed_key * key_decay
        # (k e^A)_s carries w_j for s < j; e^(sum w) carries every w_j
        grad_chunk_decay = (grad_next_state * start_state).sum(-1) * torch.exp(w.sum(dim=-2))  # [..., K]
        grad_w = grad_w + _exclusive_cumsum(grad_decayed_key * decayed_key, dim=-2) + grad_chunk_decay.unsqueeze(-2)
    return grad_r, grad_k, grad_v, grad_w


def _autograd_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state, sub_chunk_size: int):
    """The same gradients as ``_factorised_chunk_grads``, for any decay: autograd over the
    recomputed chunks (``_chunk_outputs`` and, given grad_next_state, the state transition)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (r, k, v, w)]
        out = _chunk_outputs(*leaves, start_state, sub_chunk_size)
        if grad_next_state is None:
            return torch.autograd.grad(out, leaves, grad_out)
        decay, kv = _chunk_transitions(*leaves[1:])
        next_state = decay.unsqueeze(-1) * start_state + kv
        return torch.autograd.grad((out, next_state), leaves, (grad_out, grad_next_state))


def _local_grads(r, k, v, w, start_state, grad_out, grad_next_state, sub_chunk_size: int):
    """Chunk-local gradients [..., N, L, *], in closed form where a chunk's decay is bounded and by
    autograd over the recomputed chunk where it is not, chosen chunk by chunk as the forward does."""
    bounded = _factorisable(w, _exclusive_cumsum(w, dim=-2))
    if bool(bounded.all()):
        return _factorised_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state)
    if not bool(bounded.any()):
        return _autograd_chunk_grads(r, k, v, w, start_state, grad_out, grad_next_state, sub_chunk_size)
    flat = [None if x is None else x.reshape(-1, *x.shape[-2:])
            for x in (r, k, v, w, start_state, grad_out, grad_next_state)]
    fast, slow = bounded.reshape(-1).nonzero().squeeze(1), (~bounded).reshape(-1).nonzero().squeeze(1)
    grads = [torch.empty_like(x) for x in flat[:4]]
    for rows, local in ((fast, _factorised_chunk_grads), (slow, _autograd_chunk_grads)):
        picked = [None if x is None else x.index_select(0, rows) for x in flat]
        extra = () if local is _factorised_chunk_grads else (sub_chunk_size,)
        for full, g in zip(grads, local(*picked, *extra)):
            full.index_copy_(0, rows, g)
    return [g.reshape(x.shape) for g, x in zip(grads, (r, k, v, w))]


def _chunk_view(x, reverse: bool, chunk_size: int):
    """[B, T, H, X] -> a [B, H, N, L, X] view of x's chunks (no copy when T is a multiple of L;
    otherwise zero-padded at the end, or for the reverse direction at the front, so that the
    reversed sequence ends in the padding)."""
    pad = (-x.shape[1]) % chunk_size
    x = x.contiguous()
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0) if reverse else (0, 0, 0, 0, 0, pad))
    b, t, h, c = x.shape
    return x.view(b, t // chunk_size, chunk_size, h, c).permute(0, 3, 1, 2, 4)


# Inputs of at most this many elements (both directions counted) take the small path: laid out in
# chunks once, both directions in one pass (``_both_directions``), their chunk-start states kept
# for the backward pass. At these sizes the copies and the memory cost less than gathering and
# recomputing; larger inputs stream a span at a time, a direction at a time, and recompute the
# states (the memory at 16384 tokens is what that buys).
KEEP_GATHERED_ELEMENTS = 1 << 22


def _small(r, bidirectional: bool) -> bool:
    """Whether inputs like r [B, T, H, K] take the small path (both directions counted)."""
    return r.numel() * (2 if bidirectional else 1) <= KEEP_GATHERED_ELEMENTS


def _both_directions(x, bidirectional: bool, chunk_size: int, compute):
    """Small inputs' layout: [B, T, H, X] -> contiguous [B', H, N, L, X] chunks of x in the compute
    dtype, with x reversed in time appended along the batch (B' = 2B) when bidirectional, so one
    pass scans both directions; zero-padded at the end to whole chunks."""
    x = x.to(compute).transpose(1, 2)  # [B, H, T, X]
    x = torch.cat([x, x.flip(2)]) if bidirectional else x.contiguous()
    pad = (-x.shape[2]) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(x.shape[0], x.shape[1], -1, chunk_size, x.shape[-1])


def _fold_directions(x, batch: int, length: int):
    """The adjoint of ``_both_directions``: [B', H, N, L, X] -> [B, T, H, X], the directions summed."""
    x = x.view(x.shape[0], x.shape[1], -1, x.shape[-1])[:, :, :length]
    if x.shape[0] > batch:
        x = x[:batch] + x[batch:].flip(2)
    return x.transpose(1, 2)


class _DirectionChunks:
    """A pass's chunks as [M, L, X] rows, a span at a time, and the tensors kept in its chunk order.

    ``whole`` (the small path): the views are contiguous [B', H, N, L, X] layouts
    (``_both_directions``), and a span is a slice of about GROUP_ELEMENTS of their B'·H·N rows,
    across batch, heads and chunks; reading and writing are views. Otherwise the views are
    ``_chunk_view``s of [B, T, H, X] tensors in the original token order, a span is (batch slice,
    first chunk, end chunk) of ``_spans``, and each read gathers a copy of the span; the reverse
    direction's chunk c is the original chunk N-1-c with its tokens flipped. Tensors kept in the
    pass's chunk order, [B, H, N, ...], are read and written through ``part`` and ``put``.
    """

    def __init__(self, reverse: bool, view, compute, whole: bool):
        self.reverse, self.compute, self.whole = reverse, compute, whole
        self.batch, self.heads, self.n_chunks, size, width = view.shape
        if whole:
            rows = self.batch * self.heads * self.n_chunks
            per = max(1, GROUP_ELEMENTS // (size * width))
            self.spans = [slice(start, min(start + per, rows)) for start in range(0, rows, per)]
        else:
            self.spans = _spans(self.batch, self.n_chunks, self.heads * size * width)

    def rows(self, view, span):
        """The span's rows [M, L, X] of an input view, in the compute dtype."""
        if self.whole:
            return view.view(-1, *view.shape[-2:])[span]
        batch, start, end = span
        if self.reverse:
            part = view[batch, :, self.n_chunks - end:self.n_chunks - start].flip(2, 3)
        else:
            part = view[batch, :, start:end]
        return part.to(self.compute).reshape(-1, *part.shape[-2:])

    def part(self, x, span):
        """The span's rows of a [B, H, N, ...] tensor in the pass's order (None stays None)."""
        if x is None:
            return None
        if self.whole:
            return x.reshape(-1, *x.shape[3:])[span]
        batch, start, end = span
        return x[batch, :, start:end].reshape(-1, *x.shape[3:])

    def put(self, x, span, rows):
        """Writes the span's rows into a [B, H, N, ...] tensor in the pass's order."""
        if self.whole:
            x.view(-1, *x.shape[3:])[span] = rows
        else:
            batch, start, end = span
            target = x[batch, :, start:end]
            target.copy_(rows.view(target.shape))

    def add(self, total_view, span, rows, first: bool = False):
        """total_view's part of the span += rows [M, L, X] (= when ``first``)."""
        if self.whole:
            target = total_view.view(-1, *rows.shape[-2:])[span]
        else:
            batch, start, end = span
            target = total_view[batch, :, self.n_chunks - end:self.n_chunks - start] if self.reverse else \
                total_view[batch, :, start:end]
            rows = rows.view(target.shape)
            if self.reverse:
                rows = rows.flip(2, 3)
        if first:
            target.copy_(rows)
        else:
            target += rows


def _chunked_scan_backward(views, totals, reverse: bool, sub_chunk_size: int, first: bool = False, states=None,
                           whole: bool = False):
    """One direction's gradients of the chunked scan, added into ``totals``.

    views: r, k, v, w, grad_out as [B, H, N, L, X] chunk views (``_chunk_view``); totals: r, k, v,
    w gradient views of the same layout, in the compute dtype; ``first``: overwrite them instead;
    states: the forward's chunk-start states [B, H, N, K, V] where it kept them (small inputs).

    A first pass over spans of chunks (``_spans``) recomputes each chunk's transition (unless the
    states were kept) and what its outputs ask of its start state; the states then run
    forwards through the chunks and their gradients backwards, in closed form:
    dS_c = q_c^T dO_c + chunk_decay_c * dS_{c+1} with q = r * exp(decay_before). Given both, chunks
    are independent: a second pass differentiates each span (``_local_grads``) and adds it in. The
    working memory is the accumulated gradients, the states and their gradients, and one span:
    exactly the gradients autograd gives over the whole forward pass.
    """
    r, k, v, w, grad_out = views
    b, h, n_chunks, size, dk = r.shape
    chunks = _DirectionChunks(reverse, r, totals[0].dtype, whole)

    def decays(span):
        return chunks.rows(w, span).clamp(min=LOG_DECAY_FLOOR)  # see _chunked_scan

    after = None  # the state's gradient after chunk c; None for one chunk
    if n_chunks > 1:
        read_grad = torch.empty(b, h, n_chunks, dk, v.shape[-1], dtype=totals[0].dtype, device=r.device)
        chunk_kv = None if states is not None else torch.empty_like(read_grad)
        chunk_decay = torch.empty(b, h, n_chunks, dk, dtype=read_grad.dtype, device=r.device)
        for span in chunks.spans:
            w_rows = decays(span)
            query = chunks.rows(r, span) * torch.exp(_exclusive_cumsum(w_rows, dim=-2))
            chunks.put(read_grad, span, query.transpose(-1, -2) @ chunks.rows(grad_out, span))
            if chunk_kv is None:
                chunks.put(chunk_decay, span, torch.exp(w_rows.sum(dim=-2)))
            else:
                decay, kv = _chunk_transitions(chunks.rows(k, span), chunks.rows(v, span), w_rows)
                chunks.put(chunk_decay, span, decay)
                chunks.put(chunk_kv, span, kv)
        if chunk_kv is not None:
            states = _chunk_states(chunk_decay, chunk_kv)
            del chunk_kv
        after = [None] * n_chunks
        following = torch.zeros_like(read_grad[:, :, 0])
        for c, (read, decay) in reversed(list(enumerate(zip(read_grad.unbind(2), chunk_decay.unsqueeze(-1).unbind(2))))):
            after[c] = following
            following = read + decay * following
        after = torch.stack(after, dim=2)
        del read_grad
    for span in chunks.spans:
        local = _local_grads(chunks.rows(r, span), chunks.rows(k, span), chunks.rows(v, span), decays(span),
                             chunks.part(states, span), chunks.rows(grad_out, span), chunks.part(after, span),
                             sub_chunk_size)
        for total, grad in zip(totals, local):
            chunks.add(total, span, grad, first)


def _chunk_parts(r, k, v, w, sub_chunk_size: int, bonus=None, kv_out=None):
    """What a chunk contributes on its own, for chunk rows [M, L, K]: the within-chunk output
    [M, L, V] (with the bonus r_t diag(u) k_t^T v_t when ``bonus``, u per row [M, 1, K], is given),
    the query that reads the start state (r e^B) [M, L, K], and the chunk's transition
    (chunk_decay [M, K], chunk_kv [M, K, V]).

    Rows whose decay is bounded (``_factorisable``) take one cumulative sum C = B + w and one
    exponential: the keys are k e^-C, the queries r e^B = r / e^-C shifted by one token (every
    e^-C is at most e^MAX_FACTORISED_EXPONENT, so the division is exact to rounding), and the
    transition's decayed keys k e^A are the keys times e^(sum w). Other rows take the exact split
    (``_within_chunk_scores``) and the exact transition, over w floored at LOG_DECAY_FLOOR (w may hold
    -inf: a bounded chunk holds none, so only this path needs the floor). ``kv_out`` [M, K, V], if
    given, receives chunk_kv. Intermediates are updated in place where nothing reads them again: at
    these sizes each fresh tensor costs about as much as the pass that fills it."""
    total = torch.cumsum(w, dim=-2)  # C_t = w_0 + ... + w_t, <= 0
    chunk_decay = torch.exp(total[..., -1, :])  # [M, K]
    size = r.shape[-2]
    if bool(_bounded(total[..., -1, :]).all()):
        growth = total.neg_().exp_()  # e^-C, in place: C is not needed again
        key = k * growth
        query = torch.empty_like(r)
        query[..., 0, :] = r[..., 0, :]
        torch.div(r[..., 1:, :], growth[..., :-1, :], out=query[..., 1:, :])
        del growth, total
        scores = torch.bmm(query, key.transpose(-1, -2)).mul_(torch.ones(size, size, dtype=r.dtype, device=r.device).tril(-1))
        chunk_kv = torch.bmm(key.mul_(chunk_decay.unsqueeze(-2)).transpose(-1, -2), v, out=kv_out)
        del key
    else:
        w = w.clamp(min=LOG_DECAY_FLOOR)
        decay_before = _exclusive_cumsum(w, dim=-2)
        query = r * torch.exp(decay_before)
        scores = _within_chunk_scores(r, k, w, decay_before, sub_chunk_size)
        chunk_kv = _chunk_transitions(k, v, w)[1]
    if bonus is not None:  # the current token's own term, on the scores' diagonal (zero until now)
        scores.diagonal(dim1=-2, dim2=-1).copy_(torch.bmm(r * k, bonus.transpose(-1, -2)).squeeze(-1))
    return scores @ v, query, chunk_decay, chunk_kv


def _chunked_scan(views, total, reverse: bool, sub_chunk_size: int, first: bool = False, whole: bool = False,
                  bonus=None):
    """One direction of the chunked scan, added into ``total``.

    views: r, k, v, w as [B, H, N, L, X] chunk views (``_chunk_view``); total: the output's
    [B, H, N, L, V] view in the compute dtype (overwritten when ``first``, as the ``whole`` layout of
    small inputs always is: their one pass writes it); bonus: u per chunk in
    the pass's order [B, H, N, 1, K] (zero rows for a reverse direction laid out beside the
    forward one), or None for no bonus. Returns the
    chunk-start states [B, H, N, K, V] (None for one chunk). Two passes over spans of chunks
    (``_spans``): the first adds each chunk's own output and keeps its transition, the states are
    passed between chunks, the second adds each chunk's start state read out through r e^B. The
    working memory is the transitions, the states and one span, whatever the sequence length;
    small inputs (``KEEP_GATHERED_ELEMENTS``) keep their spans' gathers and outputs between the
    passes instead of recomputing them.
    """
    r, k, v, w = views
    b, h, n_chunks, size, dk = r.shape
    chunks = _DirectionChunks(reverse, r, total.dtype, whole)

    def decays(span):
        # exp(-1e4) is exactly 0 in fp32 and fp64, and every exponent is a sum of log-decays
        # <= 0, so the floor changes no value or gradient; it keeps -inf out of the sums.
        return chunks.rows(w, span).clamp(min=LOG_DECAY_FLOOR)

    chunk_decay = chunk_kv = None
    if n_chunks > 1:
        chunk_kv = r.new_empty(b, h, n_chunks, dk, v.shape[-1], dtype=total.dtype)
        chunk_decay = r.new_empty(b, h, n_chunks, dk, dtype=total.dtype)
    kept = [] if chunks.whole and n_chunks > 1 else None  # small: each span's own output and query
    for span in chunks.spans:
        # the whole layout: the span's transitions are a block of chunk_kv's rows, written in place
        kv_out = chunk_kv.view(-1, *chunk_kv.shape[-2:])[span] if chunks.whole and chunk_kv is not None else None
        within, query, decay, kv = _chunk_parts(chunks.rows(r, span), chunks.rows(k, span), chunks.rows(v, span),
                                                chunks.rows(w, span), sub_chunk_size, chunks.part(bonus, span), kv_out)
        if kept is None:
            chunks.add(total, span, within, first)
        else:
            kept.append((within, query))
        if n_chunks > 1:
            if kv is not kv_out:
                chunks.put(chunk_kv, span, kv)
            chunks.put(chunk_decay, span, decay)
    if n_chunks == 1:
            return None
    states = _chunk_states(chunk_decay, chunk_kv)
    del chunk_kv
    for i, span in enumerate(chunks.spans):
        if kept is None:
            query = chunks.rows(r, span) * torch.exp(_exclusive_cumsum(decays(span), dim=-2))
            chunks.add(total, span, query @ chunks.part(states, span))
        else:
            within, query = kept[i]  # the whole layout: the span is a block of total's rows, overwritten
            torch.baddbmm(within, query, chunks.part(states, span), out=total.view(-1, *within.shape[-2:])[span])
    return states


def _bonus_rows(u, batch: int, heads: int, n_chunks: int, forward_batch: int):
    """u [H, K] per chunk of a pass, [batch, H, N, 1, K]: the first ``forward_batch`` batch rows
    carry it (the forward direction), the rest (a reverse direction laid out beside it) are zero."""
    rows = u.new_zeros(batch, heads, n_chunks, 1, u.shape[-1])
    rows[:forward_batch] = u[None, :, None, None, :]
    return rows


def _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size):
    """WKV6 [B, T, H, K] -> ([B, T, H, V], the chunk-start states of each pass, or None): one
    direction at a time (or, small, both in one pass), summed; the bonus is the forward pass's
    score diagonal (``_chunk_parts``)."""
    compute = _compute_dtype(r.dtype)
    batch, length, heads = r.shape[:3]
    pad = (-length) % chunk_size
    if _small(r, bidirectional):
        # small: both directions in one pass over [x, x reversed] along the batch (half the
        # sequential steps), laid out in chunks once; the copies cost nothing worth saving here
        views = [_both_directions(x, bidirectional, chunk_size, compute) for x in (r, k, v, w)]
        total = torch.empty(*views[2].shape, dtype=compute, device=r.device)
        bonus = _bonus_rows(u.to(compute), *views[0].shape[:3], batch)
        states = [_chunked_scan(views, total, False, sub_chunk_size, first=True, whole=True, bonus=bonus)]
        out = _fold_directions(total, batch, length)
    else:
        out = torch.empty(batch, length + pad, heads, v.shape[-1], dtype=compute, device=r.device)
        states = []
        for reverse in (False, True) if bidirectional else (False,):
            # the reverse direction adds into the output, unless padding lays its chunks out otherwise
            own = reverse and pad > 0
            total = torch.empty_like(out) if own else out
            views = [_chunk_view(x, reverse, chunk_size) for x in (r, k, v, w)]
            bonus = None if reverse else _bonus_rows(u.to(compute), batch, heads, views[0].shape[2], batch)
            states.append(_chunked_scan(views, _chunk_view(total, False, chunk_size), reverse, sub_chunk_size,
                                        first=own or not reverse, bonus=bonus))
            if own:
                out[:, :length] += total[:, pad:]
            del views, total
        out = out[:, :length]
    return out.to(r.dtype), states


class _WKV6(torch.autograd.Function):
    """WKV6 with a hand-written backward that keeps only the inputs (and, for small inputs, the
    chunk-start states). Everything else (layout copies, scores, sub-chunk keys, exponentials) is
    recomputed a span of chunks at a time in the backward pass, so its memory does not grow with
    the sequence. Past KEEP_GATHERED_ELEMENTS the states (one input's size a direction at
    K = V = 64) are recomputed too: one more batched product than keeping them."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size):
        out, states = _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size)
        keep = _small(r, bidirectional) and states[0] is not None  # as _forward
        ctx.save_for_backward(r, k, v, w, u, *(states if keep else ()))
        ctx.options = (bidirectional, chunk_size, sub_chunk_size)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        bidirectional, chunk_size, sub_chunk_size = ctx.options
        r, k, v, w, u, *states = ctx.saved_tensors
        compute = _compute_dtype(r.dtype)
        length = r.shape[1]
        pad = (-length) % chunk_size
        kept = states[0] if states else None
        if _small(r, bidirectional):  # as _forward: both directions in one pass
            views = [_both_directions(x, bidirectional, chunk_size, compute) for x in (r, k, v, w, grad_out)]
            totals = [torch.empty_like(x) for x in views[:4]]
            _chunked_scan_backward(views, totals, False, sub_chunk_size, first=True, states=kept, whole=True)
            del views
            grads = [_fold_directions(t, r.shape[0], length) for t in totals]
            del totals
        else:
            grads = [torch.empty(x.shape[0], length + pad, *x.shape[2:], dtype=compute, device=x.device)
                     for x in (r, k, v, w)]  # r, k, v, w gradients in the forward direction's padded layout
            # One direction at a time, each a span of chunks at a time (_chunked_scan_backward): the
            # working memory is the gradients being summed and one direction's states.
            for reverse in (False, True) if bidirectional else (False,):  # the states were not kept: recomputed
                own = reverse and pad > 0  # padding lays the reverse direction's chunks out otherwise
                totals = [torch.empty_like(g) for g in grads] if own else grads
                views = [_chunk_view(x, reverse, chunk_size) for x in (r, k, v, w, grad_out)]
                _chunked_scan_backward(views, [_chunk_view(t, False, chunk_size) for t in totals], reverse,
                                       sub_chunk_size, first=own or not reverse)
                if own:
                    for g, t in zip(grads, totals):
                        g[:, :length] += t[:, pad:]  # the padding's own gradients dropped
                del views, totals
            grads = [g[:, :length] for g in grads]
        grad_r, grad_k, grad_v, grad_w = grads
        r_c, k_c, v_c, grad_c, u_c = (x.to(compute) for x in (r, k, v, grad_out, u))
        # the bonus r_t diag(u) k_t^T v_t = (sum over K of r u k) v_t
        grad_v += grad_c * (r_c * u_c * k_c).sum(-1, keepdim=True)
        grad_score = (grad_c * v_c).sum(-1, keepdim=True)  # [B, T, H, 1]
        grad_r += grad_score * u_c * k_c
        grad_k += grad_score * u_c * r_c
        grad_u = (grad_score * r_c * k_c).sum(dim=(0, 1))
        grad_w *= w >= LOG_DECAY_FLOOR  # the floor's own gradient (it changes no value, see _forward)
        return (*(g.to(x.dtype) for g, x in zip(grads, (r, k, v, w))), grad_u.to(u.dtype), None, None, None)


def wkv6(r, k, v, w, u, bidirectional: bool = False,
         chunk_size: int = CHUNK_SIZE, sub_chunk_size: int = SUB_CHUNK_SIZE):
    """Chunked-parallel WKV6; same arguments and result as ``wkv6_reference``."""
    if chunk_size % sub_chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of sub_chunk_size {sub_chunk_size}")
    # A sequence shorter than a chunk is padded only to whole sub-chunks (16 tokens of a
    # 4x4 grid would otherwise be computed as 64).
    chunk_size = min(chunk_size, -(-r.shape[1] // sub_chunk_size) * sub_chunk_size)
    with torch.autocast(r.device.type, enabled=False):  # the state stays fp32 under bf16 autocast
        if torch.is_grad_enabled() and any(x.requires_grad for x in (r, k, v, w, u)):
            return _WKV6.apply(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size)
        return _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size)[0]


# ---- flash-linear-attention ---------------------------------------------------------
def fla_installed() -> bool:
    """flash-linear-attention importable (its Triton kernels then need a CUDA device)."""
    import importlib.util

    return importlib.util.find_spec("fla") is not None


def _fla_chunk_rwkv6():
    from fla.ops.rwkv6 import chunk_rwkv6

    return chunk_rwkv6


def wkv6_fla(r, k, v, w, u, bidirectional: bool = False, chunk_rwkv6=None):
    """WKV6 through flash-linear-attention's fused ``chunk_rwkv6`` (Triton, CUDA); same arguments
    and result as ``wkv6_reference``.

    fla's conventions, minded here: its ``scale`` defaults to K^-0.5 (RWKV-6 has none, so 1.0);
    its ``w`` is the log-decay, as ours; it is causal only, so the bidirectional form is a
    second causal call over the reversed sequence without the bonus (u = 0), flipped back.
    fla keeps its state in fp32. ``chunk_rwkv6`` replaces fla's function (tests).
    """
    chunk_rwkv6 = chunk_rwkv6 or _fla_chunk_rwkv6()
    out, _ = chunk_rwkv6(r, k, v, w, u, scale=1.0, initial_state=None, output_final_state=False)
    if bidirectional:
        flipped = [_flip_time(x) for x in (r, k, v, w)]
        backward, _ = chunk_rwkv6(*flipped, torch.zeros_like(u), scale=1.0, initial_state=None,
                                  output_final_state=False)
        out = out + _flip_time(backward)
    return out
