"""The RWKV world tokenizer of common/text.py: id for id RWKV's TRIE_TOKENIZER, loaded without running code."""
import importlib.util
import sys

import numpy as np
import pytest

from common.captions import DIGIT_CAPTION_TEMPLATES, digit_caption
from common.text import (
    DEFAULT_MAX_TOKENS, EOS_ID, PAD_ID, VOCAB_SIZE, VocabularyError, WorldTokenizer, first_eos, null_caption_ids,
    read_vocab, world_tokenizer, world_vocab_path,
)
from tests.conftest import run_python

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer", reason="requirements/text.txt is not installed")


@pytest.fixture(scope="module")
def tokenizers():
    return world_tokenizer(), rwkv_tokenizer.TRIE_TOKENIZER(str(world_vocab_path()))


def varied_strings() -> list[str]:
    """A few hundred strings: ASCII, digit captions, scripts, emoji, CJK, long runs, random code points."""
    rng = np.random.default_rng(15)
    printable = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    strings = ["", " ", "a", "A handwritten seven.", "  leading and trailing  ", "line one\nline two\r\n",
               " " * 200, "#" * 300, "-" * 81, "x" * 129, "0123456789" * 5, "3.14159 and 2,718; 1e-9 vs 10^6",
               "café naïve Ångström façade", "Ελληνικά γράμματα", "Привет, мир", "مرحبا بالعالم", "שלום עולם",
               "नमस्ते दुनिया", "สวัสดีชาวโลก", "😀", "👍🏽 thumbs up", "👨‍👩‍👧‍👦 family", "🇨🇳🇺🇸🇯🇵", "❤️🔥✨",
               "一只手写的数字七", "手書きの数字「七」です。", "손으로 쓴 숫자 칠", "中文English混合 text 123",
               "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ", "tab\tseparated\tfields", "\u200b zero width \ufeff", "é (e + combining)"]
    strings += [digit_caption(d, t) for t in DIGIT_CAPTION_TEMPLATES for d in range(10)]
    strings += ["".join(rng.choice(printable, size=rng.integers(1, 60))) for _ in range(80)]
    ranges = [(0x20, 0x7F), (0xA0, 0x2FF), (0x370, 0x52F), (0x600, 0x6FF), (0x900, 0x97F), (0x3040, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    for _ in range(80):
        chars = []
        for _ in range(rng.integers(1, 30)):
            lo, hi = ranges[rng.integers(len(ranges))]
            chars.append(chr(int(rng.integers(lo, hi))))
        strings.append("".join(chars))
    words = [w for s in strings for w in s.split()]
    strings += [" ".join(rng.choice(words, size=rng.integers(2, 25))) for _ in range(60)]
    return strings


def test_vocabulary_is_rwkvs_and_loading_imports_nothing(tokenizers):
    mine, theirs = tokenizers
    assert read_vocab(world_vocab_path()) == theirs.idx2token
    assert mine.num_tokens == 65529 and VOCAB_SIZE == 65536 and PAD_ID == 0 and EOS_ID == 1
    assert mine.decode_bytes([EOS_ID]) == b"\x00" and mine.decode_bytes(range(1, 257)) == bytes(range(256))
    # Found by find_spec: neither rwkv nor torch is imported by building the tokenizer.
    run_python(["-c", "import sys; from common.text import world_tokenizer; world_tokenizer(); "
                      "assert not {'rwkv', 'torch', 'tokenizers'} & set(sys.modules), sorted(sys.modules)"])


def test_encode_and_decode_match_rwkv_trie_tokenizer(tokenizers):
    mine, theirs = tokenizers
    strings = varied_strings()
    assert len(strings) >= 300
    for text in strings:
        ids = mine.encode(text)
        assert ids == theirs.encode(text), text
        assert mine.decode(ids) == text == theirs.decode(ids)
        assert all(1 <= i <= 65529 for i in ids)
        ids, cut = mine.encode_caption(text)
        assert ids == theirs.encode(text.replace("\x00", ""))[:DEFAULT_MAX_TOKENS - 1] + [EOS_ID]
        assert cut == (len(theirs.encode(text)) > DEFAULT_MAX_TOKENS - 1)
    rng = np.random.default_rng(0)
    for _ in range(50):  # any bytes, valid UTF-8 or not
        data = rng.integers(0, 256, size=rng.integers(1, 80)).astype(np.uint8).tobytes()
        assert mine.encode_bytes(data) == theirs.encodeBytes(data)
        assert mine.decode_bytes(mine.encode_bytes(data)) == data
    assert mine.encode("#" * 300) == theirs.encode("#" * 300) and len(mine.encode("#" * 300)) < 10
    assert mine.encode("a\ud800b") == mine.encode("a?b")  # a lone surrogate (rwkv raises)


def test_encode_batch_pads_cuts_and_counts(tokenizers):
    mine, theirs = tokenizers
    captions = ["a handwritten seven", "", "the digit 7 " * 40, "x\x00y"]
    ids, cut = mine.encode_batch(captions, max_tokens=16)
    assert ids.dtype == np.int64 and ids.shape == (4, 16) and cut == 1
    seven = theirs.encode("a handwritten seven")
    np.testing.assert_array_equal(ids[0], seven + [EOS_ID] + [PAD_ID] * (15 - len(seven)))
    assert ids[1].tolist() == [EOS_ID] + [PAD_ID] * 15  # the empty caption is the null caption
    assert ids[2, -1] == EOS_ID and PAD_ID not in ids[2] and ids[2, :15].tolist() == theirs.encode(captions[2])[:15]
    assert ids[3, :len(theirs.encode("xy")) + 1].tolist() == theirs.encode("xy") + [EOS_ID]  # NUL dropped
    np.testing.assert_array_equal(first_eos(ids), [len(seven), 0, 15, len(theirs.encode("xy"))])
    assert mine.decode_batch(ids) == ["a handwritten seven", "", mine.decode(ids[2, :15]), "xy"]
    short, cut = mine.encode_batch(["a", "a handwritten seven"])
    assert short.shape == (2, len(seven) + 1) and cut == 0  # padded to the longest row (Di-R's collate)
    fixed, _ = mine.encode_batch(["a"], max_tokens=8, fixed_length=True)
    assert fixed.shape == (1, 8)
    assert mine.encode_batch([])[0].shape == (0, 1)
    np.testing.assert_array_equal(null_caption_ids(3, 5), np.array([[1, 0, 0, 0, 0]] * 3))
    np.testing.assert_array_equal(first_eos(np.array([[5, 6, 0], [1, 1, 1]])), [0, 0])  # no EOS: null, as Di-R
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="max_tokens"):
            mine.encode_batch(["a"], max_tokens=bad)
    with pytest.raises(ValueError, match="id 0 is not in the vocabulary"):
        mine.decode([5, 0])
    # Every digit caption, held-out phrasings included, fits with room to spare.
    digits, cut = mine.encode_batch([digit_caption(d, t) for t in DIGIT_CAPTION_TEMPLATES for d in range(10)])
    assert cut == 0 and digits.shape[1] <= 16


def write_vocab(path, extra_lines=(), skip_byte=None):
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256) if b != skip_byte]
    path.write_text("\n".join(lines + list(extra_lines)) + "\n", encoding="utf-8")
    return path


def test_small_vocabulary_greedy_longest_match(tmp_path):
    tokens = write_vocab(tmp_path / "v.txt", ["300 'ab' 2", "301 'abc' 3", "302 'bcd' 3", "303 b'\\xe4\\xb8' 2",
                                              "304 '七' 3"])
    tok = WorldTokenizer(tokens)
    a, b, c, d = (ord(ch) + 1 for ch in "abcd")
    assert tok.encode("abcd") == [301, d]  # greedy: the longest token at each position, no look-ahead
    assert tok.encode("abd") == [300, d] and tok.encode("bcd") == [302] and tok.encode("ba") == [b, a]
    assert tok.encode("七") == [304] and tok.encode("七七") == [304, 304]
    assert tok.encode_bytes(b"\xe4\xb8") == [303]
    assert tok.decode([303]) == "\ufffd" and tok.decode([304, 301]) == "七abc"


def test_loading_never_executes_code_and_checks_every_line(tmp_path):
    marker = tmp_path / "executed"
    evil = write_vocab(tmp_path / "evil.txt", [f"300 __import__('pathlib').Path({str(marker)!r}).touch() 1"])
    with pytest.raises(VocabularyError, match=r"evil.txt:257: the token .* is not a python literal"):
        WorldTokenizer(evil)
    assert not marker.exists()
    cases = {
        "300 'ab' 3": r":257: the token has 2 bytes, the line declares 3",
        "300 12 2": r":257: the token is a int, expected str or bytes",
        "300 ('a', 'b') 2": r":257: the token is a tuple",
        "5 'ab' 2": r":257: id 5 appears twice",
        "300 'a' 1": r":257: token b'a' already has id 98",
        "70000 'ab' 2": r":257: id 70000 is outside 1..65535",
        "300 'ab'": r":257: expected '<id> <python str or bytes literal> <byte length>'",
        "x 'ab' 2": r":257: expected '<id>",
        "300 '\\ud800' 3": r":257: .* is not encodable as UTF-8",
    }
    for line, message in cases.items():
        with pytest.raises(VocabularyError, match=message):
            read_vocab(write_vocab(tmp_path / "bad.txt", [line]))
    with pytest.raises(VocabularyError, match=r"1 single bytes have no token"):
        read_vocab(write_vocab(tmp_path / "gap.txt", skip_byte=0xFF))
    (tmp_path / "latin1.txt").write_bytes(b"1 '\\x00' 1\n2 '\xe9' 1\n")
    with pytest.raises(VocabularyError, match=r"latin1.txt:2: not UTF-8"):
        read_vocab(tmp_path / "latin1.txt")
    with pytest.raises(VocabularyError, match="sha256"):
        read_vocab(write_vocab(tmp_path / "ok.txt"), sha256="0" * 64)
    with pytest.raises(VocabularyError, match="cannot read the vocabulary"):
        read_vocab(tmp_path / "missing.txt")


def test_missing_rwkv_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rwkv" else real(name, *a))
    with pytest.raises(VocabularyError, match=r"pip install --no-deps -r requirements/text.txt"):
        world_vocab_path()
    assert "common.text" in sys.modules
