"""Captioned images as numpy: Di-R's zip layout, a plain folder, and captioned handwritten digits.

Every source here answers, like those of :mod:`common.data`,
``source[(index, flip)] -> (x, caption, skipped)``:

* ``x``: ``[C, H, W]`` float32 in ``[-1, 1]``, exactly what :class:`common.data.ImageFolderSource`
  gives (RGB, ADM centre crop to ``image_size``, flipped left-right when ``flip``);
  one channel for the digits;
* ``caption``: the caption, a ``str`` (surrounding whitespace stripped; tokenize it with
  :mod:`common.text`);
* ``skipped``: int64 ``[len(BAD_ITEM_KINDS)]``, how many bad items were passed over to
  produce this one, by kind (:data:`BAD_ITEM_KINDS`: ``zip``, ``caption``, ``image``);
  ``skipped.sum()`` is the total the trainer logs, as for the other sources, and
  :func:`bad_item_counts` names them.

A bad item is skipped with an :class:`common.data.UnreadableItemWarning` and the next
readable one takes its place, as in ImageFolder; :data:`common.data.MAX_CONSECUTIVE_BAD`
in a row is a :class:`common.data.DataError`. Sharding by rank is the
:class:`common.data.StepSampler`'s: each process reads only the keys of its share, so it
opens only the zips those keys live in.
"""
from __future__ import annotations

import collections
import io
import os
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from common.data import (
    DIGIT_NAMES, IMAGE_EXTENSIONS, MAX_CONSECUTIVE_BAD, DataError, DigitsSource, MnistSource, UnreadableItemWarning,
)
from common.data import read_image as decode_image

BAD_ITEM_KINDS = ("zip", "caption", "image")
"""What makes an item bad, the order of ``skipped``; an item counts once, under the first fault found:

* ``zip``: the archive is missing, not a zip, or a member cannot be extracted (CRC, truncated, encrypted);
* ``caption``: the caption file is missing, larger than :data:`MAX_CAPTION_BYTES`, not UTF-8 or blank;
* ``image``: the image file is missing, larger than :data:`MAX_IMAGE_BYTES`, or does not decode
  (or declares more than ``common.data.MAX_IMAGE_PIXELS`` pixels).
"""
META_FILE = "meta.txt"
MAX_CAPTION_BYTES = 1 << 20  # a caption is cut to 128 tokens anyway; a bigger .txt is not a caption
MAX_IMAGE_BYTES = 256 << 20  # refused before it is read out of a zip
DEFAULT_MAX_OPEN_ZIPS = 64  # open zip handles kept per process (Di-R keeps 240 readers)
CAPTION_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS  # .jpg, .png, .webp and the rest ImageFolder reads


class BadItem(DataError):
    """One item is bad; ``kind`` (one of :data:`BAD_ITEM_KINDS`) says what is wrong with it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def no_skips() -> np.ndarray:
    """int64 ``[len(BAD_ITEM_KINDS)]`` zeros: the ``skipped`` of an item that needed no skip."""
    return np.zeros(len(BAD_ITEM_KINDS), dtype=np.int64)


def bad_item_counts(skipped) -> dict[str, int]:
    """``{kind: count}`` of one item's ``skipped`` or a stack of them (``[..., len(BAD_ITEM_KINDS)]``)."""
    totals = np.asarray(skipped, dtype=np.int64).reshape(-1, len(BAD_ITEM_KINDS)).sum(axis=0)
    return {kind: int(n) for kind, n in zip(BAD_ITEM_KINDS, totals)}


def decode_caption(data: bytes, where) -> str:
    """Caption bytes as text: strict UTF-8 (a BOM dropped), surrounding whitespace stripped.

    Raises :class:`BadItem` of kind ``caption`` for bytes that are not UTF-8 or a blank caption.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadItem("caption", f"{where}: the caption is not UTF-8 ({err.reason} at byte {err.start})") from None
    text = text.strip()
    if not text:
        raise BadItem("caption", f"{where}: the caption is blank")
    return text


class _CaptionSource:
    """Shared item contract and skip loop; subclasses define ``__len__``, ``_read(i)`` and ``item_name(i)``."""

    in_channels = 3
    num_classes = None
    class_names = None

    def _read(self, index: int) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    def item_name(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int) -> tuple[np.ndarray, str]:
        """Item ``index`` as ``(x [3, S, S] float32, caption)``, no skipping: raises on a bad item."""
        return self._read(index)

    def __getitem__(self, key):
        index, flip = key
        n = len(self)
        skipped = no_skips()
        for offset in range(min(n, MAX_CONSECUTIVE_BAD)):
            i = (index + offset) % n
            try:
                x, caption = self._read(i)
            except BadItem as err:
                skipped[BAD_ITEM_KINDS.index(err.kind)] += 1
                warnings.warn(f"skipping bad item {self.item_name(i)} ({err.kind}): {err}", UnreadableItemWarning,
                              stacklevel=2)
                continue
            if flip:
                x = x[:, :, ::-1].copy()
            return x, caption, skipped
        raise DataError(f"{self.root}: {min(n, MAX_CONSECUTIVE_BAD)} bad items in a row from "
                        f"{self.item_name(index)} ({bad_item_counts(skipped)}); the data set looks broken, "
                        f"refusing to train on it")


# ---- Di-R's layout: zips and meta.txt -------------------------------------------------------------

class _Strings:
    """Many strings in two numpy arrays (UTF-8 bytes and offsets) instead of a list of objects, so forked
    loader workers do not copy them page by page as reference counts change."""

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


def read_zip_meta(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """The items of a Di-R ``meta.txt``: ``[(zip path relative to the root, image name, caption name)]``.

    One item a line, three tab-separated fields (a trailing ``\\r`` is dropped; empty lines
    are ignored). Raises :class:`DataError` naming the file and the 1-based line number for
    a line with another number of fields, an empty field or an absolute zip path.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"zips: cannot read {path} ({err.strerror or err}); expected one line per item: "
                        f"<zip path>\\t<image name>\\t<caption name> (common.captions.write_zip_meta builds it)") \
            from None
    items = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line:
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: the line is not UTF-8") from None
        fields = text.split("\t")
        if len(fields) != 3:
            raise DataError(f"{path}:{number}: {len(fields)} tab-separated field{'s' * (len(fields) != 1)}, "
                            f"expected 3 (<zip path>\\t<image name in the zip>\\t<caption .txt name in the zip>): "
                            f"{text[:120]!r}")
        if not all(fields):
            raise DataError(f"{path}:{number}: field {fields.index('') + 1} of 3 is empty: {text[:120]!r}")
        if os.path.isabs(fields[0]):
            raise DataError(f"{path}:{number}: zip path '{fields[0]}' is absolute, expected a path relative "
                            f"to the folder of the zips")
        items.append((fields[0], fields[1], fields[2]))
    return items


def write_zip_meta(root: str | os.PathLike, meta: str = META_FILE) -> int:
    """Write ``root/meta`` for the zips under ``root``, as Di-R rebuilds a missing one; returns the item count.

    Every ``**/*.zip`` (sorted) is listed; each image member (ImageFolder's extensions)
    with a ``.txt`` member of the same stem beside it is one item, in the zip's order.
    A zip that does not open is left out with an :class:`UnreadableItemWarning`.
    """
    from common.atomic import atomic_path

    root = Path(root)
    lines = []
    for zip_path in sorted(root.rglob("*.zip")):
        relative = zip_path.relative_to(root).as_posix()
        try:
            with zipfile.ZipFile(zip_path) as archive:
                names = [info.filename for info in archive.infolist() if not info.is_dir()]
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as err:
            warnings.warn(f"write_zip_meta: leaving out {zip_path}: {err}", UnreadableItemWarning, stacklevel=2)
            continue
        members = set(names)
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in CAPTION_IMAGE_EXTENSIONS and stem + ".txt" in members \
                    and not any(c in s for s in (relative, name) for c in "\t\r\n"):
                lines.append(f"{relative}\t{name}\t{stem}.txt\n")
    with atomic_path(root / meta) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return len(lines)


class ZipCaptionSource(_CaptionSource):
    """Di-R's captioned data: zips under ``root`` and ``root/meta.txt`` naming one item a line.

    ``meta.txt`` (:func:`read_zip_meta`): ``<zip path relative to root>\\t<image name in the
    zip>\\t<caption .txt name in the zip>``. Images and captions are read straight from the
    zips; each process keeps at most ``max_open_zips`` zip handles open (least recently used
    closed first; reopened after a fork, dropped when pickled). Items are
    ``(x [3, S, S] float32, caption, skipped [3] int64)`` (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike, image_size: int, meta: str = META_FILE,
                 max_open_zips: int = DEFAULT_MAX_OPEN_ZIPS):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"zips: data_path '{root}' is not a folder")
        if max_open_zips < 1:
            raise DataError(f"zips: max_open_zips = {max_open_zips}, expected at least 1")
        items = read_zip_meta(root / meta)
        if not items:
            raise DataError(f"zips: {root / meta} lists no items")
        zips: dict[str, int] = {}
        self.zip_index = np.array([zips.setdefault(z, len(zips)) for z, _, _ in items], dtype=np.int32)
        self.zips = list(zips)  # zip paths relative to root, in order of first appearance
        self.images = _Strings([image for _, image, _ in items])
        self.captions = _Strings([caption for _, _, caption in items])
        self.root, self.meta, self.image_size, self.max_open_zips = root, root / meta, image_size, max_open_zips
        self._handles: collections.OrderedDict[int, zipfile.ZipFile] = collections.OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.zip_index)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = collections.OrderedDict()
        return state

    def item_name(self, index: int) -> str:
        return f"{self.root / self.zips[self.zip_index[index]]}:{self.images[index]}"

    def open_zips(self) -> int:
        """How many zip handles this process holds open now (at most ``max_open_zips``)."""
        return len(self._handles) if self._pid == os.getpid() else 0

    def close(self) -> None:
        """Close every zip handle this process holds (they reopen on demand)."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles.clear()

    def _archive(self, z: int) -> zipfile.ZipFile:
        if self._pid != os.getpid():  # forked: the parent's handles share file offsets with it; never use them
            self._handles, self._pid = collections.OrderedDict(), os.getpid()
        handle = self._handles.get(z)
        if handle is not None:
            self._handles.move_to_end(z)
            return handle
        path = self.root / self.zips[z]
        try:
            handle = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise BadItem("zip", f"{path}: no such zip") from None
        except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as err:
            raise BadItem("zip", f"{path}: not a readable zip ({err})") from None
        self._handles[z] = handle
        while len(self._handles) > self.max_open_zips:
            self._handles.popitem(last=False)[1].close()
        return handle

    def _member(self, archive: zipfile.ZipFile, name: str, kind: str, limit: int, where: str) -> bytes:
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise BadItem(kind, f"{where}: not in the zip") from None
        if info.file_size > limit:
            raise BadItem(kind, f"{where}: {info.file_size:,} bytes, more than the {limit:,} allowed")
        try:
            return archive.read(info)
        except (OSError, zipfile.BadZipFile, zlib.error, ValueError, EOFError, NotImplementedError,
                RuntimeError) as err:  # CRC and truncation errors, unsupported compression, encryption
            raise BadItem("zip", f"{where}: cannot be extracted ({err})") from None

    def _read(self, index: int) -> tuple[np.ndarray, str]:
        z = int(self.zip_index[index])
        archive = self._archive(z)
        zip_path = self.root / self.zips[z]
        caption_name, image_name = self.captions[index], self.images[index]
        caption_where, image_where = f"{zip_path}:{caption_name}", f"{zip_path}:{image_name}"
        caption = decode_caption(self._member(archive, caption_name, "caption", MAX_CAPTION_BYTES, caption_where),
                                 caption_where)
        data = self._member(archive, image_name, "image", MAX_IMAGE_BYTES, image_where)
        try:
            return decode_image(io.BytesIO(data), self.image_size, image_where), caption
        except Exception as err:  # PIL, numpy and OS errors all mean "this image is bad"
            raise BadItem("image", f"{image_where}: {err}") from None


# ---- a plain folder: NAME.jpg beside NAME.txt ----------------------------------------------------------

class CaptionFolderSource(_CaptionSource):
    """Images under ``root`` (any depth, sorted), each captioned by ``NAME.txt`` beside ``NAME.<ext>``.

    ``<ext>``: ImageFolder's extensions (jpg, jpeg, png, webp, ...; any case). An image
    without its ``.txt`` is listed and counted as a bad ``caption`` item when read; a
    folder where no image has one is a :class:`DataError`. Items are
    ``(x [3, S, S] float32, caption, skipped [3] int64)`` (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike, image_size: int):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"captioned folder: data_path '{root}' is not a folder")
        self.samples: list[tuple[str, str]] = []  # (image path, caption path), as ImageFolderSource.samples
        captioned = 0
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            present = set(files)
            for file in sorted(files):
                stem, ext = os.path.splitext(file)
                if ext.lower() in CAPTION_IMAGE_EXTENSIONS:
                    self.samples.append((os.path.join(dirpath, file), os.path.join(dirpath, stem + ".txt")))
                    captioned += stem + ".txt" in present
        if not self.samples:
            raise DataError(f"captioned folder: no images with extensions {', '.join(CAPTION_IMAGE_EXTENSIONS)} "
                            f"under '{root}'")
        if not captioned:
            raise DataError(f"captioned folder: none of the {len(self.samples)} images under '{root}' has a "
                            f"caption beside it (NAME.txt for NAME.jpg)")
        self.root, self.image_size = root, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def item_name(self, index: int) -> str:
        return self.samples[index][0]

    def _read(self, index: int) -> tuple[np.ndarray, str]:
        image_path, caption_path = self.samples[index]
        try:
            with open(caption_path, "rb") as handle:
                data = handle.read(MAX_CAPTION_BYTES + 1)
        except FileNotFoundError:
            raise BadItem("caption", f"{caption_path}: missing (every image needs NAME.txt beside it)") from None
        except OSError as err:
            raise BadItem("caption", f"{caption_path}: {err.strerror or err}") from None
        if len(data) > MAX_CAPTION_BYTES:
            raise BadItem("caption", f"{caption_path}: more than {MAX_CAPTION_BYTES:,} bytes")
        caption = decode_caption(data, caption_path)
        try:
            if os.path.getsize(image_path) > MAX_IMAGE_BYTES:
                raise DataError(f"more than {MAX_IMAGE_BYTES:,} bytes")
            return decode_image(image_path, self.image_size, image_path), caption
        except Exception as err:  # PIL, numpy and OS errors all mean "this image is bad"
            raise BadItem("image", f"{image_path}: {err}") from None


# ---- the embedded text default: captioned handwritten digits -----------------------------------------------

DIGIT_CAPTION_TEMPLATES = (
    # training phrasings
    "a handwritten {word}",
    "the digit {num}",
    "number {word}, drawn by hand",
    "a handwritten digit {num}",
    "{Word}, written by hand",
    "the number {num} in handwriting",
    "a scanned handwritten {word}",
    "an image of the handwritten digit {word}",
    # held out of training: sampling prompts only (the last HELD_OUT_TEMPLATE_COUNT). Each puts words the
    # training captions use into an arrangement they never have, so what is held out is the phrasing
    # (tested: every token occurs in training, no held-out caption occurs inside a training one).
    "the handwritten number {num}",
    "a {word} in handwriting",
    "an image of the number {num}",
    "the number {word}, written by hand",
)
"""Phrasings of a digit caption: ``{word}`` is the digit's name ("seven"), ``{Word}`` capitalised, ``{num}``
the numeral ("7"). The last :data:`HELD_OUT_TEMPLATE_COUNT` are never used for training."""
HELD_OUT_TEMPLATE_COUNT = 4
TRAIN_DIGIT_TEMPLATES = DIGIT_CAPTION_TEMPLATES[:-HELD_OUT_TEMPLATE_COUNT]
HELD_OUT_DIGIT_TEMPLATES = DIGIT_CAPTION_TEMPLATES[-HELD_OUT_TEMPLATE_COUNT:]
UNSEEN_WORD_DIGIT_TEMPLATES = (
    "a numeral {num}, sketched with a pen",
    "{Word} as a pen-drawn numeral",
)
"""Phrasings whose words, the digit aside, never occur in training (7 of their 10 tokens are new to the
encoder). A caption encoder trained from scratch on the digits has no meaning for those tokens, so these
measure how its state survives unknown words (configs/sample/digits_text_unseen_words.yaml), which varies
widely with the seed; they are not the demo's acceptance prompts."""
_DIGIT_PATTERN = re.compile(r"\b(?:" + "|".join(DIGIT_NAMES) + r"|[0-9])\b", re.IGNORECASE)


def digit_caption(label: int, template: str) -> str:
    """``template`` (one of :data:`DIGIT_CAPTION_TEMPLATES`) filled in for the digit ``label`` (0..9)."""
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"digit label {label} is outside 0..9")
    word = DIGIT_NAMES[label]
    return template.format(word=word, Word=word.capitalize(), num=str(label))


def digits_named(caption: str) -> list[int]:
    """The digits a caption names, by name or numeral, in order (``"the digit 7"`` -> ``[7]``)."""
    found = []
    for match in _DIGIT_PATTERN.findall(caption):
        token = match.lower()
        found.append(int(token) if token.isdigit() else DIGIT_NAMES.index(token))
    return found


# Context a training caption may be wrapped in, so the text encoder learns that the digit's name or
# numeral is what matters, wherever it stands and whatever surrounds it.
TRAIN_CAPTION_PREFIXES = ("", "", "here is ", "this shows ", "look: ", "scanned: ", "photo of ", "picture: ")
TRAIN_CAPTION_SUFFIXES = ("", "", " on paper", ", black and white", " in ink", ", small", ", centered",
                          ", grayscale", " from a form", ", low resolution")
# Words slipped in at random places (up to two a caption), so no one sequence of context words is learned.
TRAIN_CAPTION_FILLERS = ("old", "neat", "messy", "faded", "bold", "thin", "tiny", "large", "dark", "clear",
                         "rough", "simple", "plain", "quick", "careful", "slanted")
DEFAULT_CAPTIONS_PER_IMAGE = 8


def train_digit_captions(labels: Sequence[int], seed: int = 0, per_image: int = 1) -> list[str]:
    """Training captions: ``labels`` ``[N]`` (0..9) -> ``N * per_image`` captions, image ``i``'s
    ``per_image`` captions at ``[i * per_image, (i + 1) * per_image)``.

    Each is a training template of :data:`TRAIN_DIGIT_TEMPLATES` filled in for the digit, between a
    prefix of :data:`TRAIN_CAPTION_PREFIXES` and a suffix of :data:`TRAIN_CAPTION_SUFFIXES`, with up
    to two words of :data:`TRAIN_CAPTION_FILLERS` slipped in at random word boundaries, all drawn
    once from ``numpy.random.default_rng([seed, 15])``: a pure function of (labels, seed, per_image),
    the same on every process and every epoch. Held-out phrasings never occur.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng([seed, 15])
    n = len(labels) * per_image
    templates = rng.integers(len(TRAIN_DIGIT_TEMPLATES), size=n)
    prefixes = rng.integers(len(TRAIN_CAPTION_PREFIXES), size=n)
    suffixes = rng.integers(len(TRAIN_CAPTION_SUFFIXES), size=n)
    fillers = rng.integers(len(TRAIN_CAPTION_FILLERS), size=(n, 2))
    counts = rng.integers(0, 3, size=n)
    places = rng.random((n, 2))
    captions = []
    for j, t in enumerate(templates):
        words = (TRAIN_CAPTION_PREFIXES[prefixes[j]] + digit_caption(labels[j // per_image], TRAIN_DIGIT_TEMPLATES[t])
                 + TRAIN_CAPTION_SUFFIXES[suffixes[j]]).split(" ")
        for k in range(counts[j]):
            words.insert(int(places[j, k] * (len(words) + 1)), TRAIN_CAPTION_FILLERS[fillers[j, k]])
        captions.append(" ".join(words))
    return captions


def held_out_digit_prompts(per_digit: int = HELD_OUT_TEMPLATE_COUNT, labels: Sequence[int] | None = None,
                           templates: Sequence[str] = HELD_OUT_DIGIT_TEMPLATES) -> tuple[list[str], np.ndarray]:
    """Sampling prompts in phrasings never trained on, and the digit each names.

    Returns ``(prompts, labels)``: ``labels`` int64 ``[N]`` and ``N`` prompts. By default
    each digit 0..9 ``per_digit`` times, row-major as ``common.training.grid_classes``
    (``N = 10 * per_digit``); or the given ``labels``. The j-th prompt of a digit uses
    ``templates[j % len(templates)]`` (default :data:`HELD_OUT_DIGIT_TEMPLATES`; or
    :data:`UNSEEN_WORD_DIGIT_TEMPLATES`), so ``per_digit >= len(templates)`` shows every one.
    """
    if labels is None:
        labels = [d for d in range(10) for _ in range(per_digit)]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    seen = collections.Counter()
    prompts = []
    for label in labels.tolist():
        prompts.append(digit_caption(label, templates[seen[label] % len(templates)]))
        seen[label] += 1
    return prompts, labels


class DigitCaptionSource:
    """The embedded text-to-image default: ``digits`` (scikit-learn, 1797) or ``mnist`` (4500 train), captioned.

    Same images as :class:`common.data.DigitsSource` / :class:`common.data.MnistSource`
    (``[1, S, S]`` float32 in [-1, 1]), each image ``per_image`` times with a fixed caption apiece
    (:func:`train_digit_captions` with ``seed``): item ``j`` is image ``j // per_image``. Items are
    ``(x, caption, skipped [3] int64 zeros)``; ``labels`` ``[N * per_image]`` int64 and ``captions``
    stay available for evaluation.
    """

    def __init__(self, image_size: int, dataset: str = "digits", seed: int = 0,
                 per_image: int = DEFAULT_CAPTIONS_PER_IMAGE):
        if dataset == "digits":
            images = DigitsSource(image_size)
        elif dataset == "mnist":
            images = MnistSource(image_size)
        else:
            raise DataError(f"captioned digits: dataset '{dataset}' unknown; expected digits or mnist")
        self.images, self.per_image = images, per_image
        self.labels = np.repeat(images.labels, per_image)
        self.captions = train_digit_captions(images.labels, seed, per_image)
        self.in_channels, self.num_classes, self.class_names = 1, None, None
        self.image_size, self.dataset, self.seed = image_size, dataset, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, flip = key
        x, _, _ = self.images[(index // self.per_image, flip)]
        return x, self.captions[index], no_skips()


# ---- what the trainer reads ------------------------------------------------------------------------

class TokenizedCaptions:
    """A captioned source as the trainer reads it: items ``(x, ids, skipped)`` with ``ids`` int64
    ``[max_tokens]`` (``common.text``: the caption's ids, its end-of-text, pads; fixed length so
    batches stack and graph modes see one shape).

    ``cut_captions`` counts the captions read in this process that were longer than
    ``max_tokens`` and cut (loader worker processes keep counts of their own).
    """

    def __init__(self, source, max_tokens: int, tokenizer=None):
        from common.text import world_tokenizer

        self.source, self.max_tokens = source, max_tokens
        self.tokenizer = tokenizer or world_tokenizer()
        self.in_channels = source.in_channels
        self.num_classes, self.class_names = None, None
        self.cut_captions = 0

    def __len__(self) -> int:
        return len(self.source)

    def caption(self, index: int) -> str:
        return self.source[(index, False)][1]

    def __getitem__(self, key):
        x, caption, skipped = self.source[key]
        ids, cut = self.tokenizer.encode_caption(caption, self.max_tokens)
        row = np.zeros(self.max_tokens, dtype=np.int64)
        row[:len(ids)] = ids
        self.cut_captions += int(cut)
        return x, row, skipped


def captioned_source(config: dict, max_tokens: int):
    """The captioned data a ``condition: text`` train config asks for, tokenized."""
    kind = config["dataset"]
    if kind in ("digits", "mnist"):
        source = DigitCaptionSource(config["image_size"], kind, config["seed"])
    elif kind == "captions":
        root = Path(config["data_path"])
        if (root / META_FILE).is_file():
            source = ZipCaptionSource(root, config["image_size"])
        else:
            source = CaptionFolderSource(root, config["image_size"])
    else:
        raise DataError(f"key 'dataset' = '{kind}' has no captions; condition: text trains on digits, mnist "
                        "(captioned from their labels) or captions (zips + meta.txt, or NAME.png beside NAME.txt)")
    return TokenizedCaptions(source, max_tokens)


def grid_prompts(config: dict, source, per_prompt: int) -> list[str]:
    """The training grid's prompts, each repeated ``per_prompt`` times (a row each)."""
    if config.get("grid_prompts"):
        prompts = [str(p) for p in config["grid_prompts"]]
    elif config["dataset"] in ("digits", "mnist"):
        prompts, _ = held_out_digit_prompts(1)
    else:
        prompts = [source.caption(i) for i in range(min(8, len(source)))]
    return [p for p in prompts for _ in range(per_prompt)]
