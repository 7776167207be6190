"""The DiR model spec: one dataclass every backend builds its network from.

A spec is plain data (it round-trips through JSON and travels inside every
checkpoint), so the same numbers describe the PyTorch, Paddle and MindSpore
networks. Presets follow DiT's naming: ``DiR-S/2`` is 384 wide and 12 deep with
2x2 patches.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any

from common.scan_orders import SCAN_ORDER_CHOICES, TOKEN_SHIFT_CHOICES

# Numerical constants shared by every backend (changing one changes the model).
LAYER_NORM_EPS = 1e-6  # DiT's adaLN LayerNorm (no affine parameters)
GROUP_NORM_EPS = 64e-5  # RWKV-6 ln_x: 1e-5 * head_size_divisor**2 with divisor 8
FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the t-MLP
MAX_PERIOD = 10000

POS_EMBED_CHOICES = ("none", "sincos", "learned")
SCAN_CHOICES = ("causal", "bidirectional")
CONDITION_CHOICES = ("class", "text")  # class labels, or captions through an RWKV-6 text encoder (Di-R)
TEXT_NORM_EPS = 1e-5  # the text encoder's affine LayerNorms (ln0, ln1, ln2, ln_out): RWKV's and Di-R's


class SpecError(ValueError):
    """A spec field has a value the model cannot be built with."""


@dataclass(frozen=True)
class DiRSpec:
    input_size: int = 32  # side of the latent (or pixel) grid
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    head_size: int = 64
    ffn_mult: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    pos_embed: str = "sincos"
    scan: str = "bidirectional"
    skip: bool = False
    mix_lora_rank: int = 32  # tanh LoRA giving the five data-dependent token-shift mixes
    decay_lora_rank: int = 64  # tanh LoRA giving the data-dependent decay
    condition: str = "class"  # which condition embedder feeds c = t_emb + y_emb
    # condition: text. The caption encoder is a causal RWKV-6 language model of its own size, pooled
    # at the first end-of-text token (Di-R). class_dropout_prob is then the caption dropout.
    text_width: int = 0  # 0: hidden_size; otherwise the pooled state is projected to hidden_size
    text_depth: int = 4
    text_vocab: int = 65536  # the RWKV "world" tokenizer's ids (common/text.py)
    text_max_tokens: int = 128  # a caption is cut to this many ids, its end-of-text token included
    # Parameter-free 2-D layout (common/scan_orders.py): what a token mixes with, and the order
    # each block scans in. Specs saved before these fields existed read as raster/raster.
    token_shift: str = "raster"
    scan_order: str = "raster"
    # eps of the blocks' adaLN LayerNorms (norm1, norm2): DiT's 1e-6; Di-R's imported blocks use 1e-5
    block_norm_eps: float = LAYER_NORM_EPS

    # ---- derived sizes -------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def ffn_hidden_size(self) -> int:
        return self.hidden_size * self.ffn_mult

    @property
    def num_blocks(self) -> int:
        """Blocks actually built: with skips, U-ViT's depth//2 in + 1 mid + depth//2 out."""
        return 2 * (self.depth // 2) + 1 if self.skip else self.depth

    @property
    def num_in_blocks(self) -> int:
        return self.depth // 2 if self.skip else 0

    def is_out_block(self, index: int) -> bool:
        """True for the blocks that fuse a long skip (only when ``skip``)."""
        return self.skip and index > self.num_in_blocks

    def skip_source(self, index: int) -> int:
        """The in-block whose output out-block ``index`` fuses (U-ViT's stack order)."""
        i = index - self.num_in_blocks - 1
        return self.num_in_blocks - 1 - i

    @property
    def has_null_class(self) -> bool:
        """DiT keeps an extra "null" label row only when labels are dropped in training (for
        captions: the text encoder's learned null embedding)."""
        return self.class_dropout_prob > 0

    @property
    def text_hidden_size(self) -> int:
        return self.text_width or self.hidden_size

    @property
    def has_text_projection(self) -> bool:
        return self.condition == "text" and self.text_hidden_size != self.hidden_size

    def text_encoder_spec(self) -> "DiRSpec":
        """The caption encoder's blocks as a spec of their own: causal RWKV-6 blocks of
        ``text_width`` channels in heads of ``head_size`` (shapes, layer-dependent init)."""
        return DiRSpec(input_size=self.patch_size, in_channels=1, patch_size=self.patch_size,
                       hidden_size=self.text_hidden_size, depth=self.text_depth, head_size=self.head_size,
                       ffn_mult=self.ffn_mult, num_classes=1, class_dropout_prob=0.0, learn_sigma=False,
                       pos_embed="none", scan="causal", skip=False, mix_lora_rank=self.mix_lora_rank,
                       decay_lora_rank=self.decay_lora_rank)

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "spec") -> "DiRSpec":
        _reject_unknown(values, source)
        return validate(cls(**values))

    @classmethod
    def from_json(cls, text: str, source: str = "spec") -> "DiRSpec":
        from common.recipe import unique_keys

        try:
            values = json.loads(text, object_pairs_hook=unique_keys)
        except (ValueError, TypeError, RecursionError) as err:  # JSONDecodeError is a ValueError
            raise SpecError(f"{source}: spec is not valid JSON ({str(err)[:200]})") from None
        if not isinstance(values, dict):
            raise SpecError(f"{source}: spec must be a JSON object, found {type(values).__name__}")
        return cls.from_dict(values, source)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(DiRSpec))

_WIDTHS = {"S": (384, 12), "B": (768, 12), "L": (1024, 24), "XL": (1152, 28)}
PRESETS: dict[str, dict[str, Any]] = {
    f"DiR-{size}/{patch}": {"hidden_size": width, "depth": depth, "patch_size": patch}
    for size, (width, depth) in _WIDTHS.items()
    for patch in (2, 4, 8)
}
# Small enough to train on a 2-core CPU in minutes; the digits demo and tests use it.
PRESETS["DiR-Tiny/2"] = {
    "hidden_size": 128, "depth": 6, "patch_size": 2, "head_size": 32,
    "mix_lora_rank": 16, "decay_lora_rank": 32,
}


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _reject_unknown(values: dict[str, Any], source: str) -> None:
    for key in values:
        if key not in FIELD_NAMES:
            raise SpecError(
                f"{source}: unknown spec field '{key}'{_closest(key, FIELD_NAMES)}; "
                f"valid fields: {', '.join(FIELD_NAMES)}"
            )


def build_spec(model: str, **overrides: Any) -> DiRSpec:
    """A preset by name (``"DiR-S/2"``) with any field overridden."""
    if model not in PRESETS:
        raise SpecError(
            f"unknown model preset '{model}'{_closest(model, PRESETS)}; "
            f"allowed: {', '.join(PRESETS)}"
        )
    _reject_unknown(overrides, f"overrides of {model}")
    return validate(DiRSpec(**{**PRESETS[model], **overrides}))


def _fail(name: str, value: Any, allowed: str) -> None:
    raise SpecError(f"spec field '{name}' = {value!r}: {allowed}")


def validate(spec: DiRSpec) -> DiRSpec:
    """Return ``spec`` unchanged, or raise SpecError naming the field, value and rule."""
    types = {f.name: f.type for f in dataclasses.fields(DiRSpec)}
    for name in FIELD_NAMES:
        value = getattr(spec, name)
        kind = types[name]
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            _fail(name, value, "must be an integer")
        if kind == "bool" and not isinstance(value, bool):
            _fail(name, value, "must be true or false")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            _fail(name, value, "must be a number")
        if kind == "str" and not isinstance(value, str):
            _fail(name, value, "must be a string")
    for name in ("input_size", "in_channels", "patch_size", "hidden_size", "depth",
                 "head_size", "ffn_mult", "num_classes", "mix_lora_rank", "decay_lora_rank"):
        if getattr(spec, name) < 1:
            _fail(name, getattr(spec, name), "must be at least 1")
    if spec.input_size % spec.patch_size:
        _fail("input_size", spec.input_size, f"must be a multiple of patch_size ({spec.patch_size})")
    if spec.hidden_size % spec.head_size:
        _fail("hidden_size", spec.hidden_size, f"must be a multiple of head_size ({spec.head_size})")
    if not 0.0 <= spec.class_dropout_prob < 1.0:
        _fail("class_dropout_prob", spec.class_dropout_prob, "must be in [0, 1)")
    if spec.pos_embed not in POS_EMBED_CHOICES:
        _fail("pos_embed", spec.pos_embed, f"allowed: {', '.join(POS_EMBED_CHOICES)}")
    if spec.scan not in SCAN_CHOICES:
        _fail("scan", spec.scan, f"allowed: {', '.join(SCAN_CHOICES)}")
    if spec.token_shift not in TOKEN_SHIFT_CHOICES:
        _fail("token_shift", spec.token_shift, f"allowed: {', '.join(TOKEN_SHIFT_CHOICES)}")
    if spec.scan_order not in SCAN_ORDER_CHOICES:
        _fail("scan_order", spec.scan_order, f"allowed: {', '.join(SCAN_ORDER_CHOICES)}")
    if spec.token_shift == "q_shift" and spec.hidden_size % 4:
        _fail("hidden_size", spec.hidden_size, "must be a multiple of 4 for q_shift (four channel quarters)")
    if spec.token_shift == "q_shift" and spec.scan == "causal":
        _fail("token_shift", spec.token_shift, "q_shift mixes the right and lower neighbours too, so it is not "
              "causal; use scan: bidirectional, or token_shift: raster with scan: causal")
    if not 0.0 < spec.block_norm_eps < 1.0:
        _fail("block_norm_eps", spec.block_norm_eps, "must be in (0, 1)")
    if spec.condition not in CONDITION_CHOICES:
        _fail("condition", spec.condition, f"allowed: {', '.join(CONDITION_CHOICES)}")
    if spec.condition == "text":
        for name in ("text_depth", "text_vocab"):
            if getattr(spec, name) < 1:
                _fail(name, getattr(spec, name), "must be at least 1")
        if spec.text_width < 0:
            _fail("text_width", spec.text_width, "must be 0 (= hidden_size) or a width")
        if spec.text_hidden_size % spec.head_size:
            _fail("text_width", spec.text_width, f"must be a multiple of head_size ({spec.head_size})")
        if spec.text_max_tokens < 2:
            _fail("text_max_tokens", spec.text_max_tokens, "must be at least 2 (a token and the end-of-text)")
    if spec.skip and spec.depth < 2:
        _fail("depth", spec.depth, "long skips need depth >= 2 (depth//2 in-blocks, a mid block, depth//2 out-blocks)")
    if spec.pos_embed == "sincos" and spec.hidden_size % 4:
        _fail("hidden_size", spec.hidden_size, "must be a multiple of 4 for 2-D sin-cos position embeddings")
    return spec
