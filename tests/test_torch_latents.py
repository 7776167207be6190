"""Latent pipeline without diffusers: tools/extract_features.py with a stand-in VAE, then training on latents."""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch.train import train  # noqa: E402
from common.data import ImageFolderSource, LatentSource, UnreadableItemWarning  # noqa: E402
from tests.test_data import make_folder  # noqa: E402
from tests.test_torch_train import tiny_config  # noqa: E402
from tools.extract_features import extract  # noqa: E402


class StandInVAE:
    """Mimics diffusers' AutoencoderKL.encode(x).latent_dist.sample(): [N, 3, S, S] -> [N, 4, S/8, S/8]."""

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        latents = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

        class Dist:
            latent_dist = type("D", (), {"sample": staticmethod(lambda: latents)})

        return Dist()


def test_extract_then_train_on_latents(tmp_path):
    root = make_folder(tmp_path / "images", corrupt={("dog", 1)}, sizes=((40, 30), (30, 50), (64, 64)))
    source = ImageFolderSource(root, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableItemWarning)
        result = extract(source, StandInVAE(), tmp_path / "latents", batch_size=4, flip=True)
    assert result["written"] == 10 and result["skipped_unreadable"] == 1  # 5 readable images x 2 views
    latents = LatentSource(tmp_path / "latents", 4)
    assert len(latents) == 10 and latents.num_classes == 2
    x, label, _ = latents[(0, False)]
    assert x.shape == (4, 4, 4) and label == 0
    np.testing.assert_allclose(x[0], np.load(tmp_path / "latents" / "imagenet32_features" / "0.npy")[0, 0])
    # Flipped copies are the mirror images' latents.
    np.testing.assert_allclose(latents.read(1), latents.read(0)[:, :, ::-1], atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableItemWarning)
        again = extract(source, StandInVAE(), tmp_path / "latents", batch_size=4, flip=True)
    assert again["written"] == 0 and again["already_done"] == 5  # re-running resumes

    config = tiny_config(tmp_path / "run", "--dataset", "latents", "--data_path", str(tmp_path / "latents"),
                         "--image_size", "32", "--max_steps", "2", "--global_batch_size", "4")
    result = train(config)
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["spec"]["in_channels"] == 4 and checkpoint["spec"]["input_size"] == 4
    assert not (tmp_path / "run" / "samples").exists()  # no vae_path: no grid, and no crash
