"""Captioned data of common/captions.py: Di-R's zips + meta.txt, a plain folder, captioned digits (numpy only)."""
import io
import pickle
import re
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from common.captions import (
    BAD_ITEM_KINDS, DIGIT_CAPTION_TEMPLATES, HELD_OUT_DIGIT_TEMPLATES, HELD_OUT_TEMPLATE_COUNT, TRAIN_DIGIT_TEMPLATES,
    TRAIN_CAPTION_FILLERS, TRAIN_CAPTION_PREFIXES, UNSEEN_WORD_DIGIT_TEMPLATES, TRAIN_CAPTION_SUFFIXES, BadItem, CaptionFolderSource, DigitCaptionSource, ZipCaptionSource, bad_item_counts, digit_caption,
    digits_named, held_out_digit_prompts, read_zip_meta, train_digit_captions, write_zip_meta,
)
from common.data import DIGIT_NAMES, DataError, StepSampler, UnreadableItemWarning, center_crop_arr, uint8_to_model
from common.text import world_tokenizer

S = 16


def pixels(seed, size=(S, S)):
    """A random RGB image [H, W, 3] uint8 (size is (width, height))."""
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def smooth(size=(S, S)):
    """A smooth RGB image [H, W, 3] uint8 (JPEG keeps it within a few levels)."""
    y, x = np.mgrid[:size[1], :size[0]]
    return np.stack([8 * x + 2 * y, 4 * y + 40, 250 - 6 * x], axis=-1).astype(np.uint8)


def encoded(arr, fmt="PNG", **kw):
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def expected(arr):
    """What ImageFolder gives for this image: ADM centre crop to S, [3, S, S] in [-1, 1]."""
    return uint8_to_model(center_crop_arr(Image.fromarray(arr), S))


def make_zips(root):
    """Two zips (one corrupt) and a meta.txt naming one more that does not exist: 9 items, 3 good."""
    (root / "a").mkdir(parents=True)
    with zipfile.ZipFile(root / "a" / "part0.zip", "w") as archive:
        for i in (0, 1, 2, 3, 6, 7, 8):
            if i != 7:
                archive.writestr(f"{i:04d}.png", b"not a png at all" if i == 3 else encoded(pixels(i, (S + 4 * i, S))))
            if i == 6:
                archive.writestr(f"{i:04d}.txt", b"caf\xe9 in latin-1")
            elif i != 2:
                archive.writestr(f"{i:04d}.txt", f"  caption {i}, a square\n".encode())
    (root / "part1.zip").write_bytes(b"PK\x03\x04 truncated garbage")
    lines = [f"a/part0.zip\t{i:04d}.png\t{i:04d}.txt" for i in range(4)]
    lines += ["part1.zip\tx.png\tx.txt", "gone.zip\ty.png\ty.txt"]
    lines += [f"a/part0.zip\t{i:04d}.png\t{i:04d}.txt" for i in range(6, 9)]
    (root / "meta.txt").write_text("\n".join(lines) + "\n\n")
    return root


def test_zip_source_reads_images_and_captions_straight_from_the_zips(tmp_path):
    source = ZipCaptionSource(make_zips(tmp_path / "zips"), S)
    assert len(source) == 9 and source.in_channels == 3 and source.zips == ["a/part0.zip", "part1.zip", "gone.zip"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, caption, skipped = source[(1, False)]
        flipped, _, _ = source[(8, True)]
    assert x.dtype == np.float32 and x.shape == (3, S, S) and caption == "caption 1, a square"
    np.testing.assert_array_equal(x, expected(pixels(1, (S + 4, S))))  # 20x16: ADM centre crop, as ImageFolder
    np.testing.assert_array_equal(flipped, expected(pixels(8, (S + 32, S)))[:, :, ::-1])
    assert skipped.dtype == np.int64 and skipped.tolist() == [0, 0, 0]
    assert source.open_zips() == 1  # the bad zips were never kept open


def test_zip_source_counts_bad_items_by_kind_and_skips_them(tmp_path):
    source = ZipCaptionSource(make_zips(tmp_path / "zips"), S)
    kinds = {}
    for i in range(len(source)):
        try:
            source.read(i)
        except BadItem as err:
            kinds[i] = err.kind
    assert kinds == {2: "caption", 3: "image", 4: "zip", 5: "zip", 6: "caption", 7: "image"}
    with pytest.warns(UnreadableItemWarning) as caught:
        x, caption, skipped = source[(2, False)]
    assert caption == "caption 8, a square" and bad_item_counts(skipped) == {"zip": 2, "caption": 2, "image": 2}
    np.testing.assert_array_equal(x, expected(pixels(8, (S + 32, S))))
    messages = " | ".join(str(w.message) for w in caught)
    for text in ("0002.txt: not in the zip", "0003.png", "part1.zip: not a readable zip", "gone.zip: no such zip",
                 "0006.txt: the caption is not UTF-8", "0007.png: not in the zip"):
        assert text in messages
    assert BAD_ITEM_KINDS == ("zip", "caption", "image") and int(skipped.sum()) == 6
    stacked = np.stack([skipped, skipped])  # a batch of skips, as a loader collates them
    assert bad_item_counts(stacked) == {"zip": 4, "caption": 4, "image": 4}


def test_zip_source_all_bad_refuses_and_meta_errors_name_the_line(tmp_path):
    root = make_zips(tmp_path / "zips")
    (root / "bad_only.txt").write_text("part1.zip\tx.png\tx.txt\ngone.zip\ty.png\ty.txt\n")
    with pytest.warns(UnreadableItemWarning), pytest.raises(DataError, match="2 bad items in a row"):
        ZipCaptionSource(root, S, meta="bad_only.txt")[(0, False)]
    (root / "two.txt").write_text("a/part0.zip\t0000.png\t0000.txt\r\n\na/part0.zip\t0001.png\n")
    with pytest.raises(DataError, match=r"two.txt:3: 2 tab-separated fields, expected 3"):
        ZipCaptionSource(root, S, meta="two.txt")
    (root / "four.txt").write_text("a.zip\tb.png\tb.txt\tmore\n")
    with pytest.raises(DataError, match=r"four.txt:1: 4 tab-separated fields"):
        read_zip_meta(root / "four.txt")
    (root / "empty_field.txt").write_text("a.zip\t\tb.txt\n")
    with pytest.raises(DataError, match=r"empty_field.txt:1: field 2 of 3 is empty"):
        read_zip_meta(root / "empty_field.txt")
    (root / "absolute.txt").write_text("/data/a.zip\tb.png\tb.txt\n")
    with pytest.raises(DataError, match=r"absolute.txt:1: zip path '/data/a.zip' is absolute"):
        read_zip_meta(root / "absolute.txt")
    with pytest.raises(DataError, match=r"cannot read .*nothing.txt.*write_zip_meta"):
        ZipCaptionSource(root, S, meta="nothing.txt")
    assert read_zip_meta(root / "meta.txt")[0] == ("a/part0.zip", "0000.png", "0000.txt")


def test_zip_member_faults_and_size_limits_are_bad_items(tmp_path, monkeypatch):
    import common.captions as captions

    root = tmp_path / "zips"
    root.mkdir()
    with zipfile.ZipFile(root / "c.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("img.png", encoded(pixels(1)))
        archive.writestr("img.txt", "a long enough caption " * 20)
    data = bytearray((root / "c.zip").read_bytes())
    start = data.index(b"img.txt") + len("img.txt")  # the caption's compressed bytes follow its local header
    data[start + 5:start + 15] = bytes(10)
    (root / "c.zip").write_bytes(bytes(data))
    (root / "meta.txt").write_text("c.zip\timg.png\timg.txt\n")
    source = ZipCaptionSource(root, S)
    with pytest.raises(BadItem, match="img.txt: cannot be extracted") as err:
        source.read(0)
    assert err.value.kind == "zip"
    with zipfile.ZipFile(root / "c.zip", "w") as archive:
        archive.writestr("img.png", encoded(pixels(1)))
        archive.writestr("img.txt", "a caption")
    source = ZipCaptionSource(root, S)
    assert source.read(0)[1] == "a caption"
    import common.data

    monkeypatch.setattr(common.data, "MAX_IMAGE_PIXELS", 100)  # a 16x16 image declares 256 pixels
    with pytest.raises(BadItem, match="more than MAX_IMAGE_PIXELS") as err:
        ZipCaptionSource(root, S).read(0)
    assert err.value.kind == "image"
    monkeypatch.setattr(captions, "MAX_CAPTION_BYTES", 4)
    with pytest.raises(BadItem, match="img.txt: 9 bytes, more than the 4 allowed") as err:
        ZipCaptionSource(root, S).read(0)
    assert err.value.kind == "caption"


def test_zip_handles_are_bounded_pickled_away_and_reopened_after_fork(tmp_path):
    root = tmp_path / "zips"
    root.mkdir()
    lines = []
    for z in range(3):
        with zipfile.ZipFile(root / f"{z}.zip", "w") as archive:
            archive.writestr("img.png", encoded(pixels(10 + z)))
            archive.writestr("img.txt", f"zip {z}")
        lines.append(f"{z}.zip\timg.png\timg.txt")
    (root / "meta.txt").write_text("\n".join(lines))
    source = ZipCaptionSource(root, S, max_open_zips=2)
    for i in (0, 1, 2, 0, 2, 1):
        x, caption, _ = source[(i, False)]
        assert caption == f"zip {i}" and source.open_zips() <= 2
        np.testing.assert_array_equal(x, expected(pixels(10 + i)))
    copy = pickle.loads(pickle.dumps(source))  # loader workers (spawn) get no handles, and open their own
    assert copy.open_zips() == 0 and copy[(1, False)][1] == "zip 1" and copy.open_zips() == 1
    handles = dict(source._handles)
    source._pid = -1  # as in a forked worker: the parent's handles are never used there
    assert source[(0, False)][1] == "zip 0" and source._handles[0] is not handles.get(0)
    source.close()
    assert source.open_zips() == 0


def test_zip_source_shards_by_rank_through_the_step_sampler(tmp_path):
    source = ZipCaptionSource(make_zips(tmp_path / "zips"), S)
    single = StepSampler(len(source), 4, seed=1)
    ranks = [StepSampler(len(source), 4, world_size=2, rank=r, seed=1) for r in (0, 1)]
    for step in (0, 3):
        merged = [key for sampler in ranks for key in sampler.micro_batches(step)[0]]
        assert merged == single.micro_batches(step)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableItemWarning)
            captions = [source[key][1] for key in merged]
        assert all(re.fullmatch(r"caption [018], a square", c) for c in captions)


def test_write_zip_meta_pairs_images_with_captions(tmp_path):
    root = make_zips(tmp_path / "zips")
    (root / "meta.txt").unlink()
    with zipfile.ZipFile(root / "a" / "b.zip", "w") as archive:
        archive.writestr("sub/k.jpg", encoded(pixels(3), "JPEG"))
        archive.writestr("sub/k.txt", "a photo")
        archive.writestr("lonely.png", encoded(pixels(4)))
    with pytest.warns(UnreadableItemWarning, match="part1.zip"):
        assert write_zip_meta(root) == 6
    items = read_zip_meta(root / "meta.txt")
    assert items[0] == ("a/b.zip", "sub/k.jpg", "sub/k.txt") and ("a/part0.zip", "0003.png", "0003.txt") in items
    assert not any(image in ("lonely.png", "0002.png", "0007.png") for _, image, _ in items)
    source = ZipCaptionSource(root, S)
    x, caption, skipped = source[(0, False)]
    assert caption == "a photo" and x.shape == (3, S, S) and skipped.sum() == 0


def make_folder(root):
    (root / "x" / "deeper").mkdir(parents=True)
    (root / "x" / "cat.png").write_bytes(encoded(pixels(1)))
    (root / "x" / "cat.txt").write_text("a cat\n")
    (root / "x" / "deeper" / "dog.webp").write_bytes(encoded(pixels(2, (S, S + 8)), "WEBP", lossless=True))
    (root / "x" / "deeper" / "dog.txt").write_text("\ufeffa dog  ")
    (root / "y.JPG").write_bytes(encoded(smooth(), "JPEG", quality=95, subsampling=0))
    (root / "y.txt").write_text("a jpeg")
    (root / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "z_broken.txt").write_text("broken")
    (root / "z_no_caption.png").write_bytes(encoded(pixels(4)))
    (root / "z_blank.png").write_bytes(encoded(pixels(5)))
    (root / "z_blank.txt").write_text(" \n\t")
    (root / "notes.md").write_text("not an image")
    return root


def test_caption_folder_reads_pairs_and_counts_bad_items(tmp_path):
    source = CaptionFolderSource(make_folder(tmp_path / "data"), S)
    names = [p.rsplit("/", 1)[1] for p, _ in source.samples]
    assert names == ["y.JPG", "z_blank.png", "z_broken.png", "z_no_caption.png", "cat.png", "dog.webp"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jpeg, caption, skipped = source[(0, False)]
        assert caption == "a jpeg" and skipped.tolist() == [0, 0, 0]
        assert np.abs(jpeg - expected(smooth())).max() < 8 / 127.5  # lossy, within a few levels
        cat, caption, _ = source[(4, True)]
        dog, dog_caption, _ = source[(5, False)]
    assert caption == "a cat" and dog_caption == "a dog"  # BOM and whitespace stripped
    np.testing.assert_array_equal(cat, expected(pixels(1))[:, :, ::-1])
    np.testing.assert_array_equal(dog, expected(pixels(2, (S, S + 8))))  # 16x24: centre crop
    with pytest.warns(UnreadableItemWarning) as caught:
        x, caption, skipped = source[(1, False)]
    assert caption == "a cat" and bad_item_counts(skipped) == {"zip": 0, "caption": 2, "image": 1}
    assert "z_no_caption.txt: missing" in " ".join(str(w.message) for w in caught)
    np.testing.assert_array_equal(x, expected(pixels(1)))


def test_caption_folder_without_captions_or_images_is_an_error(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.png").write_bytes(encoded(pixels(0)))
    with pytest.raises(DataError, match="none of the 1 images .* has a caption beside it"):
        CaptionFolderSource(tmp_path / "plain", S)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a caption")
    with pytest.raises(DataError, match="no images with extensions"):
        CaptionFolderSource(tmp_path / "texts", S)
    with pytest.raises(DataError, match="is not a folder"):
        CaptionFolderSource(tmp_path / "missing", S)


# ---- captioned digits -----------------------------------------------------------------------------

def test_digit_templates_and_held_out_phrasings_never_trained_on():
    assert len(DIGIT_CAPTION_TEMPLATES) == 8 + HELD_OUT_TEMPLATE_COUNT and HELD_OUT_TEMPLATE_COUNT == 4
    assert set(TRAIN_DIGIT_TEMPLATES).isdisjoint(HELD_OUT_DIGIT_TEMPLATES)
    assert TRAIN_DIGIT_TEMPLATES + HELD_OUT_DIGIT_TEMPLATES == DIGIT_CAPTION_TEMPLATES
    source = DigitCaptionSource(S, per_image=3)  # scikit-learn's 1797 digits, 3 captions each
    labels = source.labels
    assert len(source) == len(labels) == 3 * 1797 and (labels[0::3] == labels[1::3]).all()
    captions = train_digit_captions(source.images.labels, seed=0, per_image=3)
    assert captions == source.captions == train_digit_captions(source.images.labels, 0, 3)  # a function of its inputs
    assert captions != train_digit_captions(source.images.labels, seed=1, per_image=3)
    held_out = {digit_caption(d, t) for t in HELD_OUT_DIGIT_TEMPLATES for d in range(10)}
    assert held_out.isdisjoint(captions)
    # every template, prefix and suffix is used
    assert all(any(digit_caption(d, t) in c for c in captions for d in range(10)) for t in TRAIN_DIGIT_TEMPLATES)
    assert all(any(c.startswith(p) for c in captions) for p in TRAIN_CAPTION_PREFIXES)
    assert all(any(c.endswith(q) for c in captions) for q in TRAIN_CAPTION_SUFFIXES)
    assert all(any(f" {w} " in f" {c} " for c in captions) for w in TRAIN_CAPTION_FILLERS)
    assert len(set(captions[:30])) > 20  # varied, even for one image
    # What is held out is the arrangement, not the words: no held-out caption occurs inside a training caption,
    # nor does one with the fillers taken out, yet every token of every held-out prompt is a trained token.
    fillers = set(TRAIN_CAPTION_FILLERS)
    unfilled = [" ".join(w for w in c.split(" ") if w not in fillers) for c in captions]
    assert not any(h in c for h in held_out for c in captions + unfilled)
    tokenizer = world_tokenizer()
    train_ids = {i for c in captions for i in tokenizer.encode_caption(c, 64)[0]}
    for prompt in held_out:
        assert set(tokenizer.encode_caption(prompt, 64)[0]) <= train_ids, prompt
    # The unseen-word probe is the opposite: its words, the digit aside, are never trained.
    unseen_words = {w for t in UNSEEN_WORD_DIGIT_TEMPLATES for w in re.findall(r"[a-z-]+", re.sub(r"\{\w+\}", "", t))
                    if w not in ("a", "as", "with")}
    train_words = {w for c in captions for w in re.findall(r"[a-z-]+", c.lower())}
    assert unseen_words and unseen_words.isdisjoint(train_words), unseen_words & train_words
    unseen = held_out_digit_prompts(2, templates=UNSEEN_WORD_DIGIT_TEMPLATES)[0]
    assert len(unseen) == 20 and not set(unseen) & set(captions) and all(p not in held_out for p in unseen)
    for caption, label in zip(captions, labels):
        assert digits_named(caption) == [label], caption
    x, caption, skipped = source[(17, True)]  # image 5's third caption
    assert x.shape == (1, S, S) and caption == captions[17] and skipped.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(x, source.images[(5, False)][0][:, :, ::-1])


def test_held_out_prompts_name_their_digits():
    prompts, labels = held_out_digit_prompts()
    assert len(prompts) == 40 and labels.dtype == np.int64
    assert labels.tolist() == [d for d in range(10) for _ in range(4)]  # as common.training.grid_classes
    for j, (prompt, label) in enumerate(zip(prompts, labels)):
        assert prompt == digit_caption(label, HELD_OUT_DIGIT_TEMPLATES[j % 4])
        assert digits_named(prompt) == [label]
    prompts, labels = held_out_digit_prompts(labels=[7, 7, 7, 0], templates=UNSEEN_WORD_DIGIT_TEMPLATES)
    assert prompts == [digit_caption(7, UNSEEN_WORD_DIGIT_TEMPLATES[0]), digit_caption(7, UNSEEN_WORD_DIGIT_TEMPLATES[1]),
                       digit_caption(7, UNSEEN_WORD_DIGIT_TEMPLATES[0]), digit_caption(0, UNSEEN_WORD_DIGIT_TEMPLATES[0])]
    assert labels.tolist() == [7, 7, 7, 0]
    templates = DIGIT_CAPTION_TEMPLATES + UNSEEN_WORD_DIGIT_TEMPLATES
    every = [digit_caption(d, t) for t in templates for d in range(10)]
    assert all(digits_named(c) == [d] for c, d in zip(every, list(range(10)) * len(templates)))
    assert digit_caption(7, "{word} {Word} {num}") == f"{DIGIT_NAMES[7]} Seven 7"
    assert digits_named("Seven, one and 3") == [7, 1, 3] and digits_named("someone phoned") == []
    with pytest.raises(ValueError, match="outside 0..9"):
        digit_caption(10, TRAIN_DIGIT_TEMPLATES[0])
