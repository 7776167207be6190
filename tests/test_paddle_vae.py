"""The Paddle latent path with ppdiffusers' real AutoencoderKL (a small config, random weights, no download).

ppdiffusers cannot share an environment with MindSpore, so this runs in the interpreter of
``.venv-paddle-vae`` (``bash scripts/setup_paddle_vae_env.sh``) and skips, saying so, where that
environment is not built.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

PADDLE_VAE_PYTHON = REPO_ROOT / ".venv-paddle-vae" / "bin" / "python"

pytestmark = pytest.mark.skipif(not PADDLE_VAE_PYTHON.is_file(),
                                reason="the ppdiffusers environment is not built (bash scripts/setup_paddle_vae_env.sh)")

WORKER = r'''
import sys
from pathlib import Path
import numpy as np
import paddle
from ppdiffusers import AutoencoderKL
from backends.paddle.vae import decode, encode, load_vae
from common.data import LATENT_SCALE

out = Path(sys.argv[1])
paddle.seed(0)
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=1, norm_num_groups=8, sample_size=32)
vae.save_pretrained(str(out / "vae"))
vae = load_vae(str(out / "vae"))
images = paddle.rand([2, 3, 32, 32]) * 2 - 1
paddle.seed(1)
latents = encode(vae, images)
paddle.seed(1)
raw = vae.encode(images).latent_dist.sample()
decoded = decode(vae, latents)
np.savez(out / "vae_check.npz", latents=latents.numpy(), raw=raw.numpy(), decoded=decoded.numpy(),
         direct=vae.decode(raw).sample.clip(-1, 1).numpy())
'''


def run(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"])
    proc = subprocess.run([str(PADDLE_VAE_PYTHON), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ppdiffusers_vae_trains_samples_and_decodes(tmp_path):
    run(["-c", WORKER, str(tmp_path)])
    check = np.load(tmp_path / "vae_check.npz")
    assert check["latents"].shape == (2, 4, 4, 4) and check["decoded"].shape == (2, 3, 32, 32)
    np.testing.assert_allclose(check["latents"], check["raw"] * 0.18215, rtol=1e-6)  # the SD latent scale
    np.testing.assert_allclose(check["decoded"], check["direct"], atol=1e-5)  # x * s / s is not x to the bit
    latents = tmp_path / "latents"  # the fast-DiT layout tools/extract_features.py writes
    (latents / "imagenet32_features").mkdir(parents=True)
    (latents / "imagenet32_labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(latents / "imagenet32_features" / f"{i}.npy", rng.standard_normal((1, 4, 4, 4)).astype(np.float32))
        np.save(latents / "imagenet32_labels" / f"{i}.npy", np.array([i % 2]))
    run_dir = tmp_path / "run"
    run(["-m", "backends.paddle.train", "--dataset", "latents", "--data_path", str(latents), "--image_size", "32",
         "--hidden_size", "32", "--head_size", "16", "--depth", "1", "--mix_lora_rank", "4", "--decay_lora_rank", "8",
         "--global_batch_size", "4", "--max_steps", "2", "--run_dir", str(run_dir), "--vae_path",
         str(tmp_path / "vae"), "--sample_steps", "2", "--sample_per_class", "1"])
    assert (run_dir / "samples" / "0000002.png").is_file()  # a grid decoded by ppdiffusers' VAE
    out = tmp_path / "samples"
    run(["-m", "backends.paddle.sample", "--ckpt", str(run_dir), "--out_dir", str(out), "--sampler", "ddim",
         "--num_sampling_steps", "2", "--num_per_class", "2", "--cfg_scale", "1", "--vae_path", str(tmp_path / "vae"),
         "--save_images", "false"])
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (4, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    info = json.loads((out / "info.json").read_text())
    assert info["recipe"]["data"] == "latents" and info["recipe"]["latent_scale"] == 0.18215
    assert Path(info["recipe"]["vae"]).name == "vae"
