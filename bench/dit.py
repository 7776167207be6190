"""The DiT baseline the DiR benchmarks compare against (bench only, not a product model).

Peebles & Xie's DiT block: adaLN-Zero, multi-head self-attention (qkv with bias,
then a projection) through ``torch.nn.functional.scaled_dot_product_attention``,
and a 4x GELU(tanh) MLP. The embedders, the sin-cos position table and the final
layer are DiR's own modules (``backends/torch/models.py``), so the two models
differ only in their blocks: attention + MLP (DiT) against RWKV-6 time mixing +
channel mixing (DiR). Weights keep PyTorch's default init (timing does not
depend on values; adaLN gates are left non-zero so no branch is trivially zero).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from backends.torch.models import FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, modulate
from common.params import sincos_pos_embed_2d
from common.spec import LAYER_NORM_EPS, DiRSpec


class Attention(nn.Module):
    """[N, T, D] -> [N, T, D], H heads of D/H channels, no mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # [N, H, T, d/H]
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class DiT(nn.Module):
    """DiT at a DiRSpec's width, depth, heads and patch size (scan/RWKV fields unused)."""

    def __init__(self, spec: DiRSpec):
        super().__init__()
        self.spec = spec
        self.x_embedder = PatchEmbed(spec)
        table = torch.from_numpy(sincos_pos_embed_2d(spec.hidden_size, spec.grid_size))[None]
        self.register_buffer("pos_embed", table, persistent=False)
        self.t_embedder = TimestepEmbedder(spec.hidden_size)
        self.y_embedder = LabelEmbedder(spec.num_classes, spec.hidden_size, spec.class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(spec.hidden_size, spec.num_heads, spec.ffn_mult)
                                    for _ in range(spec.depth))
        self.final_layer = FinalLayer(spec)

    def unpatchify(self, x):
        c, p, h = self.spec.out_channels, self.spec.patch_size, self.spec.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def sdpa_backend(device: str = "cpu", tokens: int = 256, heads: int = 6, head_size: int = 64) -> str:
    """Which SDPA kernel torch picks for these shapes (best effort; private API)."""
    names = {0: "math", 1: "flash_attention", 2: "efficient_attention", 3: "cudnn_attention", 4: "overrideable"}
    try:
        q = torch.zeros(1, heads, tokens, head_size, device=device, requires_grad=True)
        choice = int(torch._fused_sdp_choice(q, q, q))
        return names.get(choice, str(choice))
    except Exception as err:  # noqa: BLE001 - informational only
        return f"unknown ({type(err).__name__})"
