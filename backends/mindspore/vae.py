"""The Stable Diffusion VAE (mindone.diffusers AutoencoderKL from a local folder) for latent models.

mindone (``pip install mindone``) is optional. Its AutoencoderKL runs on Ascend; on CPU
it stops inside the network, because it calls ``mint`` ops (conv2d, group/layer norm,
gelu) that have only Ascend kernels. Without mindone, or on CPU, training on
pre-extracted latents still works (no VAE is needed); drawing grids or sampling a
latent model stops with a VAEError that says so.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms

from common.data import LATENT_SCALE


class VAEError(ValueError):
    """The VAE folder is missing, mindone is not installed, or the device cannot run it."""


def load_vae(path: str | None):
    """AutoencoderKL from a local diffusers-format folder (config.json + weights)."""
    if not path:
        raise VAEError("this is a latent model: set 'vae_path' to a local diffusers AutoencoderKL folder")
    if not (Path(path) / "config.json").is_file():
        raise VAEError(f"vae_path '{path}': expected a diffusers AutoencoderKL folder with config.json")
    try:
        from mindone.diffusers import AutoencoderKL
    except ImportError:
        raise VAEError("decoding latents on MindSpore needs mindone: pip install mindone (its AutoencoderKL "
                       "runs on Ascend; training on pre-extracted latents works without it)") from None
    if ms.get_context("device_target") != "Ascend":
        raise VAEError("mindone's AutoencoderKL uses Ascend-only mint ops (conv2d, norms, gelu) and cannot run on "
                       f"{ms.get_context('device_target')}; decode on Ascend, or sample with the PyTorch backend "
                       "after tools/convert_ckpt.py")
    vae = AutoencoderKL.from_pretrained(path)
    vae.set_train(False)
    return vae


def encode(vae, images, scale: float = LATENT_SCALE):
    """Images [N, 3, H, W] in [-1, 1] -> scaled latents [N, 4, H/8, W/8] (a posterior sample)."""
    return vae.diag_gauss_dist.sample(vae.encode(images)[0]) * scale


def decode(vae, latents, scale: float = LATENT_SCALE):
    """Scaled latents [N, 4, h, w] -> images [N, 3, 8h, 8w] in [-1, 1]."""
    return vae.decode(latents / scale)[0].clamp(-1.0, 1.0)
