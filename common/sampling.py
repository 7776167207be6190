"""Sampling bookkeeping shared by every backend: which classes, which names, what gets written.

Outputs of one sampling run (``out_dir``):

* ``grid.png``          all samples, one row per requested class;
* ``images/NNNNNN_cK.png`` one PNG per image (K = class id);
* ``samples.npz``       ``arr_0`` uint8 [N, H, W, C] (what FID tools read) and
                        ``arr_1`` int64 [N] class labels (ADM's layout); ``labels`` is the same array.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.checkpoint import atomic_path, atomic_write
from common.config import ConfigError, closest_key
from common.data import DIGIT_NAMES
from common.images import make_grid, save_png
from common.spec import DiRSpec

IMAGENET_CLASSES_JSON = Path(__file__).with_name("imagenet_classes.json")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet names by id, each the standard comma-separated synonym list."""
    table = json.loads(IMAGENET_CLASSES_JSON.read_text())["classes"]
    return [entry["name"] for entry in sorted(table, key=lambda e: e["id"])]


def imagenet_wnids() -> list[str]:
    table = json.loads(IMAGENET_CLASSES_JSON.read_text())["classes"]
    return [entry["wnid"] for entry in sorted(table, key=lambda e: e["id"])]


def class_names_for(setting: str, num_classes: int, train_config: dict | None) -> list[str] | None:
    """The id -> name table the ``class_names`` sample key asks for (None: classes by index only)."""
    if setting == "none":
        return None
    if setting == "imagenet":
        names = imagenet_class_names()
    elif setting == "digits":
        names = list(DIGIT_NAMES)
    elif setting == "auto":
        dataset = (train_config or {}).get("dataset")
        if dataset == "digits":
            names = list(DIGIT_NAMES)
        elif dataset == "imagefolder" and Path(train_config.get("data_path") or "").is_dir():
            root = Path(train_config["data_path"])
            names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        elif num_classes == 1000:
            names = imagenet_class_names()
        else:
            return None
    else:
        path = Path(setting)
        if not path.is_file():
            raise ConfigError(f"key 'class_names' = '{setting}': not auto/imagenet/digits/none and no such JSON file")
        try:
            names = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"key 'class_names': '{path}' is not valid JSON ({err})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"key 'class_names': '{path}' must hold a JSON list of strings (name of class i at i)")
    if len(names) != num_classes:
        raise ConfigError(f"key 'class_names' = '{setting}' gives {len(names)} names but the model has {num_classes} classes")
    return names


def _name_index(names: list[str]) -> dict[str, int]:
    """Lower-cased full names and each comma-separated synonym -> class id (first wins)."""
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        for alias in [name, *name.split(",")]:
            index.setdefault(alias.strip().lower(), i)
    return index


def parse_classes(classes, num_classes: int, names: list[str] | None) -> list[int]:
    """``"all"`` or a list of indices / names -> class ids, in the order given."""
    if classes == "all":
        return list(range(num_classes))
    if isinstance(classes, (str, int)):
        classes = [classes]
    lookup = _name_index(names) if names else {}
    ids = []
    for item in classes:
        if isinstance(item, bool):
            raise ConfigError(f"key 'classes': {item!r} is not a class index or name")
        if isinstance(item, int) or (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
            value = int(item)
            if not 0 <= value < num_classes:
                raise ConfigError(f"key 'classes': class index {value} is out of range; the model has classes 0..{num_classes - 1}")
            ids.append(value)
            continue
        if not isinstance(item, str):
            raise ConfigError(f"key 'classes': {item!r} has type {type(item).__name__}, expected a class index or name")
        if not names:
            raise ConfigError(f"key 'classes': '{item}' is a name but this model's classes have no names; "
                              "give indices, or set class_names")
        key = item.strip().lower()
        if key not in lookup:
            raise ConfigError(f"key 'classes': unknown class name '{item}'{closest_key(key, lookup)}")
        ids.append(lookup[key])
    if not ids:
        raise ConfigError("key 'classes' is an empty list; give 'all' or at least one class")
    return ids


def sample_labels(class_ids: list[int], num_per_class: int) -> np.ndarray:
    """[len(class_ids) * num_per_class] int64: each class repeated, class-major (one grid row each)."""
    return np.repeat(np.asarray(class_ids, dtype=np.int64), num_per_class)


def batches(labels: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]


def write_outputs(out_dir: str | Path, images_nhwc: np.ndarray, labels: np.ndarray, nrow: int,
                  save_images: bool = True, grid_upscale: int = 1, metadata: dict | None = None) -> dict:
    """Write grid.png, images/*.png (optional), samples.npz and info.json; returns their paths."""
    out_dir = Path(out_dir)
    if images_nhwc.dtype != np.uint8 or images_nhwc.ndim != 4 or len(images_nhwc) != len(labels):
        raise ValueError(f"expected uint8 [N, H, W, C] images and N labels, found {images_nhwc.dtype} "
                         f"{images_nhwc.shape} and {len(labels)} labels")
    paths = {"grid": out_dir / "grid.png", "npz": out_dir / "samples.npz", "info": out_dir / "info.json"}
    save_png(paths["grid"], make_grid(images_nhwc, nrow=nrow, upscale=grid_upscale))
    if save_images:
        for i, (image, label) in enumerate(zip(images_nhwc, labels)):
            save_png(out_dir / "images" / f"{i:06d}_c{int(label)}.png", image)
        paths["images"] = out_dir / "images"
    labels = np.asarray(labels, dtype=np.int64)
    with atomic_path(paths["npz"]) as tmp:
        with open(tmp, "wb") as handle:  # a file handle keeps numpy from appending '.npz' to the temp name
            np.savez(handle, arr_0=images_nhwc, arr_1=labels, labels=labels)
    info = {"num_images": int(len(labels)), "shape": list(images_nhwc.shape), **(metadata or {})}
    atomic_write(paths["info"], lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return paths


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels int64 [N]) from a samples.npz, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such samples file")
    try:
        with np.load(path) as data:
            keys = set(data.files)
            if "arr_0" not in keys:
                raise ValueError(f"{path}: no 'arr_0' (images) array; found {sorted(keys)}")
            images = data["arr_0"]
            labels = data["labels"] if "labels" in keys else data["arr_1"] if "arr_1" in keys else None
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable samples .npz ({err})") from None
    if labels is None:
        raise ValueError(f"{path}: no class labels ('labels' or 'arr_1'); conditional samples are needed")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 is {images.dtype} of shape {images.shape}, expected uint8 [N, H, W, C]")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def is_latent_model(spec: DiRSpec, train_config: dict | None) -> bool:
    """Whether samples are VAE latents to decode (canonical weights carry no config: 4 channels are)."""
    if train_config is not None:
        return train_config.get("dataset") == "latents"
    return spec.in_channels == 4


def diffusion_settings(train_config: dict | None) -> tuple[int, str]:
    """The training schedule (DiT's 1000 linear steps for canonical weights without a config)."""
    config = train_config or {}
    return int(config.get("diffusion_steps", 1000)), str(config.get("noise_schedule", "linear"))
