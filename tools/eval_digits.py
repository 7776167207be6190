"""Score generated digits with a classifier trained on the real ones.

    python -m tools.eval_digits runs/digits/samples_eval/samples.npz [--min-accuracy 0.9] [--json out.json]

A scikit-learn MLP is trained on scikit-learn's real digits at the samples'
resolution (80% split; its held-out accuracy is printed so you know the judge is
trustworthy). It reports:

* class accuracy: the share of conditional samples classified as the class they
  were asked for, per class and overall;
* Frechet distance (FD) between the MLP's hidden-layer features of the samples and
  of all real digits (a small-scale FID; lower is better). For scale it also prints
  the FD between two halves of the real data, a floor a perfect model would approach.

Exit status 1 when ``--min-accuracy`` is given and not reached.
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

from common.checkpoint import atomic_write
from common.data import digits_arrays
from common.images import to_uint8_nhwc
from common.sampling import load_samples


def real_digits_uint8(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Real digits quantised exactly like samples: uint8 [N, S, S, 1] and labels [N]."""
    images, labels = digits_arrays(image_size)
    return to_uint8_nhwc(images), labels


def flatten(images_nhwc: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float [N, H*W] in [0, 1] (first channel: digits are grey)."""
    return images_nhwc[..., 0].reshape(len(images_nhwc), -1).astype(np.float64) / 255.0


class DigitJudge:
    """An MLP classifier on real digits; its ReLU hidden layer is the FD feature space."""

    def __init__(self, image_size: int, seed: int = 0):
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        images, labels = real_digits_uint8(image_size)
        x = flatten(images)
        x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=0.2, random_state=seed, stratify=labels)
        self.classifier = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=600, random_state=seed)
        self.classifier.fit(x_train, y_train)
        self.held_out_accuracy = float(self.classifier.score(x_test, y_test))
        self.real_x, self.real_labels = x, labels

    def features(self, x: np.ndarray) -> np.ndarray:
        """[N, H*W] -> [N, 128] hidden activations (ReLU(x W1 + b1))."""
        return np.maximum(x @ self.classifier.coefs_[0] + self.classifier.intercepts_[0], 0.0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classifier.predict(x)


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
def judge_for(image_size: int, seed: int = 0) -> DigitJudge:
    """One judge per resolution and seed (training it takes a few seconds)."""
    return DigitJudge(image_size, seed)


def evaluate(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Accuracy (overall, per class), FD to real digits and its real-vs-real floor."""
    if images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise ValueError(f"samples have shape {images.shape}, expected square [N, S, S, 1] digits")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"labels range {labels.min()}..{labels.max()}, expected digit classes 0..9")
    judge = judge_for(images.shape[1], seed)
    x = flatten(images)
    predicted = judge.predict(x)
    per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    real_features = judge.features(judge.real_x)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real_features))
    half = len(order) // 2
    return {
        "num_samples": int(len(labels)),
        "image_size": int(images.shape[1]),
        "accuracy": float((predicted == labels).mean()),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(judge.features(x), real_features),
        "frechet_distance_real_halves": frechet_distance(real_features[order[:half]], real_features[order[half:]]),
        "classifier_held_out_accuracy": judge.held_out_accuracy,
    }


def report(result: dict) -> str:
    lines = [f"samples: {result['num_samples']} at {result['image_size']}x{result['image_size']}",
             f"judge (MLP on real digits) held-out accuracy: {result['classifier_held_out_accuracy']:.3f}",
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
    args = parser.parse_args(argv)
    try:
        images, labels = load_samples(args.samples)
        result = evaluate(images, labels, args.seed)
    except ValueError as err:  # the samples file cannot be used (load_samples names it and says why)
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
