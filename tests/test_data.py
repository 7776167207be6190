"""Data sources and the step sampler (common/data.py): numpy only."""
import warnings

import numpy as np
import pytest
from PIL import Image

from common.data import (
    MAX_CONSECUTIVE_BAD, DataError, DigitsSource, ImageFolderSource, LatentSource, StepSampler,
    UnreadableItemWarning, center_crop_arr,
)


def test_digits_source_shapes_range_and_labels():
    source = DigitsSource(16)
    assert len(source) == 1797 and source.num_classes == 10 and source.in_channels == 1
    x, label, skipped = source[(0, False)]
    assert x.shape == (1, 16, 16) and x.dtype == np.float32 and skipped == 0
    assert label == 0  # scikit-learn's first digit is a 0
    assert x.min() == pytest.approx(-1.0) and x.max() <= 1.0 and x.max() > 0.5
    flipped, _, _ = source[(0, True)]
    np.testing.assert_array_equal(flipped, x[:, :, ::-1])
    assert np.bincount(source.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_step_sampler_is_a_function_of_step_and_splits_across_ranks():
    single = StepSampler(100, 16, seed=3)
    again = StepSampler(100, 16, seed=3)
    assert single.micro_batches(7) == again.micro_batches(7)  # no replay needed
    first_epoch = [k[0] for s in range(6) for k in single.micro_batches(s)[0]][:96]
    assert len(set(first_epoch)) == 96  # a permutation: no repeats inside an epoch
    # Two ranks with two accumulation steps read exactly the single-process global batch.
    shards = [StepSampler(100, 16, world_size=2, rank=r, grad_accum_steps=2, seed=3) for r in (0, 1)]
    for step in (0, 6, 13):  # 13 crosses epoch boundaries
        merged = [key for s in shards for micro in s.micro_batches(step) for key in micro]
        assert merged == single.micro_batches(step)[0]
        assert all(len(micro) == 4 for s in shards for micro in s.micro_batches(step))
    stream = StepSampler(100, 16, grad_accum_steps=2, seed=3).iter_from(5)
    assert next(stream) == StepSampler(100, 16, grad_accum_steps=2, seed=3).micro_batches(5)[0]
    assert not any(flip for _, flip in single.keys(0, 200))
    flips = [flip for _, flip in StepSampler(100, 16, seed=3, random_flip=True).keys(0, 400)]
    assert 150 < sum(flips) < 250


def test_step_sampler_rejects_empty_and_uneven():
    with pytest.raises(DataError, match="empty"):
        StepSampler(0, 8)
    with pytest.raises(DataError, match="does not split into 3 processes"):
        StepSampler(10, 8, world_size=3)


def make_folder(root, corrupt=(), sizes=((40, 30), (30, 50))):
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            path = root / name / f"{i}.png"
            if (name, i) in corrupt:
                path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
            else:
                Image.fromarray(np.full((size[1], size[0], 3), 60 * (c + 1) + i, np.uint8)).save(path)
    return root


def test_imagefolder_reads_crops_and_labels(tmp_path):
    source = ImageFolderSource(make_folder(tmp_path / "data"), 16)
    assert source.class_names == ["cat", "dog"] and len(source) == 4 and source.in_channels == 3
    x, label, skipped = source[(2, False)]
    assert x.shape == (3, 16, 16) and label == 1 and skipped == 0
    assert x[0, 0, 0] == pytest.approx(120 / 127.5 - 1.0)


def test_center_crop_arr_adm():
    image = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8))
    assert center_crop_arr(image, 64).shape == (64, 64, 3)


def test_corrupt_image_is_skipped_with_warning_and_counted(tmp_path):
    source = ImageFolderSource(make_folder(tmp_path / "data", corrupt={("cat", 1)}), 16)
    with pytest.warns(UnreadableItemWarning, match=r"1.png"):
        x, label, skipped = source[(1, False)]
    assert skipped == 1 and label == 1  # the next readable image (dog/0) stands in
    assert x.shape == (3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert source[(0, False)][2] == 0


def test_all_corrupt_refuses_to_train_on_nothing(tmp_path):
    root = make_folder(tmp_path / "data", corrupt={("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1)})
    source = ImageFolderSource(root, 16)
    with pytest.warns(UnreadableItemWarning), pytest.raises(DataError, match="unreadable files in a row"):
        source[(0, False)]
    assert MAX_CONSECUTIVE_BAD >= 16
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images with extensions"):
        ImageFolderSource(tmp_path / "empty", 16)
    with pytest.raises(DataError, match="is not a folder"):
        ImageFolderSource(tmp_path / "missing", 16)


def test_latents_fast_dit_layout(tmp_path):
    features, labels = tmp_path / "imagenet256_features", tmp_path / "imagenet256_labels"
    features.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        np.save(features / f"{i}.npy", rng.normal(size=(1, 4, 4, 4)).astype(np.float32))
        np.save(labels / f"{i}.npy", np.array([i % 3]))
    source = LatentSource(tmp_path, 4)
    assert len(source) == 12 and source.num_classes == 3 and source.samples[2][0].endswith("2.npy")
    x, label, skipped = source[(10, True)]
    assert x.shape == (4, 4, 4) and label == 1 and skipped == 0
    np.testing.assert_array_equal(x, np.load(features / "10.npy")[0])
    with pytest.raises(DataError, match=r"latent has shape \(4, 4, 4\), expected \(4, 8, 8\)"):
        LatentSource(tmp_path, 8).read(0)
    (labels / "0.npy").unlink()
    with pytest.raises(DataError, match="hold different file names"):
        LatentSource(tmp_path, 4)
