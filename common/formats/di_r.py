"""Importing yynil/Di-R v0 checkpoints (``models.py: DiRWKV``, text-conditioned) into the canonical table.

A Di-R ``model.pth`` is a flat dict of its ``requires_grad`` parameters, mostly bf16, with no prefix
and no record of the input size or of whether sin-cos positions were used (the caller says both).
What maps, tensor by tensor:

* the patch embedder, the timestep MLP, every RWKV-6 TimeMix/ChannelMix tensor and the final layer
  keep their names; Di-R's ``[1, 1, D]`` mix and decay vectors become ``[D]``;
* ``text_encoder.rwkvModel.{emb, blocks.j.{ln0, ln1, ln2, att, ffn}, ln_out}`` ->
  ``text_encoder.{...}``, ``text_encoder.null_embeddings`` -> ``text_encoder.null_embedding``
  (an LM ``head``, which Di-R deletes, is ignored if present);
* the blocks' affine LayerNorms ``norm1``/``norm2`` (eps 1e-5) are **folded exactly** into
  ``adaLN_modulation``: with ``LN(x) = g * n + b``, ``modulate(LN(x), h, s) = n * (1 + s') + h'``
  for ``1 + s' = g * (1 + s)`` and ``h' = h + b * (1 + s)``, so the scale rows become
  ``diag(g) W_s`` / ``g * (1 + b_s) - 1`` and the shift rows ``W_h + diag(b) W_s`` /
  ``b_h + b * (1 + b_s)`` (both halves of the block). The eps stays Di-R's through the spec field
  ``block_norm_eps`` = 1e-5, so nothing is approximated.

The spec is read off the tensors (width, depth, heads, LoRA ranks, FFN size, learned sigma, the
text encoder's width, depth and vocabulary), with ``scan: causal`` (Di-R's blocks and text encoder
are causal) and Di-R's 0.1 caption dropout (it has a null embedding). What does not map: Di-R v1's
in-context tokens (``models_v1.py``), v2's open_clip text tower, and training-time dropout of the
text encoder (0.05), which this model does not have.
"""
from __future__ import annotations

import re

import numpy as np

from common.formats.errors import FormatError
from common.params import parameter_table
from common.spec import DiRSpec, SpecError, validate

DI_R_FORMAT = "di-r"
DI_R_NORM_EPS = 1e-5
DI_R_CAPTION_DROPOUT = 0.1
# Di-R trains with DiT's diffusion (1000 linear steps, learned sigma) on SD-VAE latents.
DI_R_RECIPE = {"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "linear", "data": "latents",
               "latent_scale": 0.18215}
_TEXT_SOURCE = "text_encoder.rwkvModel."
_IGNORED = re.compile(r"^text_encoder\.rwkvModel\.head\.")


def _count(tensors, pattern: str) -> int:
    found = {int(m.group(1)) for name in tensors if (m := re.match(pattern, name))}
    if found != set(range(len(found))):
        raise FormatError(f"Di-R file: block indices {sorted(found)} are not 0..{len(found) - 1}")
    return len(found)


def _need(tensors, name: str, where: str) -> np.ndarray:
    if name not in tensors:
        raise FormatError(f"{where}: not a Di-R v0 checkpoint: it has no '{name}'")
    return tensors[name]


def di_r_spec(tensors: dict[str, np.ndarray], input_size: int, pos_embed: str = "none",
              where: str = "Di-R file") -> DiRSpec:
    """The spec a Di-R v0 state dict describes (sizes read off its tensors)."""
    patch = _need(tensors, "x_embedder.proj.weight", where)
    d, in_channels, p = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[2])
    depth = _count(tensors, r"^blocks\.(\d+)\.att\.receptance\.weight$")
    text_depth = _count(tensors, r"^text_encoder\.rwkvModel\.blocks\.(\d+)\.att\.receptance\.weight$")
    if depth == 0 or text_depth == 0:
        raise FormatError(f"{where}: not a Di-R v0 checkpoint: found {depth} image blocks and {text_depth} text "
                          "encoder blocks (v1/v2 checkpoints, with in-context tokens, do not map)")
    faaaa = _need(tensors, "blocks.0.att.time_faaaa", where)
    ffn = _need(tensors, "blocks.0.ffn.key.weight", where)
    emb = _need(tensors, "text_encoder.rwkvModel.emb.weight", where)
    text_ffn = _need(tensors, "text_encoder.rwkvModel.blocks.0.ffn.key.weight", where)
    final = _need(tensors, "final_layer.linear.weight", where)
    if ffn.shape[0] % d or text_ffn.shape[0] * d != ffn.shape[0] * emb.shape[1]:
        raise FormatError(f"{where}: FFN sizes {tuple(ffn.shape)} (blocks) and {tuple(text_ffn.shape)} (text "
                          "encoder) are not the same multiple of their widths; this model ties them")
    out = int(final.shape[0]) // (p * p)
    if out not in (in_channels, 2 * in_channels):
        raise FormatError(f"{where}: final_layer.linear.weight {tuple(final.shape)} gives {out} output channels "
                          f"for {in_channels} input channels; expected {in_channels} or {2 * in_channels}")
    values = dict(
        input_size=input_size, in_channels=in_channels, patch_size=p, hidden_size=d, depth=depth,
        head_size=int(faaaa.shape[1]), ffn_mult=int(ffn.shape[0]) // d, num_classes=1,
        class_dropout_prob=DI_R_CAPTION_DROPOUT, learn_sigma=out == 2 * in_channels, pos_embed=pos_embed,
        scan="causal", skip=False, mix_lora_rank=int(_need(tensors, "blocks.0.att.time_maa_w2", where).shape[1]),
        decay_lora_rank=int(_need(tensors, "blocks.0.att.time_decay_w1", where).shape[1]), condition="text",
        text_width=0 if int(emb.shape[1]) == d else int(emb.shape[1]), text_depth=text_depth,
        text_vocab=int(emb.shape[0]), block_norm_eps=DI_R_NORM_EPS)
    try:
        return validate(DiRSpec(**values))
    except SpecError as err:
        raise FormatError(f"{where}: the sizes read off the tensors make no valid spec: {err}") from None


def _fold_block_norms(tensors, i: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """adaLN_modulation.1 of block i with norm1/norm2's affine parameters folded in (float64 maths)."""
    weight = tensors[f"blocks.{i}.adaLN_modulation.1.weight"].astype(np.float64).copy()  # [6D, D]
    bias = tensors[f"blocks.{i}.adaLN_modulation.1.bias"].astype(np.float64).copy()  # [6D]
    for norm, (shift, scale) in (("norm1", (0, 1)), ("norm2", (3, 4))):
        g = tensors[f"blocks.{i}.{norm}.weight"].astype(np.float64)
        b = tensors[f"blocks.{i}.{norm}.bias"].astype(np.float64)
        hs, ss = slice(shift * d, (shift + 1) * d), slice(scale * d, (scale + 1) * d)
        w_s, b_s = weight[ss].copy(), bias[ss].copy()
        weight[hs] += b[:, None] * w_s
        bias[hs] += b * (1.0 + b_s)
        weight[ss] = g[:, None] * w_s
        bias[ss] = g * (1.0 + b_s) - 1.0
    return weight.astype(np.float32), bias.astype(np.float32)


def di_r_to_canonical(tensors: dict[str, np.ndarray], spec: DiRSpec, where: str = "Di-R file") -> dict[str, np.ndarray]:
    """Di-R v0 tensors (float32 numpy, Di-R's names) -> the canonical state of ``spec``."""
    table = {info.name: info.shape for info in parameter_table(spec)}
    out, used, problems = {}, set(), []
    d = spec.hidden_size
    for i in range(spec.depth):
        names = [f"blocks.{i}.{n}.{leaf}" for n in ("norm1", "norm2", "adaLN_modulation.1") for leaf in ("weight", "bias")]
        missing = [n for n in names if n not in tensors]
        if missing:
            problems += [f"missing: {n}" for n in missing]
            continue
        weight, bias = _fold_block_norms(tensors, i, d)
        out[f"blocks.{i}.adaLN_modulation.1.weight"], out[f"blocks.{i}.adaLN_modulation.1.bias"] = weight, bias
        used.update(names)
    for name, shape in table.items():
        if name in out:
            continue
        source = name.replace("text_encoder.", _TEXT_SOURCE, 1) if name.startswith("text_encoder.") else name
        if name == "text_encoder.null_embedding":
            source = "text_encoder.null_embeddings"
        if name == "pos_embed":  # only a learned pos_embed is a parameter; Di-R's is fixed sin-cos
            problems.append("pos_embed: Di-R's positions are fixed sin-cos (or none), never learned")
            continue
        if source not in tensors:
            problems.append(f"missing: {source} (for {name}, shape {list(shape)})")
            continue
        value = np.asarray(tensors[source], dtype=np.float32)
        if tuple(value.shape) != tuple(shape):
            if value.size == int(np.prod(shape)) and tuple(s for s in value.shape if s != 1) == \
                    tuple(s for s in shape if s != 1):  # [1, 1, D] -> [D]
                value = value.reshape(shape)
            else:
                problems.append(f"wrong shape: {source} is {list(value.shape)}, expected {list(shape)} (for {name})")
                continue
        out[name] = np.ascontiguousarray(value)
        used.add(source)
    extra = sorted(n for n in tensors if n not in used and not _IGNORED.match(n) and n != "pos_embed")
    problems += [f"not mapped: {n} (shape {list(np.shape(tensors[n]))})" for n in extra]
    if problems:
        raise FormatError(f"{where}: does not map onto the DiR parameter table:\n  " + "\n  ".join(problems))
    return out


def check_pos_embed(tensors: dict[str, np.ndarray], spec: DiRSpec, where: str) -> None:
    """A saved ``pos_embed`` (Di-R saves none) must be the sin-cos table the spec implies."""
    if "pos_embed" not in tensors:
        return
    from common.params import sincos_pos_embed_2d

    expected = sincos_pos_embed_2d(spec.hidden_size, spec.grid_size)[None]
    found = np.asarray(tensors["pos_embed"], dtype=np.float32)
    if spec.pos_embed != "sincos" or found.shape != expected.shape or not np.allclose(found, expected, atol=1e-2):
        raise FormatError(f"{where}: holds a pos_embed {list(found.shape)} that is not the {spec.grid_size}x"
                          f"{spec.grid_size} sin-cos table of --pos-embed sincos at --input-size {spec.input_size}")


def read_di_r(stored: dict, input_size: int, pos_embed: str, where: str) -> tuple[dict[str, np.ndarray], DiRSpec]:
    """(canonical float32 state, spec) from a Di-R v0 state dict already read safely (``Stored`` values)."""
    tensors = {}
    for name, value in stored.items():
        if not value.is_float:
            raise FormatError(f"{where}: {name} has dtype {value.dtype}; a Di-R checkpoint holds floating-point tensors")
        tensors[name] = value.to_float32()
    spec = di_r_spec(tensors, input_size, pos_embed, where)
    check_pos_embed(tensors, spec, where)
    return di_r_to_canonical(tensors, spec, where), spec
