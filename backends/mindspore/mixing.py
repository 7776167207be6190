"""RWKV-6's token mixing fused with the projections it feeds, and adaLN's norm-and-modulate, in MindSpore.

Mirrors ``backends/torch/mixing.py`` (its docstring gives the memory accounting): time mixing
interpolates each token with its shifted neighbour five ways (w, k, v, r, g: a data-dependent
LoRA mix) and channel mixing two ways; each interpolation is a [N, T, D] tensor that only one
projection reads. Autodiff keeps all of them; the hand-written backward passes here keep the
block's input and what the next op keeps anyway (r, k, v, the log-decay), and recompute the rest -
the interpolations and the two narrow LoRA products, elementwise work - one branch at a time.
Torch's forms run over blocks of tokens (``ROW_BLOCK_ELEMENTS``) so that no pass makes an
[N, T, *] temporary; these do not block: each pass works on the whole [N, T, *] tensors.

One calling convention, a plain reference beside each fast form (tests tie them):

    time_mix_inputs(att, x)   / time_mix_inputs_reference(att, x)
        x [N, T, D] -> r, k, v, gate_pre (the gate before its SiLU), log_decay: each [N, T, D]
    gated_output(att, y, gate_pre) / gated_output_reference(att, y, gate_pre)
        WKV output y, gate_pre [N, T, D] -> output(ln_x(y) * silu(gate_pre)) [N, T, D]
    channel_mix(ffn, x)       / channel_mix_reference(ffn, x)
        x [N, T, D] -> [N, T, D]
    norm_modulate(x, shift, scale, eps) / norm_modulate_reference(x, shift, scale, eps)
        x [N, T, D], shift and scale [N, D] -> LayerNorm(x) * (1 + scale) + shift [N, T, D]

``att`` and ``ffn`` are a ``TimeMix`` and a ``ChannelMix`` of ``backends/mindspore/models.py``
(only their parameters and shift settings are read).

MindSpore idiom: each fast form is a Cell with a hand-written ``bprop`` (as ``wkv._WKV6``). A
Cell's ``bprop`` sees only its inputs, its outputs and their gradients, so the parameters are
construct inputs (the ``bprop`` returns their gradients) and what the backward pass needs beyond
the inputs - the GroupNorm's and the LayerNorm's per-row mean and inverse deviation, relu(Wk xk),
sigmoid(Wr xr), Wv k^2 - are extra outputs, which the public functions drop.
A ``bprop`` is handed every output of its Cell, so MindSpore may hold the public ones too: r,
k, v and gate_pre, which the WKV and the gated output keep anyway, and the outputs of the
gated output and the channel mix, which the block's gates keep anyway (and norm_modulate's,
which the mixer it feeds keeps). There is no autocast in the MindSpore backend, so the
backward passes run in the inputs' dtype.

Unlike ``wkv._WKV6``'s, these ``bprop``s compile: PyNative and Graph mode (``ms.jit``) alike take
the fused forms, so there is no branch to choose (``tests/test_mindspore_mixing.py`` checks both).
MindSpore 2.10 cannot compile a ``bprop`` that calls a function with a Python branch which the
construct calls too, so the Cells and every helper they share call primitives only (see below),
and the token shift's cases are written out in each construct and ``bprop``.
"""
from __future__ import annotations

import functools

import numpy as np
from mindspore import Tensor, nn, ops

TIME_MIX_BRANCHES = ("w", "k", "v", "r", "g")  # the order of time_maa_w1's and time_maa_w2's blocks

# Primitives, not the ``ops`` functions: Graph mode cannot compile a ``bprop`` that calls a function
# with a Python branch which the construct calls too (``backends/mindspore/wkv.py: _WKV6``), and
# ops.zeros_like, ops.split, ops.matmul, Tensor.reshape, slicing ... are such functions. The fused
# Cells' bodies (and every helper they share) use only these and arithmetic operators.
_matmul_nn = ops.MatMul()
_matmul_nt = ops.MatMul(transpose_b=True)  # a @ b^T
_matmul_tn = ops.MatMul(transpose_a=True)  # a^T @ b
_reshape, _transpose, _slice, _gather = ops.Reshape(), ops.Transpose(), ops.Slice(), ops.Gather()
_pad_before = ops.Pad(((0, 0), (1, 0), (0, 0)))  # a zero token before the first, [N, T, D] -> [N, T+1, D]
_pad_after = ops.Pad(((0, 0), (0, 1), (0, 0)))  # and after the last
_segment_sum = ops.UnsortedSegmentSum()
_sum, _mean = ops.ReduceSum(), ops.ReduceMean(keep_dims=True)
_tanh, _exp, _sigmoid, _relu, _rsqrt = ops.Tanh(), ops.Exp(), ops.Sigmoid(), ops.ReLU(), ops.Rsqrt()
_split_branches = ops.Split(axis=-1, output_num=len(TIME_MIX_BRANCHES))
_unstack, _stack, _concat_channels = ops.Unstack(axis=0), ops.Stack(axis=0), ops.Concat(-1)
_zeros_like = ops.ZerosLike()


def token_shift(x, bidirectional: bool, q_shift_index=None):
    """The neighbour each token mixes with: x_{t-1}, or the mean of x_{t-1} and x_{t+1}; or,
    given q_shift's gather index ([4T], ``common.scan_orders.q_shift_index``), each channel
    quarter from one of the four grid neighbours.

    x [N, T, D]; tokens past either end (or the grid's border) are zero.
    """
    if q_shift_index is not None:
        return _gathered(x, q_shift_index)
    return _mean_of_neighbours(x) if bidirectional else _previous(x)


def token_shift_transpose(grad, bidirectional: bool, q_shift_index=None):
    """The adjoint of ``token_shift``: the gradient of x given the shifted tensor's gradient.
    [N, T, D] -> [N, T, D]. A shift to the previous token is undone by a shift to the following
    one; the bidirectional mean is its own adjoint; q_shift's gather becomes a scatter-add
    (``unsorted_segment_sum`` over the gathered rows)."""
    if q_shift_index is not None:
        return _scattered(grad, q_shift_index)
    return _mean_of_neighbours(grad) if bidirectional else _following(grad)


# The shifts one by one, without a Python branch (see the primitives above): the fused Cells pick
# among them in their own bodies. [N, T, D] -> [N, T, D].
def _previous(x):
    n, t, d = x.shape
    return _slice(_pad_before(x), (0, 0, 0), (n, t, d))


def _following(x):
    n, t, d = x.shape
    return _slice(_pad_after(x), (0, 1, 0), (n, t, d))


def _mean_of_neighbours(x):
    return 0.5 * (_previous(x) + _following(x))


def _gathered(x, index):
    """q_shift: [N, T+1, D] (a zero token after the last) viewed as [N, 4(T+1), D/4], gathered."""
    n, t, d = x.shape
    return _reshape(_gather(_reshape(_pad_after(x), (n, 4 * (t + 1), d // 4)), index, 1), (n, t, d))


def _scattered(grad, index):
    """The adjoint of ``_gathered``: the gathered rows summed back into place (the zero token dropped)."""
    n, t, d = grad.shape
    rows = _transpose(_reshape(grad, (n, 4 * t, d // 4)), (1, 0, 2))  # [4T, N, D/4]: the segments are rows
    quarters = _transpose(_segment_sum(rows, index, 4 * (t + 1)), (1, 0, 2))
    return _slice(_reshape(quarters, (n, t + 1, d)), (0, 0, 0), (n, t, d))


def _add_shift_transpose(grad_x, grad_delta, index, q_shift: bool, bidirectional: bool):
    """x's gradient plus that of delta = token_shift(x) - x (the bprops' share of
    ``token_shift_transpose``; the shift's kind is a constant of the cell, so Graph mode folds the
    branch)."""
    if q_shift:
        return grad_x + _scattered(grad_delta, index) - grad_delta
    if bidirectional:
        return grad_x + _mean_of_neighbours(grad_delta) - grad_delta
    return grad_x + _following(grad_delta) - grad_delta


def _rows(x):
    """[N, T, C] -> [N*T, C]."""
    return _reshape(x, (-1, x.shape[-1]))


def _tokens(x, like):
    """[N*T, C] -> [N, T, C], N and T those of ``like``."""
    return _reshape(x, (like.shape[0], like.shape[1], x.shape[-1]))


def _sum_tokens(x):
    """[N, T, D] -> [D]: the gradient of a per-channel parameter broadcast over tokens."""
    return _sum(_rows(x), 0)


def _weight_grad(grad_out, inputs):
    """grad [N, T, O], inputs [N, T, I] -> [O, I]: a bias-free Dense's weight gradient."""
    return _matmul_tn(_rows(grad_out), _rows(inputs))


def _matmul(x, weight):
    """x [N, T, I] @ weight [I, O] -> [N, T, O], as one 2-D matmul."""
    return _tokens(_matmul_nn(_rows(x), weight), x)


def _linear(x, weight):
    """x [N, T, I] times a Dense weight [O, I] -> [N, T, O] (what a bias-free ``nn.Dense`` computes)."""
    return _tokens(_matmul_nt(_rows(x), weight), x)


def _linear_transpose(grad, weight):
    """The input gradient of ``_linear``: grad [N, T, O], weight [O, I] -> [N, T, I]."""
    return _tokens(_matmul_nn(_rows(grad), weight), grad)


def _matmul_transpose(grad, weight):
    """The input gradient of ``_matmul``: grad [N, T, O], weight [I, O] -> [N, T, I]."""
    return _tokens(_matmul_nt(_rows(grad), weight), grad)


_NO_INDEX = Tensor(np.zeros(1, np.int32))  # the index input of a fused Cell without q_shift (unread)


def _shift_inputs(module):
    """(the fused Cell's shift settings, its index input): q_shift's index travels as an input."""
    index = module.q_shift_index
    return (module.bidirectional, index is not None), (_NO_INDEX if index is None else index)


# ---- time mixing ------------------------------------------------------------------------
def time_mix_inputs_reference(att, x):
    """The plain form: x [N, T, D] -> (r, k, v, gate_pre, log_decay), each [N, T, D]."""
    n, t, d = x.shape
    delta = token_shift(x, att.bidirectional, att.q_shift_index) - x
    mixed = x + delta * att.time_maa_x
    lora = ops.tanh(ops.matmul(mixed, att.time_maa_w1)).reshape(n * t, 5, -1).swapaxes(0, 1)  # [5, NT, R]
    # unstack, not m[0]..m[4]: five slices cost five strided-slice gradients on CPU
    mw, mk, mv, mr, mg = ops.unstack(ops.bmm(lora, att.time_maa_w2).reshape(5, n, t, d), 0)
    xw = x + delta * (att.time_maa_w + mw)
    xk = x + delta * (att.time_maa_k + mk)
    xv = x + delta * (att.time_maa_v + mv)
    xr = x + delta * (att.time_maa_r + mr)
    xg = x + delta * (att.time_maa_g + mg)
    log_decay = -ops.exp(att.time_decay + ops.matmul(ops.tanh(ops.matmul(xw, att.time_decay_w1)), att.time_decay_w2))
    return att.receptance(xr), att.key(xk), att.value(xv), att.gate(xg), log_decay


class _TimeMixInputs(nn.Cell):
    """Keeps x and the log-decay, which the WKV keeps anyway; recomputes the LoRA activations
    tanh(mixed W1) [N, T, 5R] and tanh(xw Wd1) [N, T, Rd] (narrow products) and the five
    interpolations.

    construct(x, index, maa_x, maa [5, D], maa_w1, maa_w2, decay, decay_w1, decay_w2, w_k, w_v, w_r, w_g)
    -> (r, k, v, gate_pre, log_decay): no extra output.
    """

    def __init__(self, bidirectional: bool, q_shift: bool):
        super().__init__()
        self.bidirectional, self.q_shift = bidirectional, q_shift

    def construct(self, x, index, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, w_k, w_v, w_r, w_g):
        if self.q_shift:  # token_shift, its cases written out (see the primitives at the top)
            delta = _gathered(x, index) - x
        elif self.bidirectional:
            delta = _mean_of_neighbours(x) - x
        else:
            delta = _previous(x) - x
        lora = _tanh(_matmul(x + delta * maa_x, maa_w1))  # [N, T, 5R]
        parts = _branch_parts(lora, maa, maa_w2)
        # one interpolation at a time, in TIME_MIX_BRANCHES order (w, k, v, r, g)
        decay_lora = _tanh(_matmul(_mixed(x, delta, parts, 0), decay_w1))
        log_decay = -_exp(decay + _matmul(decay_lora, decay_w2))
        k = _linear(_mixed(x, delta, parts, 1), w_k)
        v = _linear(_mixed(x, delta, parts, 2), w_v)
        r = _linear(_mixed(x, delta, parts, 3), w_r)
        gate_pre = _linear(_mixed(x, delta, parts, 4), w_g)
        return r, k, v, gate_pre, log_decay

    def bprop(self, x, index, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, w_k, w_v, w_r, w_g, out, dout):
        if self.q_shift:
            delta = _gathered(x, index) - x
        elif self.bidirectional:
            delta = _mean_of_neighbours(x) - x
        else:
            delta = _previous(x) - x
        grads = _time_mix_inputs_backward(
            (x, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, out[4], w_k, w_v, w_r, w_g),
            delta, (dout[0], dout[1], dout[2], dout[3], dout[4]))
        grad_x = _add_shift_transpose(grads[0], grads[1], index, self.q_shift, self.bidirectional)
        return (grad_x, _zeros_like(index), grads[2], grads[3], grads[4], grads[5], grads[6], grads[7], grads[8],
                grads[9], grads[10], grads[11], grads[12])


def _branch_parts(lora, maa, maa_w2):
    """lora [N, T, 5R], maa [5, D], maa_w2 [5, R, D] -> each branch's (lora_b, maa_b, W2_b), in
    TIME_MIX_BRANCHES order (``_coefficient`` combines them)."""
    return _split_branches(lora), _unstack(maa), _unstack(maa_w2)


def _coefficient(parts, b: int):
    """Branch b's interpolation coefficient maa_b + lora_b W2_b, [N, T, D]."""
    loras, maa, lora_w2 = parts
    return maa[b] + _matmul(loras[b], lora_w2[b])


def _mixed(x, delta, parts, b: int):
    """Branch b's interpolation x + (x_shifted - x) * coefficient, [N, T, D]."""
    return x + delta * _coefficient(parts, b)


def _time_mix_inputs_backward(saved, delta, grads):
    """Given the gradients of (r, k, v, gate_pre, log_decay) - zeros for an output the loss does
    not reach - and delta = token_shift(x) - x: x's gradient but for the shift's, delta's gradient
    (the caller adds token_shift_transpose(it) - it to x's), and those of the parameter inputs
    (``_TimeMixInputs.construct`` order). The branches one at a time, as ``backends/torch/mixing.py``
    (written out: Graph mode compiles no loop whose accumulators start as None). The LoRA
    activations are recomputed as the forward computed them: the same products, the same values."""
    x, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2, log_decay, w_k, w_v, w_r, w_g = saved
    grad_r, grad_k, grad_v, grad_gate, grad_log_decay = grads
    mixed_x = x + delta * maa_x
    lora = _tanh(_matmul(mixed_x, maa_w1))  # [N, T, 5R]
    parts = _branch_parts(lora, maa, maa_w2)
    # w: the decay's own LoRA
    coefficient = _coefficient(parts, 0)
    mixed_w = x + delta * coefficient
    decay_lora = _tanh(_matmul(mixed_w, decay_w1))  # [N, T, Rd]
    grad_pre = grad_log_decay * log_decay  # d(-exp(p))/dp = -exp(p), the log-decay itself
    grad_decay = _sum_tokens(grad_pre)
    grad_decay_w2 = _weight_grad(decay_lora, grad_pre)
    grad_hidden = _matmul_transpose(grad_pre, decay_w2) * (1 - decay_lora * decay_lora)
    grad_decay_w1 = _weight_grad(mixed_w, grad_hidden)
    grad_mixed_w = _matmul_transpose(grad_hidden, decay_w1)
    mix_w = _branch_backward(delta, parts, 0, coefficient, grad_mixed_w)
    # k, v, r, g: a projection each
    grad_w_k, grad_mixed_k, mix_k = _projection_branch_backward(x, delta, parts, 1, grad_k, w_k)
    grad_w_v, grad_mixed_v, mix_v = _projection_branch_backward(x, delta, parts, 2, grad_v, w_v)
    grad_w_r, grad_mixed_r, mix_r = _projection_branch_backward(x, delta, parts, 3, grad_r, w_r)
    grad_w_g, grad_mixed_g, mix_g = _projection_branch_backward(x, delta, parts, 4, grad_gate, w_g)
    grad_x = grad_mixed_w + grad_mixed_k + grad_mixed_v + grad_mixed_r + grad_mixed_g
    grad_delta = mix_w[0] + mix_k[0] + mix_v[0] + mix_r[0] + mix_g[0]
    grad_maa = _stack((mix_w[1], mix_k[1], mix_v[1], mix_r[1], mix_g[1]))
    grad_maa_w2 = _stack((mix_w[2], mix_k[2], mix_v[2], mix_r[2], mix_g[2]))
    grad_lora = _concat_channels((mix_w[3], mix_k[3], mix_v[3], mix_r[3], mix_g[3]))
    # the shared LoRA tanh(mixed W1)
    grad_lora_pre = grad_lora * (1 - lora * lora)
    grad_maa_w1 = _weight_grad(mixed_x, grad_lora_pre)
    grad_mixed = _matmul_transpose(grad_lora_pre, maa_w1)
    grad_x = grad_x + grad_mixed
    grad_delta = grad_delta + grad_mixed * maa_x
    grad_maa_x = _sum_tokens(grad_mixed * delta)
    return (grad_x, grad_delta, grad_maa_x, grad_maa, grad_maa_w1, grad_maa_w2, grad_decay, grad_decay_w1,
            grad_decay_w2, grad_w_k, grad_w_v, grad_w_r, grad_w_g)


def _projection_branch_backward(x, delta, parts, b: int, grad, weight):
    """Branch b (k, v, r or g) read by a Dense: (its weight's gradient, the gradient of its
    interpolation, ``_branch_backward``'s terms); the interpolation recomputed and dropped."""
    coefficient = _coefficient(parts, b)
    grad_weight = _weight_grad(grad, x + delta * coefficient)
    grad_mixed = _linear_transpose(grad, weight)
    return grad_weight, grad_mixed, _branch_backward(delta, parts, b, coefficient, grad_mixed)


def _branch_backward(delta, parts, b: int, coefficient, grad_mixed):
    """Through branch b's interpolation x + delta * (maa_b + lora_b W2_b), given its gradient:
    (delta's term, maa_b's, W2_b's, lora_b's)."""
    grad_coefficient = grad_mixed * delta
    return (grad_mixed * coefficient, _sum_tokens(grad_coefficient), _weight_grad(parts[0][b], grad_coefficient),
            _matmul_transpose(grad_coefficient, parts[2][b]))


@functools.lru_cache(maxsize=16)
def _time_mix_cell(bidirectional: bool, q_shift: bool) -> _TimeMixInputs:
    return _TimeMixInputs(bidirectional, q_shift)


def time_mix_inputs(att, x):
    """The fused form of ``time_mix_inputs_reference``: same arguments, same results."""
    maa = ops.stack([att.time_maa_w, att.time_maa_k, att.time_maa_v, att.time_maa_r, att.time_maa_g], 0)
    shift, index = _shift_inputs(att)
    return _time_mix_cell(*shift)(x, index, att.time_maa_x, maa, att.time_maa_w1, att.time_maa_w2, att.time_decay,
                                  att.time_decay_w1, att.time_decay_w2, att.key.weight, att.value.weight,
                                  att.receptance.weight, att.gate.weight)


def gated_output_reference(att, y, gate_pre):
    """The plain form: WKV output y and the gate before its SiLU, each [N, T, D] ->
    output(ln_x(y) * silu(gate_pre)), [N, T, D] (ln_x: a GroupNorm per head)."""
    n, t, d = y.shape
    return att.output(att.ln_x(y.reshape(n * t, d)).reshape(n, t, d) * ops.silu(gate_pre))


class _GatedOutput(nn.Cell):
    """Keeps y, gate_pre and the per-head statistics [NT, H, 1]; the normalised and gated tensors
    (three D-sized tensors a token under autodiff) are recomputed.

    construct(y, gate_pre, norm_weight, norm_bias, w_output) -> (out, mean, inv_std): the
    statistics only for ``bprop``.
    """

    def __init__(self, groups: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps

    def construct(self, y, gate_pre, norm_weight, norm_bias, w_output):
        n, t, d = y.shape
        rows = _reshape(y, (n * t, self.groups, d // self.groups))
        mean = _mean(rows, -1)
        centered = rows - mean
        inv_std = _rsqrt(_mean(centered * centered, -1) + self.eps)
        normed = _reshape(centered * inv_std, (n, t, d)) * norm_weight + norm_bias
        return _linear(normed * (gate_pre * _sigmoid(gate_pre)), w_output), mean, inv_std

    def bprop(self, y, gate_pre, norm_weight, norm_bias, w_output, out, dout):
        return _gated_output_backward((y, gate_pre, norm_weight, norm_bias, w_output, out[1], out[2]), self.groups,
                                      dout[0])


def _gated_output_backward(saved, groups, grad_out):
    y, gate_pre, norm_weight, norm_bias, w_output, mean, inv_std = saved
    n, t, d = y.shape
    standardised = _reshape((_reshape(y, (n * t, groups, d // groups)) - mean) * inv_std, (n, t, d))
    sigmoid = _sigmoid(gate_pre)
    gate = gate_pre * sigmoid
    normed = standardised * norm_weight + norm_bias
    grad_w_output = _weight_grad(grad_out, normed * gate)
    grad_gated = _linear_transpose(grad_out, w_output)
    grad_gate_pre = grad_gated * normed * (sigmoid * (1 + gate_pre * (1 - sigmoid)))  # silu'(p)
    grad_normed = grad_gated * gate
    grad_norm_weight, grad_norm_bias = _sum_tokens(grad_normed * standardised), _sum_tokens(grad_normed)
    grad_std = _reshape(grad_normed * norm_weight, (n * t, groups, d // groups))
    standardised = _reshape(standardised, (n * t, groups, d // groups))
    grad_rows = inv_std * (grad_std - _mean(grad_std, -1) - standardised * _mean(grad_std * standardised, -1))
    return _reshape(grad_rows, (n, t, d)), grad_gate_pre, grad_norm_weight, grad_norm_bias, grad_w_output


@functools.lru_cache(maxsize=16)
def _gated_output_cell(groups: int, eps: float) -> _GatedOutput:
    return _GatedOutput(groups, eps)


def gated_output(att, y, gate_pre):
    """The fused form of ``gated_output_reference``: same arguments, same result."""
    return _gated_output_cell(att.ln_x.num_groups, att.ln_x.eps)(y, gate_pre, att.ln_x.gamma, att.ln_x.beta,
                                                                  att.output.weight)[0]


# ---- channel mixing ---------------------------------------------------------------------
def channel_mix_reference(ffn, x):
    """The plain form: x [N, T, D] -> sigmoid(Wr xr) * Wv(relu(Wk xk)^2), [N, T, D]."""
    delta = token_shift(x, ffn.bidirectional, ffn.q_shift_index) - x
    k = ops.relu(ffn.key(x + delta * ffn.time_maa_k))
    return ops.sigmoid(ffn.receptance(x + delta * ffn.time_maa_r)) * ffn.value(k * k)


class _ChannelMix(nn.Cell):
    """Keeps x, relu(Wk xk) [N, T, F], sigmoid(Wr xr) and Wv k^2: seven D-sized tensors a token
    where autodiff keeps thirteen (the interpolations, the relu and its square).

    construct(x, index, maa_k, maa_r, w_key, w_receptance, w_value) -> (out, hidden, gate, value):
    the last three only for ``bprop``.
    """

    def __init__(self, bidirectional: bool, q_shift: bool):
        super().__init__()
        self.bidirectional, self.q_shift = bidirectional, q_shift

    def construct(self, x, index, maa_k, maa_r, w_key, w_receptance, w_value):
        if self.q_shift:  # token_shift, its cases written out (see the primitives at the top)
            delta = _gathered(x, index) - x
        elif self.bidirectional:
            delta = _mean_of_neighbours(x) - x
        else:
            delta = _previous(x) - x
        hidden = _relu(_linear(x + delta * maa_k, w_key))
        value = _linear(hidden * hidden, w_value)
        gate = _sigmoid(_linear(x + delta * maa_r, w_receptance))
        return gate * value, hidden, gate, value

    def bprop(self, x, index, maa_k, maa_r, w_key, w_receptance, w_value, out, dout):
        if self.q_shift:
            delta = _gathered(x, index) - x
        elif self.bidirectional:
            delta = _mean_of_neighbours(x) - x
        else:
            delta = _previous(x) - x
        grads = _channel_mix_backward((x, maa_k, maa_r, w_key, w_receptance, w_value, out[1], out[2], out[3]), delta,
                                      dout[0])
        grad_x = _add_shift_transpose(grads[0], grads[1], index, self.q_shift, self.bidirectional)
        return grad_x, _zeros_like(index), grads[2], grads[3], grads[4], grads[5], grads[6]


def _channel_mix_backward(saved, delta, grad_out):
    """As ``_time_mix_inputs_backward``: (x's gradient but for the shift's, delta's, the parameters')."""
    x, maa_k, maa_r, w_key, w_receptance, w_value, hidden, gate, value = saved
    grad_value = grad_out * gate
    grad_gate_pre = grad_out * value * gate * (1 - gate)
    grad_w_value = _weight_grad(grad_value, hidden * hidden)
    grad_key_pre = _linear_transpose(grad_value, w_value) * hidden * 2  # d relu(p)^2 / dp = 2 relu(p)
    grad_w_key = _weight_grad(grad_key_pre, x + delta * maa_k)
    grad_xk = _linear_transpose(grad_key_pre, w_key)
    grad_w_receptance = _weight_grad(grad_gate_pre, x + delta * maa_r)
    grad_xr = _linear_transpose(grad_gate_pre, w_receptance)
    grad_maa_k, grad_maa_r = _sum_tokens(grad_xk * delta), _sum_tokens(grad_xr * delta)
    grad_delta = grad_xk * maa_k + grad_xr * maa_r
    return grad_xk + grad_xr, grad_delta, grad_maa_k, grad_maa_r, grad_w_key, grad_w_receptance, grad_w_value


@functools.lru_cache(maxsize=16)
def _channel_mix_cell(bidirectional: bool, q_shift: bool) -> _ChannelMix:
    return _ChannelMix(bidirectional, q_shift)


def channel_mix(ffn, x):
    """The fused form of ``channel_mix_reference``: same arguments, same result."""
    shift, index = _shift_inputs(ffn)
    return _channel_mix_cell(*shift)(x, index, ffn.time_maa_k, ffn.time_maa_r, ffn.key.weight,
                                     ffn.receptance.weight, ffn.value.weight)[0]


# ---- adaLN ------------------------------------------------------------------------------
def _layer_norm(x, eps: float):
    """LayerNorm over the last dim without affine parameters: what ``models.LayerNorm`` (DiT's
    adaLN norm) computes - it calls this - and so what ``norm_modulate_reference`` normalises with."""
    mean = x.mean(-1, keep_dims=True)
    centered = x - mean
    variance = (centered * centered).mean(-1, keep_dims=True)
    return centered * ops.rsqrt(variance + eps)


def norm_modulate_reference(x, shift, scale, eps: float):
    """The plain form: x [N, T, D], shift and scale [N, D] -> LayerNorm(x) (no affine) * (1 + scale)
    + shift, [N, T, D]: adaLN's modulated input to a block's mixer."""
    return _layer_norm(x, eps) * (1 + scale.expand_dims(1)) + shift.expand_dims(1)


class _NormModulate(nn.Cell):
    """Keeps x (which the residual stream keeps anyway) and the per-token mean and inverse deviation
    [N, T, 1]; the normalised tensor autodiff would keep is recomputed.

    construct(x, shift, scale) -> (out, mean, inv_std): the statistics only for ``bprop``.
    """

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def construct(self, x, shift, scale):
        n, _, d = x.shape
        mean = _mean(x, -1)
        centered = x - mean
        inv_std = _rsqrt(_mean(centered * centered, -1) + self.eps)
        out = centered * inv_std * (1 + _reshape(scale, (n, 1, d))) + _reshape(shift, (n, 1, d))
        return out, mean, inv_std

    def bprop(self, x, shift, scale, out, dout):
        return _norm_modulate_backward(x, scale, out[1], out[2], dout[0])


def _sum_each_sample(x):
    """[N, T, D] -> [N, D]: the gradient of a per-sample vector broadcast over its tokens."""
    return _sum(x, 1)


def _norm_modulate_backward(x, scale, mean, inv_std, grad_out):
    """(x's gradient, shift's, scale's), the normalised tensor recomputed from x and the statistics."""
    n, _, d = x.shape
    normed = (x - mean) * inv_std
    grad_normed = grad_out * (1 + _reshape(scale, (n, 1, d)))
    grad_x = inv_std * (grad_normed - _mean(grad_normed, -1) - normed * _mean(grad_normed * normed, -1))
    return grad_x, _sum_each_sample(grad_out), _sum_each_sample(grad_out * normed)


@functools.lru_cache(maxsize=16)
def _norm_modulate_cell(eps: float) -> _NormModulate:
    return _NormModulate(eps)


def norm_modulate(x, shift, scale, eps: float):
    """The fused form of ``norm_modulate_reference``: same arguments, same result."""
    return _norm_modulate_cell(eps)(x, shift, scale)[0]
