"""Importing a yynil/Di-R v0 model.pth (tools/convert_ckpt.py --src-format di-r): a state dict laid out
exactly as Di-R's definitions lay it out ([1, 1, D] mixes, affine norm1/norm2 at eps 1e-5, a text
encoder under text_encoder.rwkvModel, bf16 tensors) gives, through our model, the forward output of
Di-R's own block and pooling definitions (written out here, not taken from our DiRBlock)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from backends.torch.models import DiR  # noqa: E402
from common.formats.di_r import di_r_spec, di_r_to_canonical  # noqa: E402
from common.formats.errors import FormatError  # noqa: E402
from common.params import init_canonical  # noqa: E402
from common.spec import build_spec  # noqa: E402
from tests.conftest import REPO_ROOT, run_python  # noqa: E402

SPEC = dict(hidden_size=64, depth=3, head_size=32, input_size=8, in_channels=4, num_classes=1, condition="text",
            text_depth=2, mix_lora_rank=8, decay_lora_rank=8, scan="causal", pos_embed="none",
            block_norm_eps=1e-5)


def di_r_state(seed=0):
    """A Di-R v0 state dict (numpy float32) for SPEC's sizes, every tensor random, and the spec."""
    spec = build_spec("DiR-Tiny/2", **SPEC)
    rng = np.random.default_rng(seed)
    ours = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init_canonical(spec).items()}
    d = spec.hidden_size
    out = {}
    for name, value in ours.items():
        if name.startswith("text_encoder."):
            name = "text_encoder.null_embeddings" if name.endswith("null_embedding") else \
                name.replace("text_encoder.", "text_encoder.rwkvModel.", 1)
        if value.ndim == 1 and (".time_maa_" in name or name.endswith(".time_decay")):
            value = value.reshape(1, 1, -1)  # Di-R keeps mixes and the decay as [1, 1, D]
        out[name] = value
    for i in range(spec.depth):
        for norm in ("norm1", "norm2"):
            out[f"blocks.{i}.{norm}.weight"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
            out[f"blocks.{i}.{norm}.bias"] = (0.2 * rng.standard_normal(d)).astype(np.float32)
    return out, spec


def di_r_forward(model, tensors, x, t, ids):
    """Di-R's DiRWKV.forward (models.py, v0) over the submodules of ``model`` holding Di-R's tensors."""
    d = model.spec.hidden_size
    text = model.text_encoder
    h = text.emb(ids)
    for block in text.blocks:  # RWKV(args): ln0 on block 0; x + att(ln1(x)); x + ffn(ln2(x))
        h = block.ln0(h) if block.ln0 is not None else h
        h = h + block.att(block.ln1(h))
        h = h + block.ffn(block.ln2(h))
    h = text.ln_out(h)
    idx = torch.eq(ids, 1).int().argmax(-1)  # RwkvForSequenceEmbedding: the first EOS; 0 -> null_embeddings
    pooled = h[torch.arange(len(ids)), idx]
    pooled = torch.where((idx == 0)[:, None], torch.from_numpy(tensors["text_encoder.null_embeddings"]), pooled)
    c = model.t_embedder(t) + pooled
    z = model.x_embedder(x)
    for i, block in enumerate(model.blocks):  # DiRWKVBlock: affine LayerNorms, eps 1e-5
        mod = F.linear(F.silu(c), torch.from_numpy(tensors[f"blocks.{i}.adaLN_modulation.1.weight"]),
                       torch.from_numpy(tensors[f"blocks.{i}.adaLN_modulation.1.bias"]))
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        norm = {k: torch.from_numpy(tensors[f"blocks.{i}.{k}"]) for k in
                ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
        n1 = F.layer_norm(z, (d,), norm["norm1.weight"], norm["norm1.bias"], eps=1e-5)
        z = z + g1.unsqueeze(1) * block.att(n1 * (1 + sc1.unsqueeze(1)) + sh1.unsqueeze(1))
        n2 = F.layer_norm(z, (d,), norm["norm2.weight"], norm["norm2.bias"], eps=1e-5)
        z = z + g2.unsqueeze(1) * block.ffn(n2 * (1 + sc2.unsqueeze(1)) + sh2.unsqueeze(1))
    return model.unpatchify(model.final_layer(z, c))


def inputs():
    gen = torch.Generator().manual_seed(3)
    ids = torch.tensor([[17, 300, 1, 0, 0], [1, 0, 0, 0, 0], [5, 6, 7, 8, 1]])
    return torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([10, 500, 999]), ids


def test_sizes_are_read_off_the_tensors():
    tensors, spec = di_r_state()
    assert di_r_spec(tensors, input_size=8) == spec
    assert di_r_spec(tensors, input_size=16, pos_embed="sincos").input_size == 16


def test_folded_import_gives_di_r_forward():
    tensors, spec = di_r_state()
    ours = DiR(spec).eval()
    ours.load_canonical(di_r_to_canonical(tensors, spec))
    x, t, ids = inputs()
    with torch.no_grad():
        out = ours(x, t, ids)
        ref = di_r_forward(ours, tensors, x, t, ids)  # the same RWKV mixers, Di-R's norms and adaLN
    assert out.abs().max() > 1e-2  # the comparison is not between zeros
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_unmapped_and_missing_tensors_are_named():
    tensors, spec = di_r_state()
    extra = dict(tensors, **{"blocks.0.tiny_q.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(FormatError, match="not mapped: blocks.0.tiny_q.weight"):
        di_r_to_canonical(extra, spec)
    missing = {k: v for k, v in tensors.items() if k != "blocks.1.norm2.bias"}
    with pytest.raises(FormatError, match="missing: blocks.1.norm2.bias"):
        di_r_to_canonical(missing, spec)
    no_text = {k: v for k, v in tensors.items() if not k.startswith("text_encoder")}
    with pytest.raises(FormatError, match="not a Di-R v0 checkpoint"):
        di_r_spec(no_text, 8)


def test_convert_cli_reads_a_bf16_model_pth(tmp_path):
    """Di-R saves att, ffn and the text encoder in bf16 (convert_bfloat16): the converter reads them,
    folds, writes canonical safetensors with the spec and recipe; our model then matches Di-R's forward
    on the same (bf16-rounded) weights."""
    tensors, spec = di_r_state(seed=1)
    stored = {}
    for name, value in tensors.items():
        tensor = torch.from_numpy(value)
        if ".att." in name or ".ffn." in name or name.startswith("text_encoder"):
            tensor = tensor.to(torch.bfloat16)
        stored[name] = tensor
    torch.save(stored, tmp_path / "model.pth")
    rounded = {k: v.float().numpy() for k, v in stored.items()}
    run_python([str(REPO_ROOT / "tools/convert_ckpt.py"), "--src", str(tmp_path / "model.pth"), "--src-format", "di-r",
                "--input-size", "8", "--dst", str(tmp_path / "dir.safetensors")])
    from common.formats import read_checkpoint, read_contents

    state, read_spec = read_checkpoint(tmp_path / "dir.safetensors")
    assert read_spec == spec
    recipe = read_contents(tmp_path / "dir.safetensors").recipe
    assert (recipe.objective, recipe.data, recipe.latent_scale, recipe.diffusion_steps) == ("ddpm", "latents", 0.18215, 1000)
    ours = DiR(spec).eval()
    ours.load_canonical(state)
    x, t, ids = inputs()
    with torch.no_grad():
        out, ref = ours(x, t, ids), di_r_forward(ours, rounded, x, t, ids)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_convert_cli_needs_the_input_size(tmp_path):
    import subprocess
    import sys

    tensors, _ = di_r_state()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "model.pth")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools/convert_ckpt.py"), "--src", str(tmp_path / "model.pth"),
                           "--src-format", "di-r", "--dst", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "needs --input-size" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()
