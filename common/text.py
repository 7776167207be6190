"""Captions as token ids: the RWKV "world" tokenizer, in plain Python, as Di-R uses it.

Di-R conditions on a caption through an RWKV text encoder pooled at the first
end-of-text token. Its tokenizer is RWKV's ``TRIE_TOKENIZER``: a greedy
longest match over the caption's UTF-8 bytes against the 65,529 byte strings of
``rwkv_vocab_v20230424.txt`` (the "world" vocabulary; the embedding table has
:data:`VOCAB_SIZE` = 65,536 rows). This module reads the same file from the
installed ``rwkv`` wheel (``requirements/text.txt``; it is found, never
imported, and nothing else of the wheel is used) and tokenizes exactly as
``TRIE_TOKENIZER`` does (tested on a few hundred strings), with two
differences that do not change any id:

* **loading never executes code from a file**: each vocabulary line
  ``<id> <python str or bytes literal> <byte length>`` is parsed with
  :func:`ast.literal_eval` (RWKV's own loader calls ``eval``), and every line is
  checked (ids, types, byte lengths, no duplicates, all 256 single bytes present);
* the trie is this module's own (nested dicts, built in about a second).

Conventions, as in Di-R: id :data:`PAD_ID` = 0 is not a vocabulary id and pads
rows on the right; id :data:`EOS_ID` = 1 (the byte ``"\\x00"``) ends every
caption. A caption is cut to ``max_tokens`` ids **including** its EOS
(default :data:`DEFAULT_MAX_TOKENS` = 128), and cut captions are counted so the
trainer can log them. The empty caption encodes to ``[EOS]``, which is also the
null (unconditional) caption: the encoder pools at position 0.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common.data import DataError

PAD_ID = 0
EOS_ID = 1
VOCAB_SIZE = 65536  # rows of the text embedding; the file uses ids 1..65529
DEFAULT_MAX_TOKENS = 128  # Di-R's training cut, EOS included here
VOCAB_PACKAGE = "rwkv"
VOCAB_FILE = "rwkv_vocab_v20230424.txt"
# sha256 of rwkv/rwkv_vocab_v20230424.txt as shipped in the rwkv 0.8.32 wheel (and every release since 2023):
# token ids are part of a trained model, so the default file must be exactly this one.
VOCAB_SHA256 = "8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008"
_MAX_LINE_CHARS = 4096  # the longest line of the real file has 147; anything far longer is not a vocabulary line
_ID = 256  # the key under which a trie node keeps its token id (byte keys are 0..255)


class VocabularyError(DataError):
    """The vocabulary file cannot be used; the message names the file and the line."""


def world_vocab_path() -> Path:
    """Where the installed ``rwkv`` wheel keeps ``rwkv_vocab_v20230424.txt``.

    Found with :func:`importlib.util.find_spec`, which does not import the package
    (``import rwkv`` is harmless today, but ``rwkv.model`` pulls torch). Raises
    :class:`VocabularyError` saying what to install when it is missing.
    """
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VocabularyError("captions are tokenized with the RWKV world vocabulary shipped in the rwkv wheel, "
                              "which is not installed: pip install --no-deps -r requirements/text.txt "
                              "(scripts/setup_env.sh does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE
    if not path.is_file():
        raise VocabularyError(f"{path} is missing from the installed rwkv; reinstall requirements/text.txt")
    return path


def read_vocab(path: str | os.PathLike, sha256: str | None = None) -> dict[int, bytes]:
    """The vocabulary file at ``path`` as ``{id: token bytes}``, every line checked, no code run.

    Line format (UTF-8, ``\\n`` separated): ``<id> <python str or bytes literal> <byte
    length>``; a str literal stands for its UTF-8 bytes, whose length must equal the
    declared one. Ids must be unique and in ``1..VOCAB_SIZE-1``, tokens unique and
    non-empty, and all 256 single bytes must be tokens (so every input encodes).
    ``sha256``: when given, the file's digest must match it. Raises
    :class:`VocabularyError` naming the file and the 1-based line number.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise VocabularyError(f"cannot read the vocabulary {path}: {err}") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise VocabularyError(f"{path}: sha256 {hashlib.sha256(raw).hexdigest()}, expected {sha256} (the RWKV "
                              f"world vocabulary of rwkv 0.8.32); reinstall requirements/text.txt")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise VocabularyError(f"{path}:{line}: not UTF-8 ({err.reason})") from None
    tokens: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if len(line) > _MAX_LINE_CHARS:
            raise VocabularyError(f"{where}: line of {len(line)} characters, expected '<id> <literal> <length>'")
        first, last = line.find(" "), line.rfind(" ")
        head, literal, tail = line[:first], line[first + 1:last].strip(" "), line[last + 1:]
        if first < 1 or last <= first or not literal or not (head.isascii() and head.isdigit()) \
                or not (tail.isascii() and tail.isdigit()):
            raise VocabularyError(f"{where}: expected '<id> <python str or bytes literal> <byte length>', "
                                  f"found {line[:80]!r}")
        try:
            value = ast.literal_eval(literal)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
            raise VocabularyError(f"{where}: the token {literal[:80]!r} is not a python literal "
                                  f"({type(err).__name__})") from None
        if type(value) is str:
            try:
                value = value.encode("utf-8")
            except UnicodeEncodeError:
                raise VocabularyError(f"{where}: the token {literal[:80]!r} is not encodable as UTF-8") from None
        elif type(value) is not bytes:
            raise VocabularyError(f"{where}: the token is a {type(value).__name__}, expected str or bytes")
        index, length = int(head), int(tail)
        if not value or len(value) != length:
            raise VocabularyError(f"{where}: the token has {len(value)} bytes, the line declares {length}")
        if not 1 <= index < VOCAB_SIZE:
            raise VocabularyError(f"{where}: id {index} is outside 1..{VOCAB_SIZE - 1} (0 is the padding id)")
        if index in tokens:
            raise VocabularyError(f"{where}: id {index} appears twice")
        if value in seen:
            raise VocabularyError(f"{where}: token {value!r} already has id {seen[value]}")
        tokens[index], seen[value] = value, index
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise VocabularyError(f"{path}: {len(missing)} single bytes have no token (e.g. {bytes(missing[:3])!r}); "
                              f"some inputs could not be encoded")
    if tokens.get(EOS_ID) != b"\x00":
        raise VocabularyError(f"{path}: id {EOS_ID} must be the byte '\\x00' (it is reused as end-of-text)")
    return tokens


class WorldTokenizer:
    """Greedy longest-match tokenizer over UTF-8 bytes, id-for-id RWKV's ``TRIE_TOKENIZER``.

    ``WorldTokenizer()`` reads the installed rwkv wheel's world vocabulary (its sha256
    checked); ``WorldTokenizer(path)`` reads another file in the same format (every
    line checked, no digest). Prefer :func:`world_tokenizer`, which builds it once per
    process. Instances hold only dicts and lists, so they pickle and fork.
    """

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        if vocab_path is None:
            self.vocab_path = world_vocab_path()
            tokens = read_vocab(self.vocab_path, sha256=VOCAB_SHA256)
        else:
            self.vocab_path = Path(vocab_path)
            tokens = read_vocab(self.vocab_path)
        self._tokens: list[bytes | None] = [None] * VOCAB_SIZE
        root: dict = {}
        for index, value in tokens.items():
            self._tokens[index] = value
            node = root
            for byte in value:
                child = node.get(byte)
                if child is None:
                    child = node[byte] = {}
                node = child
            node[_ID] = index
        self._root = root
        self.num_tokens = len(tokens)

    # ---- ids of one string -----------------------------------------------------------------

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of ``data`` (any bytes): at each position, the longest token that starts there."""
        root, ids, i, n = self._root, [], 0, len(data)
        while i < n:
            node, j, best, end = root, i, -1, i
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                index = node.get(_ID)
                if index is not None:
                    best, end = index, j
            ids.append(best)  # every single byte is a token (checked on load): best >= 1 and end > i
            i = end
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``'s UTF-8 bytes (no EOS added; ``"\\x00"`` would encode to id 1).

        A lone surrogate (not UTF-8 encodable; RWKV's tokenizer raises) is encoded as ``"?"``.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.encode_bytes(text.encode("utf-8", errors="replace"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of vocabulary ids (no special meaning for 0 or 1: 0 is refused, 1 is ``"\\x00"``)."""
        out = []
        for index in ids:
            index = int(index)
            value = self._tokens[index] if 0 <= index < VOCAB_SIZE else None
            if value is None:
                raise ValueError(f"id {index} is not in the vocabulary (ids 1..{self.num_tokens}; 0 is padding)")
            out.append(value)
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text of vocabulary ids; bytes that are not UTF-8 become U+FFFD (``errors`` as in bytes.decode).

        RWKV's ``decode`` returns a single U+FFFD for the whole string instead.
        """
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ---- captions: EOS, cut, padding -------------------------------------------------------------

    def encode_caption(self, caption: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[list[int], bool]:
        """``(ids, cut)``: at most ``max_tokens - 1`` text ids, then :data:`EOS_ID`.

        NUL characters are dropped first (id 1 is the EOS: a NUL would end the caption
        early). ``cut`` is True when text ids were dropped to fit ``max_tokens``.
        """
        _check_max_tokens(max_tokens)
        ids = self.encode(caption.replace("\x00", ""))
        cut = len(ids) > max_tokens - 1
        return ids[:max_tokens - 1] + [EOS_ID], cut

    def encode_batch(self, captions: Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS,
                     fixed_length: bool = False) -> tuple[np.ndarray, int]:
        """``(ids, cut)``: ids int64 ``[N, L]``, one caption a row, and the number of cut captions.

        Each row is :meth:`encode_caption` (EOS included, at most ``max_tokens`` ids)
        padded on the right with :data:`PAD_ID`. ``L`` is the longest row (Di-R's
        collate; at least 1), or ``max_tokens`` with ``fixed_length=True`` (one shape
        for every batch, for graph-compiled backends).
        """
        _check_max_tokens(max_tokens)
        rows, cut = [], 0
        for caption in captions:
            ids, was_cut = self.encode_caption(caption, max_tokens)
            rows.append(ids)
            cut += was_cut
        length = max_tokens if fixed_length else max((len(r) for r in rows), default=1)
        out = np.full((len(rows), length), PAD_ID, dtype=np.int64)
        for i, ids in enumerate(rows):
            out[i, :len(ids)] = ids
        return out, cut

    def decode_caption(self, row: Sequence[int]) -> str:
        """The caption of one padded row: the text ids before its first EOS (pads ignored)."""
        row = [int(i) for i in row]
        end = row.index(EOS_ID) if EOS_ID in row else len(row)
        return self.decode(i for i in row[:end] if i != PAD_ID)

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        """:meth:`decode_caption` of each row of ``ids`` ``[N, L]``."""
        return [self.decode_caption(row) for row in np.asarray(ids).reshape(len(ids), -1)]


def _check_max_tokens(max_tokens: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 2:
        raise ValueError(f"max_tokens = {max_tokens!r}: expected an int >= 2 (text ids plus the EOS)")


@functools.lru_cache(maxsize=2)
def world_tokenizer(vocab_path: str | None = None) -> WorldTokenizer:
    """The process's shared :class:`WorldTokenizer` (built once: about a second)."""
    return WorldTokenizer(vocab_path)


def first_eos(ids: np.ndarray) -> np.ndarray:
    """int64 ``[N]``: the position of each row's first EOS in ``ids`` ``[N, L]``, Di-R's pooling index.

    As Di-R (``argmax(ids == 1)``), a row without an EOS gives 0, i.e. the null caption.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids of shape {ids.shape}, expected [N, L]")
    return np.argmax(ids == EOS_ID, axis=1).astype(np.int64) if ids.shape[1] else np.zeros(len(ids), np.int64)


def null_caption_ids(n: int, length: int = 1) -> np.ndarray:
    """int64 ``[n, length]``: the null caption (EOS at position 0, pads after), as the empty caption encodes.

    Di-R fills null rows with EOS everywhere; both pool at position 0, so they are the same condition.
    """
    if length < 1:
        raise ValueError(f"length = {length}, expected at least 1 (the EOS)")
    out = np.full((n, length), PAD_ID, dtype=np.int64)
    out[:, 0] = EOS_ID
    return out
