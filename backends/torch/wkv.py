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


def _factorisable(w, decay_before):
    """Per chunk [...]: True where exp(sum of |w| over the chunk) stays below exp(MAX_FACTORISED_EXPONENT)."""
    span_total = -(decay_before[..., -1, :] + w[..., -1, :]).detach()
    return span_total.amax(dim=-1) <= MAX_FACTORISED_EXPONENT[w.dtype]


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
        state = decay * state + kv
    return torch.stack(states, dim=-3)


def _chunk_outputs(r, k, v, w, states, sub_chunk_size: int):
    """Each chunk's output given the state at its start: within-chunk scores times v plus the
    state read out through the decay from the chunk start. [..., N, L, *] -> [..., N, L, V]."""
    decay_before = _exclusive_cumsum(w, dim=-2)  # w summed from chunk start to t-1, <= 0
    scores = _within_chunk_scores(r, k, w, decay_before, sub_chunk_size)  # [..., N, L, L]
    if states is None:
        return scores @ v
    return scores @ v + (r * torch.exp(decay_before)) @ states


# Chunks are scored (and, in the backward pass, recomputed) in groups of about this many input
# elements, cut across batch, heads and chunks alike: the scores, sub-chunk keys and
# exponentials are several times the inputs' size, so the group bounds that working memory
# whatever the sequence length. A group is 1 MB of fp32 per input, so the dozens of
# elementwise passes of its backward run from the caches: with 16 MB groups (1 << 22) WKV6's
# forward+backward (6 heads of 64, bidirectional, 2-core EPYC) took about twice as long: 256 against
# 132 ms at 256 tokens and batch 16, 249 against 109 ms at 4096 tokens.
GROUP_ELEMENTS = 1 << 18


def _row_groups(x):
    """Slices of the rows of a [M, L, K] tensor of chunks, a group of about GROUP_ELEMENTS at a time."""
    size = max(1, GROUP_ELEMENTS // max(1, x[0].numel()))
    return [slice(start, start + size) for start in range(0, x.shape[0], size)]


def _rows(x):
    """[..., L, K] -> [M, L, K] (None stays None): chunks are independent given their start
    states, so groups are cut across batch, heads and chunks alike."""
    return None if x is None else x.reshape(-1, *x.shape[-2:])


def _to_chunks(x, bidirectional: bool, chunk_size: int):
    """[B, H, T, K] -> [B', H, N, L, K]: the reversed sequence appended on the batch axis when
    bidirectional (both directions in one batched scan), zero-padded to whole chunks (trailing
    zeros and zero log-decay never reach earlier tokens)."""
    if bidirectional:
        x = torch.cat([x, x.flip(2)], dim=0)
    pad = (-x.shape[2]) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(x.shape[0], x.shape[1], -1, chunk_size, x.shape[-1])


def _from_chunks(x, bidirectional: bool, length: int):
    """The adjoint of ``_to_chunks``: [B', H, N, L, V] -> [B, H, T, V], the directions summed."""
    x = x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])[:, :, :length]
    if bidirectional:
        half = x.shape[0] // 2
        x = x[:half] + x[half:].flip(2)
    return x


def _prepare(r, k, v, w, u, bidirectional: bool, chunk_size: int):
    """[B, T, H, K] inputs -> ([B, H, T, K] r, k, v; u; chunked r, k, v, w), in the compute dtype."""
    compute = _compute_dtype(r.dtype)
    r, k, v, w = (x.to(compute).transpose(1, 2) for x in (r, k, v, w))
    # exp(-1e4) is exactly 0 in fp32 and fp64, and every exponent is a sum of log-decays
    # <= 0, so the floor changes no value or gradient; it keeps -inf out of the sums.
    w = w.clamp(min=LOG_DECAY_FLOOR)
    chunks = [_to_chunks(x, bidirectional, chunk_size) for x in (r, k, v, w)]
    return r, k, v, u.to(compute), chunks


def _bonus(r, k, v, u):
    """The current token's own term r_t diag(u) k_t^T v_t, for [B, H, T, K] inputs."""
    return (r * u[None, :, None, :] * k).sum(-1, keepdim=True) * v


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


def _chunked_scan_backward(r, k, v, w, states, grad_out, sub_chunk_size: int):
    """Gradients of ``_chunk_outputs`` (with the states it implies) for chunked inputs.

    The state's gradient runs backwards through the chunks in closed form,
    dS_c = q_c^T dO_c + chunk_decay_c * dS_{c+1} with q = r * exp(decay_before); given it,
    chunks are independent, and each group's local gradients come from ``_local_grads``:
    exactly the gradients autograd gives over the whole forward pass.
    """
    after = None  # after[c]: d loss / d (the state after chunk c); None for one chunk
    if states is not None:
        n_chunks = r.shape[-3]
        read_grad = (r * torch.exp(_exclusive_cumsum(w, dim=-2))).transpose(-1, -2) @ grad_out  # [..., N, K, V]
        chunk_decay = torch.exp(w.sum(dim=-2)).unsqueeze(-1)
        after = [None] * n_chunks
        following = torch.zeros_like(read_grad[..., 0, :, :])
        for c in range(n_chunks - 1, -1, -1):
            after[c] = following
            following = read_grad[..., c, :, :] + chunk_decay[..., c, :, :] * following
        after = torch.stack(after, dim=-3)
    rows = [_rows(x) for x in (r, k, v, w, states, grad_out, after)]
    groups = _row_groups(rows[0])
    if len(groups) == 1:
        local = _local_grads(*rows, sub_chunk_size)
    else:
        local = [torch.empty_like(x) for x in rows[:4]]
        for part in groups:
            for full, g in zip(local, _local_grads(*(None if x is None else x[part] for x in rows), sub_chunk_size)):
                full[part] = g
    return [g.reshape(x.shape) for g, x in zip(local, (r, k, v, w))]


def _chunk_parts(r, k, v, w, sub_chunk_size: int):
    """What a chunk contributes on its own, for chunk rows [M, L, K]: the within-chunk output
    [M, L, V], the query that reads the start state (r e^B) [M, L, K], and the chunk's transition
    (chunk_decay [M, K], chunk_kv [M, K, V]). For rows whose decay is bounded, the transition's
    decayed keys k e^(A) are the factorised keys k e^-(B + w) times e^(sum w), so the reverse
    sum A is never formed; otherwise each part takes its exact path."""
    decay_before = _exclusive_cumsum(w, dim=-2)
    query = r * torch.exp(decay_before)
    chunk_decay = torch.exp(w.sum(dim=-2))  # [M, K]
    if bool(_factorisable(w, decay_before).all()):
        key = k * torch.exp(-(decay_before + w))
        size = r.shape[-2]
        scores = (query @ key.transpose(-1, -2)) * torch.ones(size, size, dtype=r.dtype, device=r.device).tril(-1)
        chunk_kv = (key * chunk_decay.unsqueeze(-2)).transpose(-1, -2) @ v
    else:
        scores = _within_chunk_scores(r, k, w, decay_before, sub_chunk_size)
        chunk_kv = _chunk_transitions(k, v, w)[1]
    return scores @ v, query, chunk_decay, chunk_kv


def _chunked_scan(r, k, v, w, sub_chunk_size: int):
    """The chunked scan [..., N, L, *] -> (outputs [..., N, L, V], chunk-start states [..., N, K, V]
    or None for one chunk): each group of chunk rows scored on its own, the states passed between
    chunks, then each chunk's start state read out."""
    rows = [_rows(x) for x in (r, k, v, w)]
    groups = _row_groups(rows[0])
    parts = [_chunk_parts(*(x[part] for x in rows), sub_chunk_size) for part in groups]
    join = lambda i: torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]  # noqa: E731
    if r.shape[-3] == 1:
        return join(0).reshape(v.shape), None
    lead = r.shape[:-2]  # [..., N]
    states = _chunk_states(join(2).reshape(*lead, -1), join(3).reshape(*lead, *parts[0][3].shape[-2:]))
    state_rows = _rows(states)
    # each group's start-state read-out while its within-chunk part is still at hand
    out = [torch.baddbmm(within, query, state_rows[part]) for part, (within, query, _, _) in zip(groups, parts)]
    return (torch.cat(out) if len(out) > 1 else out[0]).reshape(v.shape), states


def _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size):
    """WKV6 [B, T, H, K] -> ([B, T, H, V], the chunk-start states or None)."""
    length = r.shape[1]
    r_t, k_t, v_t, u_c, chunks = _prepare(r, k, v, w, u, bidirectional, chunk_size)
    scan, states = _chunked_scan(*chunks, sub_chunk_size)
    return (_from_chunks(scan, bidirectional, length) + _bonus(r_t, k_t, v_t, u_c)).transpose(1, 2).to(r.dtype), states


class _WKV6(torch.autograd.Function):
    """WKV6 with a hand-written backward that keeps only the inputs and the chunk-start states
    [B', H, N, K, V] (one input's size per direction at K = V = 64). Everything else (layout
    copies, scores, sub-chunk keys, exponentials) is recomputed a group of chunks at a time in
    the backward pass, so its memory does not grow with the sequence."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size):
        out, states = _forward(r, k, v, w, u, bidirectional, chunk_size, sub_chunk_size)
        ctx.save_for_backward(r, k, v, w, u, states)
        ctx.options = (bidirectional, chunk_size, sub_chunk_size)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        bidirectional, chunk_size, sub_chunk_size = ctx.options
        *inputs, states = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in inputs]
            r_t, k_t, v_t, u_c, chunks = _prepare(*leaves, bidirectional, chunk_size)
            grad_t = grad_out.transpose(1, 2).to(r_t.dtype)  # [B, H, T, V]
            chunk_grads = _chunked_scan_backward(*(x.detach() for x in chunks), states,
                                                 _to_chunks(grad_t, bidirectional, chunk_size), sub_chunk_size)
            grads = torch.autograd.grad((*chunks, _bonus(r_t, k_t, v_t, u_c)), leaves, (*chunk_grads, grad_t),
                                        allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        return (*grads, None, None, None)


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
