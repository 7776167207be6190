"""DiR: DiT's diffusion backbone with RWKV-6 blocks, in PaddlePaddle.

Shapes: N images, T = (input_size / patch_size)**2 tokens, D = hidden_size,
H heads of K = head_size channels. Parameter names equal the canonical names of
``common/params.py``; weights are loaded from (and exported to) that table through
``common/param_mapping.py`` (Paddle's Linear weight is [in, out], the transpose of
the canonical layout; nothing else differs), so init is the numpy init shared by
every backend, not Paddle's.
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn as nn
from paddle.distributed.fleet.utils import recompute as fleet_recompute

from backends.paddle.mixing import channel_mix, gated_output, norm_modulate, time_mix_inputs
from backends.paddle.wkv import wkv6
from common.params import check_state, init_canonical, sincos_pos_embed_2d
from common.scan_orders import BlockLayout
from common.spec import FREQUENCY_EMBEDDING_SIZE, GROUP_NORM_EPS, LAYER_NORM_EPS, MAX_PERIOD, TEXT_NORM_EPS, DiRSpec
from common.text import EOS_ID


def modulate(x, shift, scale):
    """adaLN: x [N, T, D]; shift, scale [N, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _zeros_parameter(layer: nn.Layer, shape):
    return layer.create_parameter(shape=list(shape), dtype="float32",
                                  default_initializer=nn.initializer.Constant(0.0))


class PatchEmbed(nn.Layer):
    """[N, C, H, W] -> [N, T, D] by a stride-p convolution."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        self.proj = nn.Conv2D(spec.in_channels, spec.hidden_size, spec.patch_size, stride=spec.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose([0, 2, 1])


class TimestepEmbedder(nn.Layer):
    """Scalar timesteps [N] -> [N, D]: sinusoidal features, then an MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.Silu(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t, dim: int = FREQUENCY_EMBEDDING_SIZE):
        half = dim // 2
        freqs = paddle.exp(-math.log(MAX_PERIOD) * paddle.arange(half, dtype="float32") / half)
        args = t.astype("float32")[:, None] * freqs[None]
        return paddle.concat([paddle.cos(args), paddle.sin(args)], axis=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t))


class LabelEmbedder(nn.Layer):
    """Class labels [N] -> [N, D]. With ``dropout_prob > 0`` the table has an extra "null" row
    (id ``num_classes``) for classifier-free guidance; the trainer draws which labels become
    null (``common.objectives.step_draws``) and passes them as that id."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


def first_eos_position(ids):
    """[N, L] token ids -> [N] int64: each row's first end-of-text position, 0 when it has none
    (computed without relying on how argmax breaks ties)."""
    length = ids.shape[1]
    weight = (ids == EOS_ID).astype("int64") * (length - paddle.arange(length, dtype="int64"))
    best = weight.max(axis=1)
    return paddle.where(best > 0, length - best, paddle.zeros_like(best))


def index_buffer(values):
    """A constant int64 index (moves with the layer, never saved), or None."""
    return None if values is None else paddle.to_tensor(values)


class TimeMix(nn.Layer):
    """RWKV-6 time mixing: data-dependent token shift and decay, WKV6 over H heads.

    [N, T, D] -> [N, T, D], the tokens in the block's order.
    """

    def __init__(self, spec: DiRSpec, layout: BlockLayout):
        super().__init__()
        d = spec.hidden_size
        self.num_heads, self.head_size = spec.num_heads, spec.head_size
        self.bidirectional = spec.scan == "bidirectional"
        self.register_buffer("q_shift_index", index_buffer(layout.q_shift_index), persistable=False)
        for branch in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{branch}", _zeros_parameter(self, [d]))
        self.time_maa_w1 = _zeros_parameter(self, [d, 5 * spec.mix_lora_rank])
        self.time_maa_w2 = _zeros_parameter(self, [5, spec.mix_lora_rank, d])
        self.time_decay = _zeros_parameter(self, [d])
        self.time_decay_w1 = _zeros_parameter(self, [d, spec.decay_lora_rank])
        self.time_decay_w2 = _zeros_parameter(self, [spec.decay_lora_rank, d])
        self.time_faaaa = _zeros_parameter(self, [spec.num_heads, spec.head_size])
        self.receptance = nn.Linear(d, d, bias_attr=False)
        self.key = nn.Linear(d, d, bias_attr=False)
        self.value = nn.Linear(d, d, bias_attr=False)
        self.gate = nn.Linear(d, d, bias_attr=False)
        self.output = nn.Linear(d, d, bias_attr=False)
        self.ln_x = nn.GroupNorm(spec.num_heads, d, epsilon=GROUP_NORM_EPS)

    def forward(self, x):
        n, t, d = x.shape
        r, k, v, gate_pre, log_decay = time_mix_inputs(self, x)
        heads = [n, t, self.num_heads, self.head_size]
        y = wkv6(r.reshape(heads), k.reshape(heads), v.reshape(heads), log_decay.reshape(heads), self.time_faaaa,
                 bidirectional=self.bidirectional)
        return gated_output(self, y.reshape([n, t, d]), gate_pre)


class ChannelMix(nn.Layer):
    """RWKV channel mixing: sigmoid(Wr xr) * Wv(relu(Wk xk)^2). [N, T, D] -> [N, T, D]."""

    def __init__(self, spec: DiRSpec, layout: BlockLayout):
        super().__init__()
        d, f = spec.hidden_size, spec.ffn_hidden_size
        self.bidirectional = spec.scan == "bidirectional"
        self.register_buffer("q_shift_index", index_buffer(layout.q_shift_index), persistable=False)
        self.time_maa_k = _zeros_parameter(self, [d])
        self.time_maa_r = _zeros_parameter(self, [d])
        self.key = nn.Linear(d, f, bias_attr=False)
        self.receptance = nn.Linear(d, d, bias_attr=False)
        self.value = nn.Linear(f, d, bias_attr=False)

    def forward(self, x):
        return channel_mix(self, x)


class TextBlock(nn.Layer):
    """A block of the caption encoder, RWKV-6 as a language model: pre-LayerNorms with affine
    parameters (``ln0`` before the first block), causal TimeMix and ChannelMix. [N, L, W] -> [N, L, W]."""

    def __init__(self, spec: DiRSpec, index: int):
        super().__init__()
        w = spec.hidden_size  # the text encoder's own spec (DiRSpec.text_encoder_spec)
        layout = BlockLayout(spec, index)
        self.ln0 = nn.LayerNorm(w, epsilon=TEXT_NORM_EPS) if index == 0 else None
        self.ln1 = nn.LayerNorm(w, epsilon=TEXT_NORM_EPS)
        self.ln2 = nn.LayerNorm(w, epsilon=TEXT_NORM_EPS)
        self.att = TimeMix(spec, layout)
        self.ffn = ChannelMix(spec, layout)

    def forward(self, x):
        if self.ln0 is not None:
            x = self.ln0(x)
        x = x + self.att(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class TextEncoder(nn.Layer):
    """Captions as token ids [N, L] (``common/text.py``: pad 0, end-of-text 1) -> [N, D], as Di-R:
    a causal RWKV-6 language model whose final state at the first end-of-text token is the caption's
    embedding (projected to D when the widths differ). A caption whose first token is the
    end-of-text (the empty caption, the null condition of guidance) gets the learned null embedding.
    Pads after the end-of-text cannot reach it (causal), so any padded length gives the same result."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        text = spec.text_encoder_spec()
        self.null_embedding = _zeros_parameter(self, [spec.hidden_size])
        self.emb = nn.Embedding(spec.text_vocab, text.hidden_size)
        self.blocks = nn.LayerList([TextBlock(text, j) for j in range(text.depth)])
        self.ln_out = nn.LayerNorm(text.hidden_size, epsilon=TEXT_NORM_EPS)
        self.proj = nn.Linear(text.hidden_size, spec.hidden_size) if spec.has_text_projection else None

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        x = self.ln_out(x)
        position = first_eos_position(ids)
        pooled = x[paddle.arange(x.shape[0]), position]
        if self.proj is not None:
            pooled = self.proj(pooled)
        return paddle.where((position == 0)[:, None], self.null_embedding[None].astype(pooled.dtype), pooled)


class DiRBlock(nn.Layer):
    """adaLN-Zero RWKV-6 block number ``index``; out-blocks of a skip model first fuse their long skip.

    x [N, T, D], c [N, D], skip [N, T, D] or None -> [N, T, D], tokens in raster order. A block
    whose scan order is not raster gathers its tokens into that order and back
    (``common/scan_orders.py``); every op but the shift and the scan is per token.
    """

    def __init__(self, spec: DiRSpec, index: int):
        super().__init__()
        d = spec.hidden_size
        layout = BlockLayout(spec, index)
        self.skip_linear = nn.Linear(2 * d, d) if spec.is_out_block(index) else None
        self.register_buffer("order", index_buffer(layout.order), persistable=False)
        self.register_buffer("inverse_order", index_buffer(layout.inverse), persistable=False)
        self.norm1 = nn.LayerNorm(d, epsilon=spec.block_norm_eps, weight_attr=False, bias_attr=False)
        self.att = TimeMix(spec, layout)
        self.norm2 = nn.LayerNorm(d, epsilon=spec.block_norm_eps, weight_attr=False, bias_attr=False)
        self.ffn = ChannelMix(spec, layout)
        self.adaLN_modulation = nn.Sequential(nn.Silu(), nn.Linear(d, 6 * d))

    def forward(self, x, c, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(paddle.concat([x, skip], axis=-1))
        if self.order is not None:
            x = paddle.index_select(x, self.order, axis=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, axis=1)
        x = x + gate1.unsqueeze(1) * self.att(norm_modulate(x, shift1, scale1, self.norm1._epsilon))
        x = x + gate2.unsqueeze(1) * self.ffn(norm_modulate(x, shift2, scale2, self.norm2._epsilon))
        if self.order is not None:
            x = paddle.index_select(x, self.inverse_order, axis=1)
        return x


class FinalLayer(nn.Layer):
    """[N, T, D] -> [N, T, p*p*out_channels], adaLN-modulated."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        d, p = spec.hidden_size, spec.patch_size
        self.norm_final = nn.LayerNorm(d, epsilon=LAYER_NORM_EPS, weight_attr=False, bias_attr=False)
        self.linear = nn.Linear(d, p * p * spec.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.Silu(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, axis=1)
        return self.linear(norm_modulate(x, shift, scale, self.norm_final._epsilon))


class DiR(nn.Layer):
    """Diffusion RWKV: noisy inputs x [N, C, H, W], times t [N] (DDPM timesteps, or flow times
    scaled by flow_time_scale), conditions y (labels [N], or caption token ids [N, L] when
    ``spec.condition`` is text) -> [N, out_channels, H, W] (the prediction: eps or velocity; then
    DDPM's variance interpolation when learn_sigma)."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        self.spec = spec
        self.x_embedder = PatchEmbed(spec)
        if spec.pos_embed == "learned":
            self.pos_embed = _zeros_parameter(self, [1, spec.num_patches, spec.hidden_size])
        elif spec.pos_embed == "sincos":  # fixed, so not a parameter and not in checkpoints
            table = paddle.to_tensor(sincos_pos_embed_2d(spec.hidden_size, spec.grid_size)[None])
            self.register_buffer("pos_embed", table, persistable=False)
        else:
            self.pos_embed = None
        self.t_embedder = TimestepEmbedder(spec.hidden_size)
        if spec.condition == "text":
            self.text_encoder = TextEncoder(spec)
        else:
            self.y_embedder = LabelEmbedder(spec.num_classes, spec.hidden_size, spec.class_dropout_prob)
        self.blocks = nn.LayerList([DiRBlock(spec, i) for i in range(spec.num_blocks)])
        self.final_layer = FinalLayer(spec)
        # Plain Python values for forward: paddle.jit.to_static (SOT) cannot trace the spec's methods.
        self.text_condition = spec.condition == "text"
        self.num_in_blocks = spec.num_in_blocks
        self.out_blocks = [spec.is_out_block(i) for i in range(spec.num_blocks)]
        self.out_channels = spec.out_channels
        self.patch_size, self.grid_size = spec.patch_size, spec.grid_size
        self.recompute = False

    def set_recompute(self, enabled: bool) -> None:
        """Gradient checkpointing per block: training keeps only each block's input and reruns
        the block in the backward pass (about a third more compute; same gradients)."""
        self.recompute = bool(enabled)

    @classmethod
    def from_spec(cls, spec: DiRSpec, seed: int = 0) -> "DiR":
        """A model with the shared numpy init of ``common/params.py``."""
        model = cls(spec)
        model.load_canonical(init_canonical(spec, seed))
        return model

    def load_canonical(self, state: dict[str, np.ndarray]) -> None:
        """Copy canonical numpy weights in (checked name by name and shape by shape)."""
        from common.param_mapping import to_framework

        check_state(state, self.spec)
        own = dict(self.named_parameters())
        with paddle.no_grad():
            for name, value in to_framework("paddle", state, self.spec).items():
                own[name].set_value(np.ascontiguousarray(value, dtype=np.float32))

    def canonical_state(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays in canonical names and order."""
        from common.param_mapping import from_framework

        own = {name: p.detach().astype("float32").numpy() for name, p in self.named_parameters()}
        return from_framework("paddle", own, self.spec)

    def unpatchify(self, x):
        """[N, T, p*p*C] -> [N, C, H, W]."""
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape([x.shape[0], h, h, p, p, c])
        return x.transpose([0, 5, 1, 3, 2, 4]).reshape([x.shape[0], c, h * p, h * p])

    def forward(self, x, t, y):
        x = self.x_embedder(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        c = self.t_embedder(t) + (self.text_encoder(y) if self.text_condition else self.y_embedder(y))
        in_block_outputs = []
        recompute = self.recompute and self.training and paddle.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            skip = in_block_outputs.pop() if self.out_blocks[i] else None
            if recompute:
                x = fleet_recompute(block, x, c, skip, use_reentrant=False)
            else:
                x = block(x, c, skip)
            if i < self.num_in_blocks:
                in_block_outputs.append(x)
        return self.unpatchify(self.final_layer(x, c))
