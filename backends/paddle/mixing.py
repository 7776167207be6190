"""RWKV-6's token mixing fused with the projections it feeds, and adaLN's norm-and-modulate, in PaddlePaddle.

Time mixing interpolates each token with its shifted neighbour five ways (w, k, v, r, g: a
data-dependent LoRA mix) and channel mixing two ways; each interpolation is a [N, T, D] tensor
that only one projection reads. Autograd keeps all of them, the LoRA's sums, the gate's and the
norms' intermediates and the channel mix's squared keys for the backward pass: more D-sized
tensors per token and block than a whole DiT block keeps. The hand-written backward passes here
(``paddle.autograd.PyLayer``) keep each op's input and what the next op keeps anyway (r, k, v,
the log-decay), and recompute the rest - elementwise work and two narrow LoRA products - one
branch at a time.

One calling convention, a plain reference beside each fast form (tests tie them):

    time_mix_inputs(att, x)   / time_mix_inputs_reference(att, x)
        x [N, T, D] -> r, k, v, gate_pre (the gate before its SiLU), log_decay: each [N, T, D]
    gated_output(att, y, gate_pre) / gated_output_reference(att, y, gate_pre)
        WKV output y, gate_pre [N, T, D] -> output(ln_x(y) * silu(gate_pre)) [N, T, D]
    channel_mix(ffn, x)       / channel_mix_reference(ffn, x)
        x [N, T, D] -> [N, T, D]
    norm_modulate(x, shift, scale, eps) / norm_modulate_reference(x, shift, scale, eps)
        x [N, T, D], shift and scale [N, D] -> LayerNorm(x) * (1 + scale) + shift [N, T, D]

``att`` and ``ffn`` are a ``TimeMix`` and a ``ChannelMix`` of ``backends/paddle/models.py``
(only their parameters and shift settings are read). As ``backends/torch/mixing.py``, whose
mirror this is, with Paddle's differences: a Linear's weight is [in, out] (the products and
weight gradients are the transposes of torch's); a PyLayer runs its forward without a graph and
wants one gradient per tensor input, None where the input has ``stop_gradient``; where no input
needs a gradient (inference, ``paddle.no_grad``, which is how ``paddle.jit.to_static`` samples)
the fused forms are the references, as ``wkv6`` does; each pass runs over all tokens at once
(torch's runs over blocks of ``ROW_BLOCK_ELEMENTS``; this mirror does not block). Under
``paddle.amp.auto_cast`` the backward pass runs under the forward's autocast, so its products
are in the forward's precision; parameter gradients come back in the parameters' dtype.
"""
from __future__ import annotations

import contextlib

import paddle
import paddle.nn.functional as F
from paddle.amp.auto_cast import amp_state

TIME_MIX_BRANCHES = ("w", "k", "v", "r", "g")  # the order of time_maa_w1's and time_maa_w2's blocks
_AMP_ARGUMENTS = ("enable", "custom_white_list", "custom_black_list", "level", "dtype", "use_promote")


def token_shift(x, bidirectional: bool, q_shift_index=None):
    """The neighbour each token mixes with: x_{t-1}, or the mean of x_{t-1} and x_{t+1}; or,
    given q_shift's gather index ([4T], ``common.scan_orders.q_shift_index``), each channel
    quarter from one of the four grid neighbours.

    x [N, T, D]; tokens past either end (or the grid's border) are zero.
    """
    zero = paddle.zeros_like(x[:, :1])
    if q_shift_index is not None:
        n, t, d = x.shape
        quarters = paddle.concat([x, zero], axis=1).reshape([n, 4 * (t + 1), d // 4])
        return paddle.index_select(quarters, q_shift_index, axis=1).reshape([n, t, d])
    # split, not slicing: the backward of a slice is several times slower on CPU
    t = x.shape[1]
    if t == 1:
        return zero
    head, _ = paddle.split(x, [t - 1, 1], axis=1)
    previous = paddle.concat([zero, head], axis=1)
    if not bidirectional:
        return previous
    _, tail = paddle.split(x, [1, t - 1], axis=1)
    following = paddle.concat([tail, zero], axis=1)
    return 0.5 * (previous + following)


def token_shift_transpose(grad, bidirectional: bool, q_shift_index=None):
    """The adjoint of ``token_shift``: the gradient of x given the shifted tensor's gradient.
    [N, T, D] -> [N, T, D]. A shift to the previous token is undone by a shift to the following
    one; the bidirectional mean is its own adjoint; q_shift's gather becomes a scatter-add."""
    zero = paddle.zeros_like(grad[:, :1])
    n, t, d = grad.shape
    if q_shift_index is not None:
        quarters = paddle.index_add(paddle.zeros([n, 4 * (t + 1), d // 4], dtype=grad.dtype), q_shift_index, 1,
                                    grad.reshape([n, 4 * t, d // 4]))
        return paddle.split(quarters.reshape([n, t + 1, d]), [t, 1], axis=1)[0]
    if t == 1:
        return zero
    _, tail = paddle.split(grad, [1, t - 1], axis=1)
    following = paddle.concat([tail, zero], axis=1)
    if not bidirectional:
        return following
    head, _ = paddle.split(grad, [t - 1, 1], axis=1)
    previous = paddle.concat([zero, head], axis=1)
    return 0.5 * (previous + following)


class _Shift:
    """A mix's (bidirectional, q_shift_index) as one PyLayer argument: Paddle takes a tensor inside
    a tuple argument for an input that wants a gradient, so the index travels in a plain object."""

    __slots__ = ("args",)

    def __init__(self, bidirectional: bool, q_shift_index):
        self.args = (bidirectional, q_shift_index)


def _sum_tokens(x):
    """[N, T, D] -> [D]: the gradient of a per-channel parameter broadcast over tokens."""
    return x.sum(axis=[0, 1])


def _weight_grad(inputs, grad_out):
    """inputs [N, T, I], grad [N, T, O] -> [I, O]: the gradient of W in inputs @ W (a bias-free
    Paddle Linear's weight, or a raw [I, O] parameter)."""
    return paddle.matmul(inputs.reshape([-1, inputs.shape[-1]]), grad_out.reshape([-1, grad_out.shape[-1]]),
                         transpose_x=True)


def _cast(grad, like):
    """grad in like's dtype (the accumulators' and the parameters' dtype under autocast)."""
    return grad if grad is None or grad.dtype == like.dtype else grad.astype(like.dtype)


def _times(a, b):
    """a * b, into a's memory where the dtypes agree (under autocast they may not: then out of
    place, in the promoted dtype, as torch's in-place product computes)."""
    return a.multiply_(b) if a.dtype == b.dtype else a * b


def _needs_grad(*tensors) -> bool:
    """Whether autograd will ask for a gradient: otherwise the fused forms are the references."""
    return paddle.is_grad_enabled() and any(not x.stop_gradient for x in tensors)


def _amp_state():
    """The arguments of the ``paddle.amp.auto_cast`` the forward runs under (None outside one)."""
    state = amp_state()
    return None if state is None else {name: state[name] for name in _AMP_ARGUMENTS}


def _amp(state):
    return contextlib.nullcontext() if state is None else paddle.amp.auto_cast(**state)


def _returned(grads, inputs, needs):
    """One gradient per tensor input: None where it has stop_gradient, zeros where the loss does
    not reach it (the outputs it feeds get no gradient), in its dtype."""
    return tuple((paddle.zeros_like(x) if g is None else _cast(g, x)) if need else None
                 for g, x, need in zip(grads, inputs, needs))


# ---- time mixing ------------------------------------------------------------------------
def time_mix_inputs_reference(att, x):
    """The plain form: x [N, T, D] -> (r, k, v, gate_pre, log_decay), each [N, T, D]."""
    n, t, d = x.shape
    delta = token_shift(x, att.bidirectional, att.q_shift_index) - x
    mixed = x + delta * att.time_maa_x
    lora = paddle.tanh(mixed @ att.time_maa_w1).reshape([n * t, 5, -1]).transpose([1, 0, 2])  # [5, NT, R]
    mw, mk, mv, mr, mg = paddle.bmm(lora, att.time_maa_w2).reshape([5, n, t, d]).unbind(0)
    xw = x + delta * (att.time_maa_w + mw)
    xk = x + delta * (att.time_maa_k + mk)
    xv = x + delta * (att.time_maa_v + mv)
    xr = x + delta * (att.time_maa_r + mr)
    xg = x + delta * (att.time_maa_g + mg)
    log_decay = -paddle.exp(att.time_decay + paddle.tanh(xw @ att.time_decay_w1) @ att.time_decay_w2)
    return att.receptance(xr), att.key(xk), att.value(xv), att.gate(xg), log_decay


def _lora_activations(mixed_x, maa_w1):
    """The five interpolations' LoRA activations tanh(mixed W1): [N, T, D] -> [N, T, 5R], branch b's
    in channels [bR, (b+1)R)."""
    return paddle.tanh(paddle.matmul(mixed_x, maa_w1))


class _TimeMixInputs(paddle.autograd.PyLayer):
    """Keeps x and the log-decay, which the WKV keeps anyway; recomputes the LoRA activations
    tanh(mixed W1) [N, T, 5R] and tanh(xw Wd1) [N, T, Rd] (narrow products) and the five
    interpolations."""

    @staticmethod
    def forward(ctx, x, shift, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, w_k, w_v, w_r, w_g):
        ctx.set_materialize_grads(False)  # an output the loss does not reach gets None, its branch is skipped
        inputs = (x, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, w_k, w_v, w_r, w_g)
        weights = {"k": w_k, "v": w_v, "r": w_r, "g": w_g}
        delta = token_shift(x, *shift.args) - x
        lora = _lora_activations(x + delta * maa_x, maa_w1)  # [N, T, 5R]
        outputs = {}
        for b, (name, lora_b) in enumerate(zip(TIME_MIX_BRANCHES, paddle.split(lora, 5, axis=-1))):
            mixed = x + delta * (maa[b] + paddle.matmul(lora_b, maa_w2[b]))
            if name == "w":
                decay_lora = paddle.tanh(paddle.matmul(mixed, decay_w1))  # not kept: recomputed in backward
                outputs[name] = -paddle.exp(decay + paddle.matmul(decay_lora, decay_w2))
            else:
                outputs[name] = paddle.matmul(mixed, weights[name])
            mixed = None  # not del: paddle.jit.to_static (SOT) loses a deleted loop variable
        ctx.shift = shift
        ctx.amp = _amp_state()
        ctx.needs_grad = [not t.stop_gradient for t in inputs]
        # the returned log-decay itself would tie the output to its own grad node: a cycle that
        # Paddle never frees when no backward pass runs; a detached alias shares its memory
        ctx.save_for_backward(x, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, outputs["w"].detach(),
                              w_k, w_v, w_r, w_g)
        return outputs["r"], outputs["k"], outputs["v"], outputs["g"], outputs["w"]

    @staticmethod
    def backward(ctx, grad_r, grad_k, grad_v, grad_gate, grad_log_decay):
        grads = {"r": grad_r, "k": grad_k, "v": grad_v, "g": grad_gate, "w": grad_log_decay}
        saved = ctx.saved_tensor()
        with _amp(ctx.amp), paddle.no_grad():
            result = _time_mix_inputs_backward(saved, ctx.shift, grads)
        inputs = (*saved[:8], *saved[9:])  # x, the mix and decay parameters, the four weights
        return _returned(result, inputs, ctx.needs_grad)


def _time_mix_inputs_backward(saved, shift, grads):
    x, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, log_decay, *weight_list = saved
    weights = dict(zip("kvrg", weight_list))
    delta = token_shift(x, *shift.args) - x
    mixed_x = x + delta * maa_x
    lora = _lora_activations(mixed_x, maa_w1)  # as the forward: the same products, the same values
    rank = maa_w2.shape[1]
    grad_x, grad_delta = paddle.zeros_like(x), paddle.zeros_like(x)
    grad_maa, grad_maa_w2, grad_lora = paddle.zeros_like(maa), paddle.zeros_like(maa_w2), paddle.zeros_like(lora)
    grad_weights = dict.fromkeys("kvrg")
    grad_decay = grad_decay_w1 = grad_decay_w2 = None
    for b, (name, lora_b) in enumerate(zip(TIME_MIX_BRANCHES, paddle.split(lora, 5, axis=-1))):
        if grads[name] is None:  # an output the loss does not reach
            continue
        coefficient = maa[b] + paddle.matmul(lora_b, maa_w2[b])  # out of place: fp32 under autocast, as the forward
        mixed = x + delta * coefficient
        if name == "w":
            decay_lora = paddle.tanh(paddle.matmul(mixed, decay_w1))  # as the forward
            grad_pre = grads["w"] * log_decay  # d(-exp(p))/dp = -exp(p), the log-decay itself
            grad_decay = _sum_tokens(grad_pre)
            grad_decay_w2 = _weight_grad(decay_lora, grad_pre)
            grad_hidden = paddle.matmul(grad_pre, decay_w2, transpose_y=True) * (1 - decay_lora * decay_lora)
            grad_decay_w1 = _weight_grad(mixed, grad_hidden)
            grad_mixed = paddle.matmul(grad_hidden, decay_w1, transpose_y=True)
            del decay_lora, grad_hidden
        else:
            grad_weights[name] = _weight_grad(mixed, grads[name])
            grad_mixed = paddle.matmul(grads[name], weights[name], transpose_y=True)
        del mixed
        grad_x.add_(_cast(grad_mixed, grad_x))
        grad_delta.add_(_cast(grad_mixed * coefficient, grad_delta))
        grad_coefficient = _times(grad_mixed, delta)
        grad_maa[b] = _cast(_sum_tokens(grad_coefficient), grad_maa)
        grad_maa_w2[b] = _cast(_weight_grad(lora_b, grad_coefficient), grad_maa_w2)
        grad_lora[:, :, b * rank:(b + 1) * rank] = _cast(paddle.matmul(grad_coefficient, maa_w2[b], transpose_y=True),
                                                         grad_lora)
        del grad_mixed, grad_coefficient, coefficient
    grad_lora_pre = grad_lora * (1 - lora * lora)
    del lora, grad_lora
    grad_maa_w1 = _weight_grad(mixed_x, grad_lora_pre)
    del mixed_x
    grad_mixed = paddle.matmul(grad_lora_pre, maa_w1, transpose_y=True)
    grad_x.add_(_cast(grad_mixed, grad_x))
    grad_delta.add_(_cast(grad_mixed * maa_x, grad_delta))
    grad_maa_x = _sum_tokens(grad_mixed * delta)
    grad_x.add_(token_shift_transpose(grad_delta, *shift.args) - grad_delta)
    return (grad_x, grad_maa_x, grad_maa, grad_maa_w1, grad_maa_w2, grad_decay, grad_decay_w1, grad_decay_w2,
            *(grad_weights[name] for name in "kvrg"))


def time_mix_inputs(att, x):
    """The fused form of ``time_mix_inputs_reference``: same arguments, same results."""
    params = [getattr(att, f"time_maa_{name}") for name in TIME_MIX_BRANCHES]
    rest = (att.time_maa_x, att.time_maa_w1, att.time_maa_w2, att.time_decay, att.time_decay_w1,
            att.time_decay_w2, att.key.weight, att.value.weight, att.receptance.weight, att.gate.weight)
    if not _needs_grad(x, *params, *rest):
        return time_mix_inputs_reference(att, x)
    maa = paddle.stack(params)
    return _TimeMixInputs.apply(x, _Shift(att.bidirectional, att.q_shift_index), att.time_maa_x, maa,
                                att.time_maa_w1, att.time_maa_w2, att.time_decay, att.time_decay_w1,
                                att.time_decay_w2, att.key.weight, att.value.weight, att.receptance.weight,
                                att.gate.weight)


def gated_output_reference(att, y, gate_pre):
    """The plain form: WKV output y and the gate before its SiLU, each [N, T, D] ->
    output(ln_x(y) * silu(gate_pre)), [N, T, D] (ln_x: a GroupNorm per head)."""
    n, t, d = y.shape
    return att.output(att.ln_x(y.reshape([n * t, d])).reshape([n, t, d]) * F.silu(gate_pre))


class _GatedOutput(paddle.autograd.PyLayer):
    """Keeps y, gate_pre and the per-head statistics [NT, H, 1]; the normalised and gated tensors
    (three D-sized tensors a token under autograd) are recomputed."""

    @staticmethod
    def forward(ctx, y, gate_pre, norm_weight, norm_bias, w_output, groups: int, eps: float):
        n, t, d = y.shape
        rows = y.reshape([n * t, groups, d // groups])
        rows = rows.astype(paddle.float64 if y.dtype == paddle.float64 else paddle.float32)
        mean = rows.mean(axis=-1, keepdim=True)
        centred = rows - mean
        inv_std = paddle.rsqrt((centred * centred).mean(axis=-1, keepdim=True) + eps)
        normed = (centred * inv_std).reshape([n, t, d]) * norm_weight + norm_bias
        del centred
        gated = normed * F.silu(gate_pre)
        del normed
        ctx.groups = groups
        ctx.amp = _amp_state()
        ctx.needs_grad = [not x.stop_gradient for x in (y, gate_pre, norm_weight, norm_bias, w_output)]
        ctx.save_for_backward(y, gate_pre, norm_weight, norm_bias, w_output, mean, inv_std)
        return paddle.matmul(gated, w_output)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensor()
        with _amp(ctx.amp), paddle.no_grad():
            result = _gated_output_backward(saved, ctx.groups, grad_out)
        return _returned(result, saved[:5], ctx.needs_grad)


def _gated_output_backward(saved, groups, grad_out):
    y, gate_pre, norm_weight, norm_bias, w_output, mean, inv_std = saved
    n, t, d = y.shape
    rows = y.reshape([n * t, groups, d // groups]).astype(mean.dtype)
    standardised = ((rows - mean) * inv_std).reshape([n, t, d])
    del rows
    sigmoid = F.sigmoid(gate_pre)
    gate = gate_pre * sigmoid
    normed = standardised * norm_weight + norm_bias
    grad_w_output = _weight_grad(normed * gate, grad_out)
    grad_gated = paddle.matmul(grad_out, w_output, transpose_y=True)
    grad_gate_pre = grad_gated * normed * (sigmoid * (1 + gate_pre * (1 - sigmoid)))  # silu'(p)
    del normed
    grad_normed = _times(grad_gated, gate)
    grad_norm_weight, grad_norm_bias = _sum_tokens(grad_normed * standardised), _sum_tokens(grad_normed)
    grad_std = (grad_normed * norm_weight).reshape([n * t, groups, d // groups])
    standardised = standardised.reshape([n * t, groups, d // groups])
    grad_rows = inv_std * (grad_std - grad_std.mean(axis=-1, keepdim=True)
                           - standardised * (grad_std * standardised).mean(axis=-1, keepdim=True))
    return grad_rows.reshape([n, t, d]), grad_gate_pre, grad_norm_weight, grad_norm_bias, grad_w_output


def gated_output(att, y, gate_pre):
    """The fused form of ``gated_output_reference``: same arguments, same result."""
    if not _needs_grad(y, gate_pre, att.ln_x.weight, att.ln_x.bias, att.output.weight):
        return gated_output_reference(att, y, gate_pre)
    return _GatedOutput.apply(y, gate_pre, att.ln_x.weight, att.ln_x.bias, att.output.weight, att.ln_x._num_groups,
                              att.ln_x._epsilon)


# ---- channel mixing ---------------------------------------------------------------------
def channel_mix_reference(ffn, x):
    """The plain form: x [N, T, D] -> sigmoid(Wr xr) * Wv(relu(Wk xk)^2), [N, T, D]."""
    delta = token_shift(x, ffn.bidirectional, ffn.q_shift_index) - x
    k = paddle.square(F.relu(ffn.key(x + delta * ffn.time_maa_k)))  # ** 2's backward is ~30x slower
    return F.sigmoid(ffn.receptance(x + delta * ffn.time_maa_r)) * ffn.value(k)


class _ChannelMix(paddle.autograd.PyLayer):
    """Keeps x, relu(Wk xk) [N, T, F], sigmoid(Wr xr) and Wv k^2: seven D-sized tensors a token
    where autograd keeps thirteen (the interpolations, the relu and its square)."""

    @staticmethod
    def forward(ctx, x, shift, maa_k, maa_r, w_key, w_receptance, w_value):
        delta = token_shift(x, *shift.args) - x
        hidden = F.relu(paddle.matmul(x + delta * maa_k, w_key))
        value = paddle.matmul(hidden * hidden, w_value)
        gate = F.sigmoid(paddle.matmul(x + delta * maa_r, w_receptance))
        ctx.shift = shift
        ctx.amp = _amp_state()
        ctx.needs_grad = [not t.stop_gradient for t in (x, maa_k, maa_r, w_key, w_receptance, w_value)]
        ctx.save_for_backward(x, maa_k, maa_r, w_key, w_receptance, w_value, hidden, gate, value)
        return gate * value

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensor()
        with _amp(ctx.amp), paddle.no_grad():
            result = _channel_mix_backward(saved, ctx.shift, grad_out)
        return _returned(result, saved[:6], ctx.needs_grad)


def _channel_mix_backward(saved, shift, grad_out):
    x, maa_k, maa_r, w_key, w_receptance, w_value, hidden, gate, value = saved
    delta = token_shift(x, *shift.args) - x
    grad_value = grad_out * gate
    grad_gate_pre = grad_out * value * gate * (1 - gate)
    grad_w_value = _weight_grad(hidden * hidden, grad_value)
    # in place: three [N, T, F] tensors at once would be the largest transient of the step
    grad_key_pre = paddle.matmul(grad_value, w_value, transpose_y=True)
    grad_key_pre = _times(grad_key_pre, hidden).scale_(2.0)  # d relu(p)^2 / dp = 2 relu(p)
    xk = x + delta * maa_k
    grad_w_key = _weight_grad(xk, grad_key_pre)
    del xk
    grad_xk = paddle.matmul(grad_key_pre, w_key, transpose_y=True)
    del grad_key_pre
    grad_w_receptance = _weight_grad(x + delta * maa_r, grad_gate_pre)
    grad_xr = paddle.matmul(grad_gate_pre, w_receptance, transpose_y=True)
    grad_maa_k, grad_maa_r = _sum_tokens(grad_xk * delta), _sum_tokens(grad_xr * delta)
    grad_delta = grad_xk * maa_k + grad_xr * maa_r
    grad_x = grad_xk + grad_xr + token_shift_transpose(grad_delta, *shift.args) - grad_delta
    return grad_x, grad_maa_k, grad_maa_r, grad_w_key, grad_w_receptance, grad_w_value


def channel_mix(ffn, x):
    """The fused form of ``channel_mix_reference``: same arguments, same result."""
    params = (ffn.time_maa_k, ffn.time_maa_r, ffn.key.weight, ffn.receptance.weight, ffn.value.weight)
    if not _needs_grad(x, *params):
        return channel_mix_reference(ffn, x)
    return _ChannelMix.apply(x, _Shift(ffn.bidirectional, ffn.q_shift_index), *params)


# ---- adaLN ------------------------------------------------------------------------------
def norm_modulate_reference(x, shift, scale, eps: float):
    """The plain form: x [N, T, D], shift and scale [N, D] -> LayerNorm(x) (no affine) * (1 + scale)
    + shift, [N, T, D]: adaLN's modulated input to a block's mixer."""
    normed = F.layer_norm(x, x.shape[-1], epsilon=eps)
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _NormModulate(paddle.autograd.PyLayer):
    """Keeps x (which the residual stream keeps anyway), shift, scale and the per-token inverse
    deviation [N, T, 1]; the normalised tensor autograd would keep is recomputed by Paddle's own
    layer-norm kernel (the forward's values, from x alone: the mean is not kept) and its gradient
    written out. The statistics and the backward pass are in fp32 at least."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps: float):
        rows = x.astype(paddle.float64 if x.dtype == paddle.float64 else paddle.float32)
        centred = rows - rows.mean(axis=-1, keepdim=True)  # not paddle.var: a composite of a dozen ops
        del rows
        inv_std = paddle.rsqrt(paddle.square(centred).mean(axis=-1, keepdim=True) + eps)
        del centred
        ctx.eps = eps
        ctx.needs_grad = [not t.stop_gradient for t in (x, shift, scale)]
        ctx.save_for_backward(x, shift, scale, inv_std)
        return norm_modulate_reference(x, shift, scale, eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, shift, scale, inv_std = ctx.saved_tensor()
        with paddle.no_grad():
            result = _norm_modulate_backward(x, scale, inv_std, ctx.eps, grad_out)
        return _returned(result, (x, shift, scale), ctx.needs_grad)


def _norm_modulate_backward(x, scale, inv_std, eps, grad_out):
    """grad_x = inv_std (g - mean(g) - xhat mean(g xhat)) with g = grad_out (1 + scale);
    grad_scale = sum over tokens of grad_out xhat; grad_shift = sum over tokens of grad_out."""
    normed = F.layer_norm(_cast(x, inv_std), x.shape[-1], epsilon=eps)  # xhat, in fp32 at least
    grad = _cast(grad_out, inv_std)
    grad_shift, grad_scale = grad.sum(axis=1), (grad * normed).sum(axis=1)
    grad = grad * (1 + _cast(scale, inv_std)).unsqueeze(1)  # out of place: grad_out is autograd's
    projection = (grad * normed).mean(axis=-1, keepdim=True)
    grad_x = grad.subtract_(grad.mean(axis=-1, keepdim=True)).subtract_(normed.multiply_(projection))
    return grad_x.multiply_(inv_std), grad_shift, grad_scale


def norm_modulate(x, shift, scale, eps: float):
    """The fused form of ``norm_modulate_reference``: same arguments, same result."""
    if not _needs_grad(x, shift, scale):
        return norm_modulate_reference(x, shift, scale, eps)
    return _NormModulate.apply(x, shift, scale, eps)
