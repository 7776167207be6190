"""The canonical parameter table of DiR and its seeded numpy init.

``parameter_table(spec)`` lists every trainable tensor in a fixed order with its
canonical name, its shape in PyTorch layout (Linear weight is [out, in]) and its
init rule. Converters, loaders and parity tests rely on this table alone; each
backend reaches it through the small mapping in ``common/param_mapping.py``.

``init_canonical(spec, seed)`` draws every tensor in table order from one numpy
generator, so one seed gives bit-identical weights in every framework.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.spec import FREQUENCY_EMBEDDING_SIZE, DiRSpec

TEXT_PREFIX = "text_encoder."

# What a tensor is, so each framework mapping knows how to lay it out.
LINEAR_WEIGHT = "linear_weight"  # [out, in]; Paddle stores [in, out]
LINEAR_BIAS = "linear_bias"
CONV_WEIGHT = "conv_weight"  # [out, in, kh, kw] in all three frameworks
EMBEDDING = "embedding"  # [rows, dim]
NORM_WEIGHT = "norm_weight"
NORM_BIAS = "norm_bias"
TENSOR = "tensor"  # a raw parameter used as is (RWKV mixes, LoRA matrices, decay, bonus)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    init: str  # xavier_uniform | zeros | ones | normal_0.02 | normal_1 | uniform_0.01 | sincos | rwkv6
    kind: str
    layer: int = -1  # block index for RWKV-6 layer-dependent init


def _linear(prefix: str, out_dim: int, in_dim: int, init: str = "xavier_uniform", bias: bool = True):
    yield ParamInfo(f"{prefix}.weight", (out_dim, in_dim), init, LINEAR_WEIGHT)
    if bias:
        yield ParamInfo(f"{prefix}.bias", (out_dim,), "zeros", LINEAR_BIAS)


def _mixers(spec: DiRSpec, p: str, i: int):
    """RWKV-6 TimeMix (``{p}.att``) and ChannelMix (``{p}.ffn``) of block ``i``."""
    d, f, h, k = spec.hidden_size, spec.ffn_hidden_size, spec.num_heads, spec.head_size
    a = f"{p}.att"
    for branch in ("x", "w", "k", "v", "r", "g"):
        yield ParamInfo(f"{a}.time_maa_{branch}", (d,), "rwkv6", TENSOR, i)
    yield ParamInfo(f"{a}.time_maa_w1", (d, 5 * spec.mix_lora_rank), "uniform_0.01", TENSOR, i)
    yield ParamInfo(f"{a}.time_maa_w2", (5, spec.mix_lora_rank, d), "uniform_0.01", TENSOR, i)
    yield ParamInfo(f"{a}.time_decay", (d,), "rwkv6", TENSOR, i)
    yield ParamInfo(f"{a}.time_decay_w1", (d, spec.decay_lora_rank), "uniform_0.01", TENSOR, i)
    yield ParamInfo(f"{a}.time_decay_w2", (spec.decay_lora_rank, d), "uniform_0.01", TENSOR, i)
    yield ParamInfo(f"{a}.time_faaaa", (h, k), "rwkv6", TENSOR, i)
    for proj in ("receptance", "key", "value", "gate", "output"):
        yield from _linear(f"{a}.{proj}", d, d, bias=False)
    yield ParamInfo(f"{a}.ln_x.weight", (d,), "ones", NORM_WEIGHT)
    yield ParamInfo(f"{a}.ln_x.bias", (d,), "zeros", NORM_BIAS)
    c = f"{p}.ffn"
    yield ParamInfo(f"{c}.time_maa_k", (d,), "rwkv6", TENSOR, i)
    yield ParamInfo(f"{c}.time_maa_r", (d,), "rwkv6", TENSOR, i)
    yield from _linear(f"{c}.key", f, d, bias=False)
    yield from _linear(f"{c}.receptance", d, d, bias=False)
    yield from _linear(f"{c}.value", d, f, bias=False)


def _norm(prefix: str, d: int):
    yield ParamInfo(f"{prefix}.weight", (d,), "ones", NORM_WEIGHT)
    yield ParamInfo(f"{prefix}.bias", (d,), "zeros", NORM_BIAS)


def _block(spec: DiRSpec, i: int):
    d = spec.hidden_size
    p = f"blocks.{i}"
    if spec.is_out_block(i):
        yield from _linear(f"{p}.skip_linear", d, 2 * d)
    yield from _mixers(spec, p, i)
    yield from _linear(f"{p}.adaLN_modulation.1", 6 * d, d, init="zeros")


def _text_encoder(spec: DiRSpec):
    """The caption encoder (Di-R's ``RwkvForSequenceEmbedding``): the null embedding, token
    embedding, RWKV-6 blocks with affine pre-norms (``ln0`` before the first), ``ln_out``, and a
    projection to hidden_size when the widths differ."""
    text = spec.text_encoder_spec()
    w, p = text.hidden_size, TEXT_PREFIX.rstrip(".")
    # The null caption's embedding stands where a pooled caption stands, and a pooled caption leaves
    # ln_out at unit scale: so randn, as Di-R inits its null_embeddings. At the label table's 0.02 the
    # unconditional branch of guidance starts ~50x closer to the origin than every caption.
    yield ParamInfo(f"{p}.null_embedding", (spec.hidden_size,), "normal_1", TENSOR)
    yield ParamInfo(f"{p}.emb.weight", (spec.text_vocab, w), "normal_0.02", EMBEDDING)
    for j in range(text.depth):
        b = f"{p}.blocks.{j}"
        if j == 0:
            yield from _norm(f"{b}.ln0", w)
        yield from _norm(f"{b}.ln1", w)
        yield from _norm(f"{b}.ln2", w)
        yield from _mixers(text, b, j)
    yield from _norm(f"{p}.ln_out", w)
    if spec.has_text_projection:
        yield from _linear(f"{p}.proj", spec.hidden_size, w)


def parameter_table(spec: DiRSpec) -> list[ParamInfo]:
    """Every parameter of the model built from ``spec``, in canonical order."""
    d, p = spec.hidden_size, spec.patch_size
    table = []
    if spec.pos_embed == "learned":  # first: frameworks list a model's own parameters before its children's
        table.append(ParamInfo("pos_embed", (1, spec.num_patches, d), "sincos", TENSOR))
    table += [
        ParamInfo("x_embedder.proj.weight", (d, spec.in_channels, p, p), "xavier_uniform", CONV_WEIGHT),
        ParamInfo("x_embedder.proj.bias", (d,), "zeros", LINEAR_BIAS),
    ]
    table += _linear("t_embedder.mlp.0", d, FREQUENCY_EMBEDDING_SIZE, init="normal_0.02")
    table += _linear("t_embedder.mlp.2", d, d, init="normal_0.02")
    if spec.condition == "text":
        table += _text_encoder(spec)
    else:
        rows = spec.num_classes + int(spec.has_null_class)
        table.append(ParamInfo("y_embedder.embedding_table.weight", (rows, d), "normal_0.02", EMBEDDING))
    for i in range(spec.num_blocks):
        table += _block(spec, i)
    table += _linear("final_layer.linear", p * p * spec.out_channels, d, init="zeros")
    table += _linear("final_layer.adaLN_modulation.1", 2 * d, d, init="zeros")
    return table


def parameter_count(spec: DiRSpec) -> int:
    return sum(int(np.prod(info.shape)) for info in parameter_table(spec))


# ---- init ---------------------------------------------------------------------------
def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT 2-D sin-cos position embedding, [grid_size**2, embed_dim] float32."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # DiT: w first, so rows follow h

    def one_axis(positions: np.ndarray, dim: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([one_axis(grid_w, embed_dim // 2), one_axis(grid_h, embed_dim // 2)], axis=1)
    return emb.astype(np.float32)


def _layer_ratios(spec: DiRSpec, layer: int) -> tuple[float, float]:
    n = spec.num_blocks
    ratio_0_to_1 = layer / (n - 1) if n > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer / n
    return ratio_0_to_1, ratio_1_to_almost0


def rwkv6_init(spec: DiRSpec, name: str, layer: int) -> np.ndarray:
    """RWKV-6's deterministic layer-dependent init (BlinkDL's x060 recipe)."""
    d = spec.hidden_size
    r0, r1 = _layer_ratios(spec, layer)
    ddd = np.arange(d, dtype=np.float64) / d
    n = np.arange(d, dtype=np.float64)
    suffix = name.rsplit(".", 2)[-2:]
    mix, leaf = suffix
    if leaf == "time_decay":
        values = -6.0 + 5.0 * (n / max(d - 1, 1)) ** (0.7 + 1.3 * r0)
    elif leaf == "time_faaaa":
        zigzag = ((n + 1) % 3 - 1) * 0.1
        values = (r0 * (1.0 - n / max(d - 1, 1)) + zigzag).reshape(spec.num_heads, spec.head_size)
    elif leaf in ("time_maa_r", "time_maa_g") and mix == "att":
        values = 1.0 - ddd ** (0.5 * r1)
    elif leaf == "time_maa_v" and mix == "att":
        values = 1.0 - (ddd**r1 + 0.3 * r0)
    elif leaf.startswith("time_maa_"):
        values = 1.0 - ddd**r1
    else:
        raise KeyError(f"no RWKV-6 init rule for parameter '{name}'")
    return values.astype(np.float32)


def init_canonical(spec: DiRSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh weights for ``spec``: float32 numpy arrays in canonical names and layout."""
    rng = np.random.Generator(np.random.PCG64(seed))
    state: dict[str, np.ndarray] = {}
    for info in parameter_table(spec):
        shape = info.shape
        if info.init == "zeros":
            value = np.zeros(shape)
        elif info.init == "ones":
            value = np.ones(shape)
        elif info.init == "normal_0.02":
            value = rng.normal(0.0, 0.02, size=shape)
        elif info.init == "normal_1":
            value = rng.normal(0.0, 1.0, size=shape)
        elif info.init == "uniform_0.01":
            value = rng.uniform(-0.01, 0.01, size=shape)
        elif info.init == "xavier_uniform":
            fan_out = shape[0]
            fan_in = int(np.prod(shape[1:]))  # a conv kernel counts as one flattened Linear (DiT)
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            value = rng.uniform(-bound, bound, size=shape)
        elif info.init == "sincos":
            value = sincos_pos_embed_2d(spec.hidden_size, spec.grid_size)[None]
        elif info.init == "rwkv6":
            owner = spec.text_encoder_spec() if info.name.startswith(TEXT_PREFIX) else spec
            value = rwkv6_init(owner, info.name, info.layer)
        else:
            raise KeyError(f"unknown init rule '{info.init}' for '{info.name}'")
        state[info.name] = np.ascontiguousarray(value, dtype=np.float32)
    return state


def check_state(state: dict[str, np.ndarray], spec: DiRSpec, source: str = "state") -> None:
    """Raise ValueError listing every missing, unexpected or wrongly shaped tensor."""
    table = {info.name: info.shape for info in parameter_table(spec)}
    problems = [f"missing: {name} (expected shape {list(shape)})" for name, shape in table.items() if name not in state]
    problems += [f"unexpected: {name} (shape {list(np.shape(state[name]))})" for name in state if name not in table]
    problems += [
        f"wrong shape: {name} is {list(np.shape(state[name]))}, expected {list(shape)}"
        for name, shape in table.items()
        if name in state and tuple(np.shape(state[name])) != tuple(shape)
    ]
    if problems:
        raise ValueError(f"{source} does not match the DiR parameter table:\n  " + "\n  ".join(problems))
