"""The valid files each reader is fuzzed with, built deterministically (no randomness beyond fixed seeds).

A :class:`Variant` is one valid file (its bytes and suffix) plus what the reader's check
needs: for checkpoints the canonical float32 weights the valid file holds and, per
canonical tensor, the byte ranges of the file that hold its values (so a mutation that
changed only other bytes must leave that tensor's values exactly as they were).
"""
from __future__ import annotations

import io
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SIZE = 16  # ImageFolderSource image_size of the image reader
LATENT_SIZE = 4  # LatentSource latent_size of the latent reader
LATENT_CLASSES = 10


@dataclass
class Variant:
    name: str
    suffix: str
    data: bytes
    info: dict = field(default_factory=dict)


# ---- checkpoints -------------------------------------------------------------------------------

def checkpoint_spec():
    from common.spec import build_spec

    return build_spec("DiR-Tiny/2", hidden_size=32, depth=2, head_size=16, input_size=4, in_channels=1,
                      num_classes=3, mix_lora_rank=4, decay_lora_rank=4, skip=True, pos_embed="learned")


def checkpoint_weights(spec, seed: int = 1) -> dict[str, np.ndarray]:
    """Canonical weights with every value nudged, so no two tensors share their bytes (zero-init layers too)."""
    from common.params import init_canonical

    rng = np.random.default_rng(seed)
    return {name: (value + 0.05 * rng.standard_normal(value.shape) + 0.01).astype(np.float32)
            for name, value in init_canonical(spec, seed).items()}


def _recipe():
    from common.recipe import recipe_from_config

    return recipe_from_config({"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "cosine",
                               "dataset": "digits"})


def _spans(data: bytes, contents, weights: str = "ema") -> dict[str, list[tuple[int, int]]]:
    """Canonical name -> every byte range of ``data`` holding that tensor's stored bytes."""
    from common.param_mapping import framework_name
    from common.params import parameter_table

    _, stored = contents.weight_set(weights)
    to_canonical = {framework_name(contents.framework, info.name, info.kind): info.name
                    for info in parameter_table(contents.spec)}
    spans: dict[str, list[tuple[int, int]]] = {}
    for fw_name, value in stored.items():
        raw = np.ascontiguousarray(value.array).tobytes()
        found = []
        # protocol-2 pickles hold bytes as the UTF-8 of their latin-1 text (_codecs.encode)
        for pattern in {raw, raw.decode("latin1").encode("utf-8")}:
            start = data.find(pattern)
            while start >= 0:
                found.append((start, start + len(pattern)))
                start = data.find(pattern, start + 1)
        spans[to_canonical[fw_name]] = found
    return spans


def _checkpoint_variant(name: str, suffix: str, path: Path) -> Variant:
    from common.formats import canonical_weights, read_contents

    data = path.read_bytes()
    contents = read_contents(path)
    state, spec, _ = canonical_weights(contents)
    return Variant(name, suffix, data, {"state": state, "spec": spec, "spans": _spans(data, contents),
                                        "layout": contents.layout})


def checkpoint_variants(fmt: str, root: Path) -> list[Variant]:
    from common.formats import cast_for_output, save_pdparams, save_torch, write_checkpoint, write_ms_checkpoint
    from common.param_mapping import to_framework

    spec, recipe = checkpoint_spec(), _recipe()
    state = checkpoint_weights(spec)
    config = {"dataset": "digits", "image_size": 4, "lr": 1e-3, "objective": "ddpm"}
    out = []

    def made(name, suffix, writer):
        path = root / f"{name}.{suffix}"
        writer(path)
        out.append(_checkpoint_variant(name, suffix, path))

    def framework_tensors(framework, dtype):
        return {n: cast_for_output(v, dtype) for n, v in to_framework(framework, state, spec).items()}

    if fmt == "safetensors":
        for dtype in ("fp32", "bf16", "fp16"):
            made(f"canonical_{dtype}", "safetensors",
                 lambda p, d=dtype: write_checkpoint(p, "safetensors", state, spec, dtype=d, step=7, recipe=recipe,
                                                     provenance={"source": "fuzz"}))
    elif fmt == "paddle":
        made("train_fp32", "pdparams", lambda p: write_checkpoint(p, "paddle", state, spec, step=7, config=config,
                                                                  recipe=recipe))
        made("bare_bf16", "pdparams", lambda p: save_pdparams(p, {**framework_tensors("paddle", "bf16"),
                                                                  "spec": spec.to_dict()}))

        def protocol2(p):  # older paddle.save files: protocol 2 (bytes via _codecs.encode), OrderedDict
            from collections import OrderedDict

            arrays = OrderedDict((n, s.array) for n, s in framework_tensors("paddle", "fp32").items())
            with open(p, "wb") as handle:
                pickle.dump({"model": arrays, "ema": arrays, "step": 3, "spec": spec.to_dict(),
                             "recipe": recipe.to_dict()}, handle, protocol=2)
        made("train_p2", "pdparams", protocol2)
    elif fmt == "mindspore":
        made("train_fp32", "ckpt", lambda p: write_checkpoint(p, "mindspore", state, spec, step=7, config=config,
                                                              recipe=recipe))
        made("bare_bf16_nocrc", "ckpt", lambda p: write_ms_checkpoint(
            p, {**framework_tensors("mindspore", "bf16"), "spec": spec.to_json(), "recipe": recipe.to_json()},
            crc_trailer=False))
    elif fmt == "torch":
        made("train_fp32", "pth", lambda p: write_checkpoint(p, "torch", state, spec, step=7, config=config,
                                                             recipe=recipe))
        made("bare_bf16", "pth", lambda p: save_torch(p, {**framework_tensors("torch", "bf16"),
                                                          "spec": spec.to_dict(), "recipe": recipe.to_dict()}))
    else:
        raise ValueError(fmt)
    return out


# ---- configs -------------------------------------------------------------------------------------

SYNTHETIC_CONFIG = """\
# every scalar style PyYAML reads
dataset: "imagefolder"
data_path: 'data/train'   # quoted
image_size: 32
random_flip: yes
model: DiR-Tiny/2
depth: 4
hidden_size: ~
lr: &peak 1e-4
min_lr: *peak
weight_decay: 0
adam_beta2: 0.999
ema_decay: .9999
max_steps: 0x10
global_batch_size: 8
precision: bf16
resume: null
sample_every: -1
log_every: 10
ckpt_every: 20
"""


def config_variants(repo: Path) -> list[Variant]:
    out = [Variant(path.stem, "yaml", path.read_bytes()) for path in sorted((repo / "configs" / "train").glob("*.yaml"))]
    out.append(Variant("synthetic", "yaml", SYNTHETIC_CONFIG.encode()))
    out.append(Variant("flow_mapping", "yaml", b"{dataset: digits, image_size: 16, lr: 2.0e-3, max_steps: 10, "
                                               b"depth: 2, seed: 3}\n"))
    return out


# ---- samples -------------------------------------------------------------------------------------

def sample_variants() -> list[Variant]:
    from common.data import digits_arrays
    from common.images import to_uint8_nhwc

    images, labels = digits_arrays(IMAGE_SIZE)
    pick = np.arange(0, 200, 10)  # 20 real digits, every class twice
    images, labels = to_uint8_nhwc(images[pick]), labels[pick].astype(np.int64)
    out = []
    for name, writer, keys in (("stored", np.savez, ("arr_0", "arr_1", "labels")),
                               ("compressed", np.savez_compressed, ("arr_0", "arr_1")),
                               ("labels_only", np.savez, ("arr_0", "labels"))):
        arrays = {"arr_0": images, "arr_1": labels, "labels": labels}
        handle = io.BytesIO()
        writer(handle, **{k: arrays[k] for k in keys})
        out.append(Variant(name, "npz", handle.getvalue(), {"images": images, "labels": labels}))
    return out


# ---- images --------------------------------------------------------------------------------------

def image_variants() -> list[Variant]:
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = 20, 27
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 9, yy * 12, (xx + yy) * 5], -1).astype(np.uint8) ^ rng.integers(0, 16, (h, w, 3), np.uint8)
    gray = rgb[..., 0]
    out = []

    def saved(name, suffix, image, **kwargs):
        handle = io.BytesIO()
        image.save(handle, format=kwargs.pop("format"), **kwargs)
        out.append(Variant(name, suffix, handle.getvalue()))

    saved("png_rgb", "png", Image.fromarray(rgb), format="PNG")
    saved("png_gray", "png", Image.fromarray(gray), format="PNG")
    saved("png_palette", "png", Image.fromarray(rgb).quantize(16), format="PNG")
    saved("png_rgba", "png", Image.fromarray(np.dstack([rgb, gray])), format="PNG")
    saved("png_gray16", "png", Image.fromarray(gray.astype(np.uint16) * 257), format="PNG")
    saved("jpeg", "jpg", Image.fromarray(rgb), format="JPEG", quality=90)
    saved("jpeg_progressive", "jpeg", Image.fromarray(rgb), format="JPEG", quality=75, progressive=True)
    saved("jpeg_gray", "jpg", Image.fromarray(gray), format="JPEG")
    saved("bmp", "bmp", Image.fromarray(rgb), format="BMP")
    saved("ppm", "ppm", Image.fromarray(rgb), format="PPM")
    saved("pgm", "pgm", Image.fromarray(gray), format="PPM")
    saved("tiff", "tif", Image.fromarray(rgb), format="TIFF")
    saved("tiff_lzw", "tiff", Image.fromarray(rgb), format="TIFF", compression="tiff_lzw")
    saved("webp", "webp", Image.fromarray(rgb), format="WEBP", quality=80)
    saved("png_tall", "png", Image.fromarray(np.repeat(rgb[:, :3], 3, axis=0)), format="PNG")  # 60 x 3
    return out


# ---- latents -------------------------------------------------------------------------------------

def _npy(array: np.ndarray) -> bytes:
    handle = io.BytesIO()
    np.save(handle, array)
    return handle.getvalue()


def latent_variants() -> list[Variant]:
    rng = np.random.default_rng(0)
    s = LATENT_SIZE
    base = (rng.standard_normal((1, 4, s, s)) * 0.18215).astype(np.float32)
    label = _npy(np.array([7], dtype=np.int64))
    out = []
    for name, array in (("f32_batch1", base), ("f16", base[0].astype(np.float16)), ("f64", base[0].astype(np.float64)),
                        ("f32_big_endian", base[0].astype(">f4"))):
        out.append(Variant(name, "npy", _npy(array), {"label": label, "latent": array.reshape(4, s, s)
                                                      .astype(np.float32), "label_value": 7}))
    out.append(Variant("scalar_label", "npy", _npy(base), {"label": _npy(np.array(3, dtype=np.int64)),
                                                            "latent": base[0], "label_value": 3}))
    return out


def zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def build_all(fmt: str, root: Path | None = None) -> list[Variant]:
    root = Path(root or tempfile.mkdtemp(prefix="fuzz-seeds-"))
    root.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    if fmt in ("safetensors", "paddle", "mindspore", "torch"):
        return checkpoint_variants(fmt, root)
    if fmt == "yaml":
        return config_variants(repo)
    if fmt == "samples":
        return sample_variants()
    if fmt == "image":
        return image_variants()
    if fmt == "latent":
        return latent_variants()
    raise ValueError(fmt)


