"""The latent path with diffusers' real AutoencoderKL class (a small config, random weights, no download):
tools/extract_features.py -> train on the latents -> sample -> decode, and the recipe that records it."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from backends.torch.sample import main as sample_main  # noqa: E402
from backends.torch.train import train  # noqa: E402
from backends.torch.vae import decode, encode, load_vae  # noqa: E402
from common.data import LATENT_SCALE, ImageFolderSource  # noqa: E402
from tests.test_data import make_folder  # noqa: E402
from tests.test_torch_train import tiny_config  # noqa: E402
from tools.extract_features import extract  # noqa: E402


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A factor-8 AutoencoderKL (four encoder blocks, as Stable Diffusion's) saved the diffusers way."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


def test_encode_decode_scale_and_shapes(vae_folder):
    vae = load_vae(str(vae_folder), "cpu")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    latents = encode(vae, images)
    assert latents.shape == (2, 4, 4, 4)
    torch.manual_seed(1)
    raw = vae.encode(images).latent_dist.sample()
    torch.testing.assert_close(latents, raw * LATENT_SCALE)  # latents are scaled by 0.18215
    decoded = decode(vae, latents)
    torch.testing.assert_close(decoded, vae.decode(raw).sample.clamp(-1, 1))  # ... and unscaled before decoding
    assert decoded.shape == (2, 3, 32, 32)


def test_extract_train_sample_decode_with_the_real_class(vae_folder, tmp_path):
    root = make_folder(tmp_path / "images", sizes=((40, 36), (36, 48), (64, 64), (50, 40)))
    vae = load_vae(str(vae_folder), "cpu")
    result = extract(ImageFolderSource(root, 32), vae, tmp_path / "latents", batch_size=4, flip=False)
    assert result["written"] == 8
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, "--dataset", "latents", "--data_path", str(tmp_path / "latents"), "--image_size",
                         "32", "--max_steps", "2", "--global_batch_size", "4", "--vae_path", str(vae_folder),
                         "--sample_every", "0", "--sample_steps", "2", "--sample_per_class", "1")
    train(config)
    grid = run_dir / "samples" / "0000002.png"  # decoded by the VAE during training
    from PIL import Image

    assert Image.open(grid).mode == "RGB"
    checkpoint = torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)
    assert checkpoint["recipe"]["data"] == "latents" and checkpoint["recipe"]["latent_scale"] == LATENT_SCALE
    assert checkpoint["recipe"]["vae"] == str(vae_folder) and checkpoint["spec"]["in_channels"] == 4
    out = tmp_path / "samples"
    sample_main(["--ckpt", str(run_dir), "--out_dir", str(out), "--sampler", "ddim", "--num_sampling_steps", "2",
                 "--num_per_class", "2", "--cfg_scale", "1", "--vae_path", str(vae_folder), "--save_images", "false"])
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (4, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    info = json.loads((out / "info.json").read_text())
    assert info["recipe"]["vae"] == str(vae_folder) and info["recipe"]["latent_scale"] == LATENT_SCALE
