"""DiR: DiT's diffusion backbone with RWKV-6 blocks, in MindSpore.

Mirrors ``backends/torch/models.py`` class for class and attribute for attribute;
``construct`` replaces ``forward``. Shapes: N images, T = (input_size / patch_size)**2
tokens, D = hidden_size, H heads of K = head_size channels. Parameter names (the
attribute paths, which MindSpore also writes into each ``Parameter.name``) equal
the canonical names of ``common/params.py`` through the MindSpore column of
``common/param_mapping.py``: ``nn.Embedding`` keeps its table in ``.embedding_table``,
so the canonical ``y_embedder.embedding_table.weight`` is
``y_embedder.embedding_table.embedding_table`` (and ``text_encoder.emb.weight`` is
``text_encoder.emb.embedding_table``); GroupNorm's and the text encoder's LayerNorms'
weight/bias are ``gamma``/``beta``; every other name and layout is the canonical one (Dense weights are [out, in]). Weights are loaded from that table, so
init is the numpy init shared by every backend.

Ops used, and where they run:

* ``nn.Conv2d`` (patch embedding), ``nn.Dense``, ``nn.Embedding``, ``nn.GroupNorm``,
  ``nn.SiLU`` and ``mindspore.ops`` arithmetic (exp, tanh, sigmoid, relu, matmul,
  cumsum, concat, flip): CPU, GPU and Ascend.
* The affine-free LayerNorm of adaLN is written out (mean / variance over D) and fused
  with the modulation (``mixing.norm_modulate``, as PyTorch's blocks), not
  ``mint.nn.functional.layer_norm`` (Ascend-only) nor ``nn.LayerNorm`` (which would
  add gamma/beta parameters the canonical table does not have). The text encoder's
  LayerNorms have those parameters, so they are ``nn.LayerNorm`` (CPU, GPU, Ascend).
* The text encoder's pooled state is one ``ops.gather_elements`` along the tokens (each
  row's first end-of-text position), which compiles and differentiates in both modes.
* No ``mint.*`` op is used: ``mint`` conv2d / layer_norm / gelu are Ascend-only in
  MindSpore 2.x, and the ``ops`` / ``nn`` forms above compile to the Ascend kernels
  on Ascend too.

Differences from the PyTorch module, all MindSpore idiom:

* ``set_wkv_branch("auto" | "safe")`` picks the WKV6 score path: "auto" (PyNative
  default) chooses factorised vs pairwise from the data like PyTorch; "safe" (the
  default when the model is built under GRAPH_MODE) always takes the pairwise split,
  which compiles (see ``backends/mindspore/wkv.py``).
* ``set_execution_mode`` (PyNative or Graph, and the device) is MindSpore's global
  context; it is set before a model is built.
* The fused forms of ``mixing.py`` (hand-written bprops that keep fewer tensors) are taken
  by cells built under GRAPH_MODE; PyNative and recomputed models take the plain forms
  (``_fused_by_default``, ``DiR.set_recompute``).
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from backends.mindspore.mixing import (_layer_norm, channel_mix, channel_mix_reference, gated_output, gated_output_reference,
                                      norm_modulate, norm_modulate_reference, time_mix_inputs,
                                      time_mix_inputs_reference)
from backends.mindspore.wkv import default_branch, wkv6
from common.params import init_canonical, parameter_table, sincos_pos_embed_2d
from common.scan_orders import BlockLayout
from common.spec import FREQUENCY_EMBEDDING_SIZE, GROUP_NORM_EPS, LAYER_NORM_EPS, MAX_PERIOD, TEXT_NORM_EPS, DiRSpec
from common.text import EOS_ID

EXECUTION_MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}


def set_execution_mode(mode: str, device: str = "auto") -> str:
    """``mode``: pynative | graph; ``device``: auto | cpu | ascend | gpu. Returns the device used.

    Call before building models: under GRAPH_MODE the WKV6 branch defaults to "safe".
    """
    if mode not in EXECUTION_MODES:
        raise ValueError(f"execution mode '{mode}': allowed {', '.join(EXECUTION_MODES)}")
    ms.set_context(mode=EXECUTION_MODES[mode])
    if device == "auto":
        target = "CPU"
        for candidate in ("Ascend", "GPU"):
            try:
                if ms.hal.is_available(candidate):
                    target = candidate
                    break
            except Exception:  # noqa: BLE001 - a backend plugin that is absent raises various errors
                continue
    else:
        target = {"cpu": "CPU", "ascend": "Ascend", "gpu": "GPU", "cuda": "GPU"}[device]
    if ms.get_context("device_target") != target:  # a first set_device after any kernel raises, even unchanged
        ms.set_device(target)
    return target


def modulate(x, shift, scale):
    """adaLN: x [N, T, D]; shift, scale [N, D]."""
    return x * (1 + scale.expand_dims(1)) + shift.expand_dims(1)


def index_buffer(values):
    """A constant int32 index (a graph constant, never saved), or None."""
    return None if values is None else Tensor(values.astype(np.int32))


class LayerNorm(nn.Cell):
    """LayerNorm over the last dim without affine parameters (DiT's adaLN norm).

    Written out so it runs on every device and adds no parameters (``mixing._layer_norm``, which
    ``mixing.norm_modulate_reference`` normalises with too). The blocks and the final layer hold one
    for its eps: they normalise and modulate in one step, ``mixing.norm_modulate``.
    """

    def __init__(self, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.eps = eps

    def construct(self, x):
        return _layer_norm(x, self.eps)


class PatchEmbed(nn.Cell):
    """[N, C, H, W] -> [N, T, D] by a stride-p convolution."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        self.proj = nn.Conv2d(spec.in_channels, spec.hidden_size, spec.patch_size, stride=spec.patch_size,
                              pad_mode="valid", has_bias=True)

    def construct(self, x):
        # The stride-p convolution as patches times the flattened kernel: the same sums, several times
        # faster than CPU Conv2d's forward and backward (the Conv2d only holds the parameters).
        n, c, h, w = x.shape
        width, p = self.proj.weight.shape[0], self.proj.weight.shape[2]
        tokens = (h // p) * (w // p)
        patches = x.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(n * tokens, c * p * p)
        y = ops.matmul(patches, self.proj.weight.reshape(width, c * p * p).swapaxes(0, 1)) + self.proj.bias
        return y.reshape(n, tokens, width)


def _frequencies(dim: int) -> np.ndarray:
    """exp(-log(MAX_PERIOD) * i / half) in float32, as PyTorch computes it (args in fp32,
    a correctly rounded exp; MindSpore's CPU exp is ~1e-6 off, which t ~ 1000 would magnify)."""
    half = dim // 2
    args = np.float32(-math.log(MAX_PERIOD)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(args.astype(np.float64)).astype(np.float32)


class TimestepEmbedder(nn.Cell):
    """Scalar timesteps [N] -> [N, D]: sinusoidal features, then an MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.SequentialCell(nn.Dense(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(),
                                     nn.Dense(hidden_size, hidden_size))
        self.freqs = Tensor(_frequencies(FREQUENCY_EMBEDDING_SIZE))  # a constant, not a parameter

    @staticmethod
    def timestep_embedding(t, freqs):
        args = t.astype(ms.float32)[:, None] * freqs[None]
        return ops.concat([ops.cos(args), ops.sin(args)], -1)

    def construct(self, t):
        return self.mlp(self.timestep_embedding(t, self.freqs))


class LabelEmbedder(nn.Cell):
    """Class labels [N] -> [N, D]. With ``dropout_prob > 0`` the table has an extra "null" row
    (id ``num_classes``) for classifier-free guidance; the trainer draws which labels become
    null (``common.objectives.step_draws``) and passes them as that id."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def construct(self, labels):
        return self.embedding_table(labels)


def first_eos_position(ids):
    """[N, L] token ids -> [N] int64: each row's first end-of-text position, 0 when it has none
    (computed without relying on how argmax breaks ties)."""
    length = ids.shape[1]
    weight = (ids == EOS_ID).astype(ms.int64) * (length - ops.arange(length, dtype=ms.int64))
    best = ops.amax(weight, 1)
    return ops.where(best > 0, length - best, ops.zeros_like(best))


def _fused_by_default() -> bool:
    """Whether a new cell takes the fused forms of ``backends/mindspore/mixing.py``: in Graph mode
    (fewer tensors kept, the same speed), not in PyNative, where MindSpore 2.10 runs a Cell's
    hand-written bprop about 1.5x slower than its autodiff (the digits demo's trainer step, depth 4:
    4.5 s against 2.9 s). ``DiR.set_recompute`` turns them off in both."""
    return ms.get_context("mode") == ms.GRAPH_MODE


class TimeMix(nn.Cell):
    """RWKV-6 time mixing: data-dependent token shift and decay, WKV6 over H heads.

    [N, T, D] -> [N, T, D], the tokens in the block's order.
    """

    def __init__(self, spec: DiRSpec, layout: BlockLayout):
        super().__init__()
        d = spec.hidden_size
        self.num_heads, self.head_size = spec.num_heads, spec.head_size
        self.bidirectional = spec.scan == "bidirectional"
        self.q_shift_index = index_buffer(layout.q_shift_index)
        self.wkv_branch = default_branch()
        self.fused = _fused_by_default()  # the fused forms of backends/mindspore/mixing.py (see there)
        zeros = lambda *shape: Parameter(Tensor(np.zeros(shape, np.float32)))  # noqa: E731
        self.time_maa_x = zeros(d)
        self.time_maa_w = zeros(d)
        self.time_maa_k = zeros(d)
        self.time_maa_v = zeros(d)
        self.time_maa_r = zeros(d)
        self.time_maa_g = zeros(d)
        self.time_maa_w1 = zeros(d, 5 * spec.mix_lora_rank)
        self.time_maa_w2 = zeros(5, spec.mix_lora_rank, d)
        self.time_decay = zeros(d)
        self.time_decay_w1 = zeros(d, spec.decay_lora_rank)
        self.time_decay_w2 = zeros(spec.decay_lora_rank, d)
        self.time_faaaa = zeros(spec.num_heads, spec.head_size)
        self.receptance = nn.Dense(d, d, has_bias=False)
        self.key = nn.Dense(d, d, has_bias=False)
        self.value = nn.Dense(d, d, has_bias=False)
        self.gate = nn.Dense(d, d, has_bias=False)
        self.output = nn.Dense(d, d, has_bias=False)
        self.ln_x = nn.GroupNorm(spec.num_heads, d, eps=GROUP_NORM_EPS)

    def construct(self, x):
        n, t, d = x.shape
        if self.fused:
            r, k, v, gate_pre, log_decay = time_mix_inputs(self, x)
        else:
            r, k, v, gate_pre, log_decay = time_mix_inputs_reference(self, x)
        heads = (n, t, self.num_heads, self.head_size)
        y = wkv6(r.reshape(heads), k.reshape(heads), v.reshape(heads), log_decay.reshape(heads), self.time_faaaa,
                 bidirectional=self.bidirectional, branch=self.wkv_branch)
        if self.fused:
            return gated_output(self, y.reshape(n, t, d), gate_pre)
        return gated_output_reference(self, y.reshape(n, t, d), gate_pre)


class ChannelMix(nn.Cell):
    """RWKV channel mixing: sigmoid(Wr xr) * Wv(relu(Wk xk)^2). [N, T, D] -> [N, T, D]."""

    def __init__(self, spec: DiRSpec, layout: BlockLayout):
        super().__init__()
        d, f = spec.hidden_size, spec.ffn_hidden_size
        self.bidirectional = spec.scan == "bidirectional"
        self.q_shift_index = index_buffer(layout.q_shift_index)
        self.fused = _fused_by_default()  # as TimeMix.fused
        self.time_maa_k = Parameter(Tensor(np.zeros(d, np.float32)))
        self.time_maa_r = Parameter(Tensor(np.zeros(d, np.float32)))
        self.key = nn.Dense(d, f, has_bias=False)
        self.receptance = nn.Dense(d, d, has_bias=False)
        self.value = nn.Dense(f, d, has_bias=False)

    def construct(self, x):
        if self.fused:
            return channel_mix(self, x)
        return channel_mix_reference(self, x)


class TextBlock(nn.Cell):
    """A block of the caption encoder, RWKV-6 as a language model: pre-LayerNorms with affine
    parameters (``ln0`` before the first block), causal TimeMix and ChannelMix. [N, L, W] -> [N, L, W]."""

    def __init__(self, spec: DiRSpec, index: int):
        super().__init__()
        w = spec.hidden_size  # the text encoder's own spec (DiRSpec.text_encoder_spec)
        layout = BlockLayout(spec, index)
        self.ln0 = nn.LayerNorm((w,), epsilon=TEXT_NORM_EPS) if index == 0 else None
        self.ln1 = nn.LayerNorm((w,), epsilon=TEXT_NORM_EPS)
        self.ln2 = nn.LayerNorm((w,), epsilon=TEXT_NORM_EPS)
        self.att = TimeMix(spec, layout)
        self.ffn = ChannelMix(spec, layout)

    def construct(self, x):
        if self.ln0 is not None:
            x = self.ln0(x)
        x = x + self.att(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class TextEncoder(nn.Cell):
    """Captions as token ids [N, L] (``common/text.py``: pad 0, end-of-text 1) -> [N, D], as Di-R:
    a causal RWKV-6 language model whose final state at the first end-of-text token is the caption's
    embedding (projected to D when the widths differ). A caption whose first token is the
    end-of-text (the empty caption, the null condition of guidance) gets the learned null embedding.
    Pads after the end-of-text cannot reach it (causal), so any padded length gives the same result."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        text = spec.text_encoder_spec()
        self.null_embedding = Parameter(Tensor(np.zeros(spec.hidden_size, np.float32)))
        self.emb = nn.Embedding(spec.text_vocab, text.hidden_size)
        self.blocks = nn.CellList([TextBlock(text, j) for j in range(text.depth)])
        self.ln_out = nn.LayerNorm((text.hidden_size,), epsilon=TEXT_NORM_EPS)
        self.proj = nn.Dense(text.hidden_size, spec.hidden_size) if spec.has_text_projection else None

    def construct(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        x = self.ln_out(x)
        position = first_eos_position(ids)
        index = ops.broadcast_to(position.reshape(-1, 1, 1), (x.shape[0], 1, x.shape[2]))
        pooled = ops.gather_elements(x, 1, index).squeeze(1)
        if self.proj is not None:
            pooled = self.proj(pooled)
        return ops.where((position == 0)[:, None], self.null_embedding[None].astype(pooled.dtype), pooled)


class DiRBlock(nn.Cell):
    """adaLN-Zero RWKV-6 block number ``index``; out-blocks of a skip model first fuse their long skip.

    x [N, T, D], c [N, D], skip [N, T, D] or None -> [N, T, D], tokens in raster order. A block
    whose scan order is not raster gathers its tokens into that order and back
    (``common/scan_orders.py``); every op but the shift and the scan is per token.
    """

    def __init__(self, spec: DiRSpec, index: int):
        super().__init__()
        d = spec.hidden_size
        layout = BlockLayout(spec, index)
        self.skip_linear = nn.Dense(2 * d, d) if spec.is_out_block(index) else None
        self.order = index_buffer(layout.order)
        self.inverse_order = index_buffer(layout.inverse)
        self.norm1 = LayerNorm(spec.block_norm_eps)
        self.att = TimeMix(spec, layout)
        self.norm2 = LayerNorm(spec.block_norm_eps)
        self.ffn = ChannelMix(spec, layout)
        self.adaLN_modulation = nn.SequentialCell(nn.SiLU(), nn.Dense(d, 6 * d))
        self.fused = _fused_by_default()  # as TimeMix.fused

    def construct(self, x, c, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(ops.concat([x, skip], -1))
        if self.order is not None:
            x = ops.gather(x, self.order, 1)
        shift1, scale1, gate1, shift2, scale2, gate2 = ops.split(self.adaLN_modulation(c), c.shape[1], 1)
        modulated = norm_modulate if self.fused else norm_modulate_reference
        x = x + gate1.expand_dims(1) * self.att(modulated(x, shift1, scale1, self.norm1.eps))
        x = x + gate2.expand_dims(1) * self.ffn(modulated(x, shift2, scale2, self.norm2.eps))
        if self.order is not None:
            x = ops.gather(x, self.inverse_order, 1)
        return x


class FinalLayer(nn.Cell):
    """[N, T, D] -> [N, T, p*p*out_channels], adaLN-modulated."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        d, p = spec.hidden_size, spec.patch_size
        self.norm_final = LayerNorm(LAYER_NORM_EPS)
        self.linear = nn.Dense(d, p * p * spec.out_channels)
        self.adaLN_modulation = nn.SequentialCell(nn.SiLU(), nn.Dense(d, 2 * d))
        self.fused = _fused_by_default()  # as TimeMix.fused

    def construct(self, x, c):
        shift, scale = ops.split(self.adaLN_modulation(c), c.shape[1], 1)
        modulated = norm_modulate if self.fused else norm_modulate_reference
        return self.linear(modulated(x, shift, scale, self.norm_final.eps))


class DiR(nn.Cell):
    """Diffusion RWKV: noisy inputs x [N, C, H, W], times t [N] (DDPM timesteps, or flow times
    scaled by flow_time_scale), conditions y (labels [N], or caption token ids [N, L] when
    ``spec.condition`` is text) -> [N, out_channels, H, W] (the prediction: eps or velocity; then
    DDPM's variance interpolation when learn_sigma)."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        self.spec = spec
        self.x_embedder = PatchEmbed(spec)
        self.has_pos_embed = spec.pos_embed != "none"
        if spec.pos_embed == "learned":
            self.pos_embed = Parameter(Tensor(np.zeros((1, spec.num_patches, spec.hidden_size), np.float32)))
        elif spec.pos_embed == "sincos":  # fixed, so not a parameter and not in checkpoints
            self.pos_embed = Tensor(sincos_pos_embed_2d(spec.hidden_size, spec.grid_size)[None])
        else:
            self.pos_embed = None
        self.t_embedder = TimestepEmbedder(spec.hidden_size)
        if spec.condition == "text":
            self.text_encoder = TextEncoder(spec)
        else:
            self.y_embedder = LabelEmbedder(spec.num_classes, spec.hidden_size, spec.class_dropout_prob)
        self.blocks = nn.CellList([DiRBlock(spec, i) for i in range(spec.num_blocks)])
        self.final_layer = FinalLayer(spec)
        # The condition kind and the skip wiring as plain values (a Graph-mode construct reads
        # constants, not spec methods).
        self.text_condition = spec.condition == "text"
        self.num_in_blocks = spec.num_in_blocks
        self.skip_sources = tuple(spec.skip_source(i) if spec.is_out_block(i) else -1 for i in range(spec.num_blocks))
        self.out_channels, self.patch_size, self.grid_size = spec.out_channels, spec.patch_size, spec.grid_size
        self.recompute_blocks = False

    def set_recompute(self, enabled: bool) -> None:
        """Gradient checkpointing per block: training keeps only each block's input and reruns
        the block in the backward pass (about a third more compute; same gradients). MindSpore
        marks the cells (``Cell.recompute``), in PyNative and Graph mode alike; once set, it stays."""
        if enabled and not self.recompute_blocks:
            # MindSpore 2.10's Graph compiler finds a cycle ("Graph cycle exists", TopoSort) in a
            # graph that holds recomputed cells and cells with hand-written bprops, so the whole
            # model takes the plain forms of backends/mindspore/mixing.py; a recomputed block
            # keeps only its input anyway, which is what the fused forms were saving.
            for _, cell in self.cells_and_names():
                if hasattr(cell, "fused"):
                    cell.fused = False
            for block in self.blocks:
                block.recompute()
            self.recompute_blocks = True
        elif not enabled and self.recompute_blocks:
            raise ValueError("MindSpore cannot unmark a recomputed cell: build a new model for recompute off")

    @classmethod
    def from_spec(cls, spec: DiRSpec, seed: int = 0) -> "DiR":
        """A model with the shared numpy init of ``common/params.py``."""
        model = cls(spec)
        model.load_canonical(init_canonical(spec, seed))
        return model

    def named_parameters(self) -> dict[str, Parameter]:
        """Parameters by attribute path (what ``Parameter.name`` holds unless renamed)."""
        return dict(self.parameters_and_names())

    def load_canonical(self, state: dict[str, np.ndarray]) -> None:
        """Copy canonical numpy weights in (checked name by name and shape by shape)."""
        from common.param_mapping import framework_name, from_framework, to_framework

        from_framework("mindspore", to_framework("mindspore", state, self.spec), self.spec)  # name + shape check
        own = self.named_parameters()
        for info in parameter_table(self.spec):
            param = own[framework_name("mindspore", info.name, info.kind)]
            param.set_data(Tensor(np.ascontiguousarray(state[info.name], dtype=np.float32)).astype(param.dtype))

    def canonical_state(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays in canonical names and order."""
        from common.param_mapping import framework_name

        own = self.named_parameters()
        return {info.name: own[framework_name("mindspore", info.name, info.kind)].asnumpy().astype(np.float32)
                for info in parameter_table(self.spec)}

    def set_wkv_branch(self, branch: str) -> None:
        """"auto" (data-dependent, PyNative only) or "safe" (compiles) for every block (the text
        encoder's too)."""
        for block in self.blocks:
            block.att.wkv_branch = branch
        if self.text_condition:
            for block in self.text_encoder.blocks:
                block.att.wkv_branch = branch

    def unpatchify(self, x):
        """[N, T, p*p*C] -> [N, C, H, W]."""
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return x.transpose(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, h * p)

    def construct(self, x, t, y):
        x = self.x_embedder(x)
        if self.has_pos_embed:
            x = x + self.pos_embed
        c = self.t_embedder(t) + (self.text_encoder(y) if self.text_condition else self.y_embedder(y))
        in_block_outputs = []
        i = 0
        for block in self.blocks:
            if self.skip_sources[i] >= 0:
                x = block(x, c, in_block_outputs[self.skip_sources[i]])
            else:
                x = block(x, c)
            if i < self.num_in_blocks:
                in_block_outputs.append(x)
            i += 1
        return self.unpatchify(self.final_layer(x, c))
