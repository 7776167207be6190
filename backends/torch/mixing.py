"""RWKV-6's token mixing fused with the projections it feeds, and adaLN's norm-and-modulate, in PyTorch.

Time mixing interpolates each token with its shifted neighbour five ways (w, k, v, r, g: a
data-dependent LoRA mix) and channel mixing two ways; each interpolation is a [N, T, D] tensor
that only one projection reads. Autograd keeps all of them, the LoRA's sums, the gate's and the
norms' intermediates and the channel mix's squared keys for the backward pass: a DiR-S block kept
about 45 D-sized tensors per token (with the WKV's), a DiT block keeps 20. The hand-written
backward passes here keep each op's input and what the next op keeps anyway (r, k, v, the
log-decay), and recompute the rest - elementwise work and the narrow LoRA products - a block
of tokens at a time (``ROW_BLOCK_ELEMENTS``), so neither pass makes [N, T, *] temporaries
either: a DiR block now keeps 18.

One calling convention, a plain reference beside each fast form (tests tie them):

    time_mix_inputs(att, x)   / time_mix_inputs_reference(att, x)
        x [N, T, D] -> r, k, v, gate_pre (the gate before its SiLU), log_decay: each [N, T, D]
    gated_output(att, y, gate_pre) / gated_output_reference(att, y, gate_pre)
        WKV output y, gate_pre [N, T, D] -> output(ln_x(y) * silu(gate_pre)) [N, T, D]
    channel_mix(ffn, x)       / channel_mix_reference(ffn, x)
        x [N, T, D] -> [N, T, D]
    norm_modulate(x, shift, scale, eps) / norm_modulate_reference(x, shift, scale, eps)
        x [N, T, D], shift and scale [N, D] -> LayerNorm(x) * (1 + scale) + shift [N, T, D]

``att`` and ``ffn`` are a ``TimeMix`` and a ``ChannelMix`` of ``backends/torch/models.py``
(only their parameters and shift settings are read). Under autocast the backward pass runs
under the same autocast as the forward (as ``torch.amp.custom_bwd``), so its products are in
the forward's precision; parameter gradients come back in the parameters' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TIME_MIX_BRANCHES = ("w", "k", "v", "r", "g")  # the order of time_maa_w1's and time_maa_w2's blocks


def token_shift(x, bidirectional: bool, q_shift_index=None):
    """The neighbour each token mixes with: x_{t-1}, or the mean of x_{t-1} and x_{t+1}; or,
    given q_shift's gather index ([4T], ``common.scan_orders.q_shift_index``), each channel
    quarter from one of the four grid neighbours.

    x [N, T, D]; tokens past either end (or the grid's border) are zero.
    """
    zero = torch.zeros_like(x[:, :1])
    if q_shift_index is not None:
        n, t, d = x.shape
        quarters = torch.cat([x, zero], dim=1).reshape(n, 4 * (t + 1), d // 4)
        return quarters.index_select(1, q_shift_index).reshape(n, t, d)
    previous = torch.cat([zero, x[:, :-1]], dim=1)
    if not bidirectional:
        return previous
    following = torch.cat([x[:, 1:], zero], dim=1)
    return 0.5 * (previous + following)


def token_shift_transpose(grad, bidirectional: bool, q_shift_index=None):
    """The adjoint of ``token_shift``: the gradient of x given the shifted tensor's gradient.
    [N, T, D] -> [N, T, D]. A shift to the previous token is undone by a shift to the following
    one; the bidirectional mean is its own adjoint; q_shift's gather becomes a scatter-add."""
    zero = torch.zeros_like(grad[:, :1])
    if q_shift_index is not None:
        n, t, d = grad.shape
        quarters = grad.new_zeros(n, 4 * (t + 1), d // 4).index_add_(1, q_shift_index, grad.reshape(n, 4 * t, d // 4))
        return quarters.reshape(n, t + 1, d)[:, :t]
    following = torch.cat([grad[:, 1:], zero], dim=1)
    if not bidirectional:
        return following
    previous = torch.cat([zero, grad[:, :-1]], dim=1)
    return 0.5 * (previous + following)


# Each fused form runs over blocks of tokens, its widest temporary about this many elements: its
# working memory is its outputs and one block, not a dozen [N, T, *] tensors. A block is 4 MB of
# fp32, so a pass's elementwise work runs from the caches: with 32 MB blocks (1 << 23) the DiR causal
# step (width 384, depth 2, 2-core EPYC) took 3.60-3.67 s at 16384 tokens against 3.44-3.53 s, and
# the same at 4096 tokens (0.83-0.86 s).
ROW_BLOCK_ELEMENTS = 1 << 20


def _token_blocks(n: int, tokens: int, width: int):
    """Slices of the token axis of [n, tokens, width] tensors, about ROW_BLOCK_ELEMENTS at a time."""
    size = max(1, ROW_BLOCK_ELEMENTS // max(1, n * width))
    return [slice(start, min(start + size, tokens)) for start in range(0, tokens, size)]


def _row_blocks(rows: int, width: int):
    """Slices of ``rows`` flattened token rows of ``width``, about ROW_BLOCK_ELEMENTS at a time
    (for the per-token ops with no shift: contiguous slices)."""
    size = max(1, ROW_BLOCK_ELEMENTS // max(1, width))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _flat(x):
    """[N, t, C] -> [N·t, C]."""
    return x.reshape(-1, x.shape[-1])


def _weight_grad(grad_out, inputs):
    """[N, t, O] and [N, t, I] -> [O, I]: a product's weight gradient over a block of tokens."""
    return _flat(grad_out).t() @ _flat(inputs)


class _Shift:
    """delta = token_shift(x) - x a block of tokens at a time, and its adjoint added into x's
    gradient. A raster shift reads a block and the token either side of it, so nothing [N, T, D]
    is made; q_shift gathers from the whole grid, so its delta is made once and its adjoint
    applied once at the end (``finish``)."""

    def __init__(self, x, shift):
        self.x, (self.bidirectional, self.q_shift_index) = x, shift
        self.whole = None if self.q_shift_index is None else token_shift(x, *shift) - x
        self.grad_delta = None

    def delta(self, block):
        if self.whole is not None:
            return self.whole[:, block]
        start, end, tokens = block.start, block.stop, self.x.shape[1]
        low, high = max(0, start - 1), min(tokens, end + 1)
        shifted = token_shift(self.x[:, low:high], self.bidirectional)[:, start - low:end - low]
        return shifted - self.x[:, block]

    def add_block(self, grad_x, grad_x_block, grad_delta, block):
        """Adds a block's gradients - of x directly, and of delta - into x's gradient [N, T, D],
        made here (None: the first block): whole when the block is all tokens, else zeros."""
        if grad_x is None:
            if block.start == 0 and block.stop == self.x.shape[1]:
                grad_x = grad_x_block
            else:
                grad_x = torch.zeros_like(self.x)
                grad_x[:, block] = grad_x_block
        else:
            grad_x[:, block] += grad_x_block
        self.add_transpose(grad_x, grad_delta, block)
        return grad_x

    def add_transpose(self, grad_x, grad_delta, block):
        """grad_x [N, T, D] += d delta / d x applied to the block's grad_delta [N, t, D]."""
        grad_x[:, block] -= grad_delta
        if self.q_shift_index is not None:
            if self.grad_delta is None:
                self.grad_delta = torch.zeros_like(grad_x)
            self.grad_delta[:, block] = grad_delta
            return
        start, end, tokens = block.start, block.stop, grad_x.shape[1]
        first = max(start, 1)  # x_{t-1} feeds token t >= 1
        if self.bidirectional:
            grad_x[:, first - 1:end - 1].add_(grad_delta[:, first - start:], alpha=0.5)
            last = min(end, tokens - 1)  # x_{t+1} feeds token t <= T-2
            grad_x[:, start + 1:last + 1].add_(grad_delta[:, :last - start], alpha=0.5)
        else:
            grad_x[:, first - 1:end - 1] += grad_delta[:, first - start:]

    def finish(self, grad_x):
        if self.grad_delta is not None:
            grad_x += token_shift_transpose(self.grad_delta, self.bidirectional, self.q_shift_index)
        return grad_x


def _blockwise(blocks, lead_shape, compute, at=lambda block: (slice(None), block)):
    """Runs ``compute(block) -> {name: part}`` over blocks into whole tensors ``lead_shape + the
    part's trailing size``, each part written at ``at(block)`` (token blocks of [N, T, C] tensors by
    default; ``at=lambda rows: rows`` for row blocks). One block: its results as they are."""
    if len(blocks) == 1:
        return compute(blocks[0])
    whole = None
    for block in blocks:
        parts = compute(block)
        if whole is None:
            whole = {name: part.new_empty(*lead_shape, *part.shape[len(lead_shape):]) for name, part in parts.items()}
        for name, part in parts.items():
            whole[name][at(block)] = part
    return whole


def _autocast_state(device_type: str):
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


def _as(grad, like):
    return None if grad is None else grad.to(like.dtype)


# ---- time mixing ------------------------------------------------------------------------
def time_mix_inputs_reference(att, x):
    """The plain form: x [N, T, D] -> (r, k, v, gate_pre, log_decay), each [N, T, D]."""
    n, t, d = x.shape
    delta = token_shift(x, att.bidirectional, att.q_shift_index) - x
    mixed = x + delta * att.time_maa_x
    lora = torch.tanh(mixed @ att.time_maa_w1).view(n * t, 5, -1).transpose(0, 1)  # [5, NT, R]
    mw, mk, mv, mr, mg = torch.bmm(lora, att.time_maa_w2).view(5, n, t, d).unbind(0)
    xw = x + delta * (att.time_maa_w + mw)
    xk = x + delta * (att.time_maa_k + mk)
    xv = x + delta * (att.time_maa_v + mv)
    xr = x + delta * (att.time_maa_r + mr)
    xg = x + delta * (att.time_maa_g + mg)
    log_decay = -torch.exp(att.time_decay + torch.tanh(xw @ att.time_decay_w1) @ att.time_decay_w2)
    return att.receptance(xr), att.key(xk), att.value(xv), att.gate(xg), log_decay


def _lora_activations(mixed_x, maa_w1):
    """The five interpolations' LoRA activations tanh(mixed W1): [N, t, D] -> [5, N·t, R], each
    branch's rows contiguous."""
    lora = torch.tanh(mixed_x @ maa_w1)
    return lora.view(-1, 5, lora.shape[-1] // 5).transpose(0, 1).contiguous()


class _TimeMixInputs(torch.autograd.Function):
    """Keeps x and the log-decay, which the WKV keeps anyway; recomputes the LoRA activations
    tanh(mixed W1) [N, T, 5R] and tanh(xw Wd1) [N, T, Rd] (narrow products) and the five
    interpolations."""

    @staticmethod
    def forward(ctx, x, shift, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, w_k, w_v, w_r, w_g):
        weights = {"k": w_k, "v": w_v, "r": w_r, "g": w_g}
        shifter = _Shift(x, shift)

        def compute(block):
            x_b, delta_b = x[:, block], shifter.delta(block)
            lora = _lora_activations(torch.addcmul(x_b, delta_b, maa_x), maa_w1)
            parts = {}
            for b, name in enumerate(TIME_MIX_BRANCHES):
                mixed = torch.addcmul(x_b, delta_b, maa[b] + (lora[b] @ maa_w2[b]).view_as(x_b))
                if name == "w":
                    parts[name] = -torch.exp(decay + torch.tanh(mixed @ decay_w1) @ decay_w2)
                else:
                    parts[name] = F.linear(mixed, weights[name])
                del mixed
            return parts

        out = _blockwise(_token_blocks(*x.shape), x.shape[:2], compute)
        ctx.shift = shift
        ctx.autocast = (x.device.type, *_autocast_state(x.device.type))
        ctx.save_for_backward(x, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, out["w"], w_k, w_v, w_r, w_g)
        return out["r"], out["k"], out["v"], out["g"], out["w"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_r, grad_k, grad_v, grad_gate, grad_log_decay):
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        grads = {"r": grad_r, "k": grad_k, "v": grad_v, "g": grad_gate, "w": grad_log_decay}
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            return (*_time_mix_inputs_backward(ctx.saved_tensors, ctx.shift, grads),)


def _time_mix_inputs_backward(saved, shift, grads):
    x, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, log_decay, *weight_list = saved
    weights = dict(zip("kvrg", weight_list))
    shifter = _Shift(x, shift)
    grad_x = None
    grad_maa_x, grad_maa, grad_maa_w1, grad_maa_w2 = map(torch.zeros_like, (maa_x, maa, maa_w1, maa_w2))
    reached = [name for name in TIME_MIX_BRANCHES if grads[name] is not None]  # outputs the loss reaches
    grad_weights = {name: torch.zeros_like(weights[name]) for name in reached if name != "w"}
    grad_decay, grad_decay_w1, grad_decay_w2 = map(torch.zeros_like, (decay, decay_w1, decay_w2))
    for block in _token_blocks(*x.shape):
        x_b, delta_b = x[:, block], shifter.delta(block)
        mixed_x = torch.addcmul(x_b, delta_b, maa_x)
        lora = _lora_activations(mixed_x, maa_w1)  # as the forward: the same products, the same values
        grad_x_b = grad_delta_b = None
        grad_lora = torch.zeros_like(lora)
        for b, name in enumerate(TIME_MIX_BRANCHES):
            if name not in reached:
                continue
            # out of place: fp32 under autocast, as the forward
            coefficient = maa[b] + (lora[b] @ maa_w2[b]).view_as(x_b)
            mixed = torch.addcmul(x_b, delta_b, coefficient)
            if name == "w":
                hidden = torch.tanh(mixed @ decay_w1)
                grad_pre = grads["w"][:, block] * log_decay[:, block]  # d(-exp(p))/dp = -exp(p), the log-decay
                grad_decay += grad_pre.sum(dim=(0, 1))
                grad_decay_w2 += _weight_grad(hidden, grad_pre)
                grad_hidden = (grad_pre @ decay_w2.t()) * (1 - hidden * hidden)
                grad_decay_w1 += _weight_grad(mixed, grad_hidden)
                grad_mixed = grad_hidden @ decay_w1.t()
            else:
                grad_weights[name] += _weight_grad(grads[name][:, block], mixed)
                grad_mixed = grads[name][:, block] @ weights[name]
            del mixed
            if grad_x_b is None:
                grad_x_b, grad_delta_b = grad_mixed.clone(), grad_mixed * coefficient
            else:
                grad_x_b += grad_mixed
                grad_delta_b.addcmul_(grad_mixed, coefficient)
            grad_coefficient = _flat(grad_mixed.mul_(delta_b))
            grad_maa[b] += grad_coefficient.sum(dim=0)
            grad_maa_w2[b] += lora[b].t() @ grad_coefficient
            grad_lora[b] = grad_coefficient @ maa_w2[b].t()
            del grad_mixed, grad_coefficient, coefficient
        grad_lora_pre = (grad_lora * (1 - lora * lora)).transpose(0, 1).reshape(*x_b.shape[:2], -1)
        grad_maa_w1 += _weight_grad(mixed_x, grad_lora_pre)
        grad_mixed = grad_lora_pre @ maa_w1.t()
        grad_x_b += grad_mixed
        grad_delta_b.addcmul_(grad_mixed, maa_x)
        grad_maa_x += (grad_mixed * delta_b).sum(dim=(0, 1))
        grad_x = shifter.add_block(grad_x, grad_x_b, grad_delta_b, block)
    shifter.finish(grad_x)
    missing = lambda name, grad: grad if name in reached else None  # noqa: E731
    return (_as(grad_x, x), None, _as(grad_maa_x, maa_x), _as(grad_maa, maa), _as(grad_maa_w1, maa_w1),
            _as(grad_maa_w2, maa_w2), _as(missing("w", grad_decay), decay), _as(missing("w", grad_decay_w1), decay_w1),
            _as(missing("w", grad_decay_w2), decay_w2), *(_as(grad_weights.get(name), weights[name]) for name in "kvrg"))


def time_mix_inputs(att, x):
    """The fused form of ``time_mix_inputs_reference``: same arguments, same results."""
    maa = torch.stack([getattr(att, f"time_maa_{name}") for name in TIME_MIX_BRANCHES])
    return _TimeMixInputs.apply(x, (att.bidirectional, att.q_shift_index), att.time_maa_x, maa, att.time_maa_w1,
                                att.time_maa_w2, att.time_decay, att.time_decay_w1, att.time_decay_w2,
                                att.key.weight, att.value.weight, att.receptance.weight, att.gate.weight)


def gated_output_reference(att, y, gate_pre):
    """The plain form: WKV output y and the gate before its SiLU, each [N, T, D] ->
    output(ln_x(y) * silu(gate_pre)), [N, T, D] (ln_x: a GroupNorm per head)."""
    n, t, d = y.shape
    return att.output(att.ln_x(y.reshape(n * t, d)).view(n, t, d) * F.silu(gate_pre))


class _GatedOutput(torch.autograd.Function):
    """Keeps y, gate_pre and the per-head statistics [N·T, H]; the normalised and gated tensors
    (three D-sized tensors a token under autograd) are recomputed. The group norm runs on
    PyTorch's own kernels, forward and backward, in fp32 at least."""

    @staticmethod
    def forward(ctx, y, gate_pre, norm_weight, norm_bias, w_output, groups: int, eps: float):
        stats_dtype = torch.promote_types(y.dtype, torch.float32)
        y_rows, gate_rows = _flat(y), _flat(gate_pre)

        def compute(rows):
            normed, mean, inv_std = torch.native_group_norm(
                y_rows[rows].to(stats_dtype), norm_weight, norm_bias, rows.stop - rows.start, y.shape[-1], 1, groups, eps)
            return {"out": F.linear(normed * F.silu(gate_rows[rows]), w_output), "mean": mean, "inv_std": inv_std}

        out = _blockwise(_row_blocks(*y_rows.shape), y_rows.shape[:1], compute, at=lambda rows: rows)
        ctx.options = (groups, eps)
        ctx.autocast = (y.device.type, *_autocast_state(y.device.type))
        ctx.save_for_backward(y, gate_pre, norm_weight, norm_bias, w_output, out["mean"], out["inv_std"])
        return out["out"].view(*y.shape[:-1], -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            return (*_gated_output_backward(ctx.saved_tensors, *ctx.options, grad_out), None, None)


def _gated_output_backward(saved, groups, eps, grad_out):
    y, gate_pre, norm_weight, norm_bias, w_output, mean, inv_std = saved
    y_rows, gate_rows, grad_rows = _flat(y), _flat(gate_pre), _flat(grad_out)
    d = y.shape[-1]
    grad_y, grad_gate_pre = torch.empty_like(y_rows), torch.empty_like(gate_rows)
    grad_norm_weight, grad_norm_bias, grad_w_output = map(torch.zeros_like, (norm_weight, norm_bias, w_output))
    for rows in _row_blocks(y_rows.shape[0], d):
        count, y_b = rows.stop - rows.start, y_rows[rows].to(mean.dtype)
        normed = torch.native_group_norm(y_b, norm_weight, norm_bias, count, d, 1, groups, eps)[0]
        pre, grad_b = gate_rows[rows], grad_rows[rows]
        sigmoid = torch.sigmoid(pre)
        gate = pre * sigmoid
        grad_w_output += grad_b.t() @ (normed * gate)
        grad_gated = grad_b @ w_output
        grad_gate_pre[rows] = grad_gated * normed * (sigmoid * (1 + pre * (1 - sigmoid)))  # silu'(p)
        del normed, sigmoid
        grad_normed = grad_gated.mul_(gate).to(mean.dtype)
        grad_y_b, grad_w_b, grad_b_b = torch.ops.aten.native_group_norm_backward(
            grad_normed, y_b, mean[rows], inv_std[rows], norm_weight, count, d, 1, groups, [True, True, True])
        grad_y[rows] = grad_y_b
        grad_norm_weight += grad_w_b
        grad_norm_bias += grad_b_b
    return (_as(grad_y.view_as(y), y), _as(grad_gate_pre.view_as(gate_pre), gate_pre),
            _as(grad_norm_weight, norm_weight), _as(grad_norm_bias, norm_bias), _as(grad_w_output, w_output))


def gated_output(att, y, gate_pre):
    """The fused form of ``gated_output_reference``: same arguments, same result."""
    return _GatedOutput.apply(y, gate_pre, att.ln_x.weight, att.ln_x.bias, att.output.weight, att.ln_x.num_groups,
                              att.ln_x.eps)


# ---- channel mixing ---------------------------------------------------------------------
def channel_mix_reference(ffn, x):
    """The plain form: x [N, T, D] -> sigmoid(Wr xr) * Wv(relu(Wk xk)^2), [N, T, D]."""
    delta = token_shift(x, ffn.bidirectional, ffn.q_shift_index) - x
    k = torch.relu(ffn.key(x + delta * ffn.time_maa_k)) ** 2
    return torch.sigmoid(ffn.receptance(x + delta * ffn.time_maa_r)) * ffn.value(k)


class _ChannelMix(torch.autograd.Function):
    """Keeps x, relu(Wk xk) [N, T, F], sigmoid(Wr xr) and Wv k^2: seven D-sized tensors a token
    where autograd keeps thirteen (the interpolations, the relu and its square)."""

    @staticmethod
    def forward(ctx, x, shift, maa_k, maa_r, w_key, w_receptance, w_value):
        shifter = _Shift(x, shift)

        def compute(block):
            x_b, delta_b = x[:, block], shifter.delta(block)
            hidden = torch.relu(F.linear(torch.addcmul(x_b, delta_b, maa_k), w_key))
            value = F.linear(hidden * hidden, w_value)
            gate = torch.sigmoid(F.linear(torch.addcmul(x_b, delta_b, maa_r), w_receptance))
            return {"hidden": hidden, "gate": gate, "value": value, "out": gate * value}

        out = _blockwise(_token_blocks(x.shape[0], x.shape[1], w_key.shape[0]), x.shape[:2], compute)
        ctx.shift = shift
        ctx.autocast = (x.device.type, *_autocast_state(x.device.type))
        ctx.save_for_backward(x, maa_k, maa_r, w_key, w_receptance, w_value, out["hidden"], out["gate"], out["value"])
        return out["out"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            return (*_channel_mix_backward(ctx.saved_tensors, ctx.shift, grad_out),)


def _channel_mix_backward(saved, shift, grad_out):
    x, maa_k, maa_r, w_key, w_receptance, w_value, hidden, gate, value = saved
    shifter = _Shift(x, shift)
    grad_x = None
    grad_maa_k, grad_maa_r, grad_w_key, grad_w_receptance, grad_w_value = map(
        torch.zeros_like, (maa_k, maa_r, w_key, w_receptance, w_value))
    for block in _token_blocks(x.shape[0], x.shape[1], hidden.shape[-1]):
        x_b, delta_b, grad_b, hidden_b, gate_b = x[:, block], shifter.delta(block), grad_out[:, block], \
            hidden[:, block], gate[:, block]
        grad_value = grad_b * gate_b
        grad_gate_pre = grad_b * value[:, block] * gate_b * (1 - gate_b)
        grad_w_value += _weight_grad(grad_value, hidden_b * hidden_b)
        grad_key_pre = (grad_value @ w_value).mul_(hidden_b).mul_(2)  # d relu(p)^2 / dp = 2 relu(p)
        grad_w_key += _weight_grad(grad_key_pre, torch.addcmul(x_b, delta_b, maa_k))
        grad_xk = grad_key_pre @ w_key
        del grad_key_pre
        grad_w_receptance += _weight_grad(grad_gate_pre, torch.addcmul(x_b, delta_b, maa_r))
        grad_xr = grad_gate_pre @ w_receptance
        grad_maa_k += (grad_xk * delta_b).sum(dim=(0, 1))
        grad_maa_r += (grad_xr * delta_b).sum(dim=(0, 1))
        grad_x = shifter.add_block(grad_x, grad_xk + grad_xr, grad_xk * maa_k + grad_xr * maa_r, block)
    shifter.finish(grad_x)
    return (_as(grad_x, x), None, _as(grad_maa_k, maa_k), _as(grad_maa_r, maa_r), _as(grad_w_key, w_key),
            _as(grad_w_receptance, w_receptance), _as(grad_w_value, w_value))


def channel_mix(ffn, x):
    """The fused form of ``channel_mix_reference``: same arguments, same result."""
    return _ChannelMix.apply(x, (ffn.bidirectional, ffn.q_shift_index), ffn.time_maa_k, ffn.time_maa_r,
                             ffn.key.weight, ffn.receptance.weight, ffn.value.weight)


# ---- adaLN ------------------------------------------------------------------------------
def norm_modulate_reference(x, shift, scale, eps: float):
    """The plain form: x [N, T, D], shift and scale [N, D] -> LayerNorm(x) (no affine) * (1 + scale)
    + shift, [N, T, D]: adaLN's modulated input to a block's mixer."""
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _NormModulate(torch.autograd.Function):
    """Keeps x (which the residual stream keeps anyway) and the per-token mean and inverse deviation
    [N·T, 1]; the normalised tensor autograd would keep is recomputed. The layer norm runs on
    PyTorch's own kernels, forward and backward, in fp32 at least."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps: float):
        n, t, d = x.shape
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        x_rows = _flat(x)
        shift_rows, scale_rows = (p.unsqueeze(1).expand(n, t, d).reshape(-1, d) for p in (shift, 1 + scale))

        def compute(rows):
            normed, mean, inv_std = torch.native_layer_norm(x_rows[rows].to(stats_dtype), (d,), None, None, eps)
            return {"out": torch.addcmul(shift_rows[rows], normed, scale_rows[rows]), "mean": mean, "inv_std": inv_std}

        out = _blockwise(_row_blocks(n * t, d), (n * t,), compute, at=lambda rows: rows)
        ctx.eps = eps
        ctx.save_for_backward(x, shift, scale, out["mean"], out["inv_std"])
        return out["out"].view(n, t, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, shift, scale, mean, inv_std = ctx.saved_tensors
        n, t, d = x.shape
        x_rows, grad_rows = _flat(x), _flat(grad_out)
        grad_x = torch.empty_like(x_rows)
        grad_scale = torch.zeros(n, d, dtype=mean.dtype, device=x.device)
        sample = torch.arange(n, device=x.device).repeat_interleave(t)  # each row's sample
        for rows in _row_blocks(n * t, d):
            x_b, grad_b = x_rows[rows].to(mean.dtype), grad_rows[rows].to(mean.dtype)
            normed = torch.native_layer_norm(x_b, (d,), None, None, ctx.eps)[0]
            grad_scale.index_add_(0, sample[rows], grad_b * normed)
            del normed
            grad_normed = grad_b * (1 + scale.to(mean.dtype)).index_select(0, sample[rows])
            grad_x[rows] = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x_b, (d,), mean[rows], inv_std[rows], None, None, [True, False, False])[0]
        return _as(grad_x.view_as(x), x), _as(grad_out.sum(dim=1), shift), _as(grad_scale, scale), None


def norm_modulate(x, shift, scale, eps: float):
    """The fused form of ``norm_modulate_reference``: same arguments, same result."""
    return _NormModulate.apply(x, shift, scale, eps)
