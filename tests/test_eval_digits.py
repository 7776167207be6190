"""tools/eval_digits.py: the judge is trustworthy, real digits score high, noise scores low."""
import json

import numpy as np
import pytest

from common.sampling import write_outputs
from tools.eval_digits import evaluate, frechet_distance, main, real_images


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, mean shifted by 2 along one axis: FD = 4.
    assert frechet_distance(a, a + np.array([2.0, 0, 0])) == pytest.approx(4.0, abs=1e-6)


def test_real_digits_score_high_and_noise_low(tmp_path):
    images, labels = real_images("digits", 16)
    pick = np.random.default_rng(1).permutation(len(labels))[:300]
    real = evaluate(images[pick], labels[pick])
    assert real["classifier_held_out_accuracy"] > 0.95
    assert real["accuracy"] > 0.97 and set(real["per_class_accuracy"]) == set(range(10))
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 16, 16, 1)).astype(np.uint8)
    fake = evaluate(noise, labels[pick])
    assert fake["accuracy"] < 0.3
    assert fake["frechet_distance"] > 20 * real["frechet_distance"] > 0
    # The CLI: figures as JSON, exit 1 below --min-accuracy.
    write_outputs(tmp_path / "noise", noise, labels[pick], nrow=10, save_images=False)
    assert main([str(tmp_path / "noise" / "samples.npz"), "--json", str(tmp_path / "s.json"), "--min-accuracy", "0.9"]) == 1
    assert json.loads((tmp_path / "s.json").read_text())["accuracy"] == pytest.approx(fake["accuracy"])
    assert main([str(tmp_path / "missing.npz")]) == 2
