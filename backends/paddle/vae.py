"""The Stable Diffusion VAE (ppdiffusers AutoencoderKL from a local folder) for latent models.

ppdiffusers is an optional extra (requirements/paddle-vae.txt): it pins its own
paddlenlp stack and cannot share an environment with MindSpore. Without it,
training on pre-extracted latents still works; drawing grids or sampling a latent
model stops with a VAEError that says what to install.
"""
from __future__ import annotations

from pathlib import Path

import paddle

from common.data import LATENT_SCALE


class VAEError(ValueError):
    """The VAE folder is missing, or ppdiffusers is not installed."""


def load_vae(path: str | None, device=None):
    """AutoencoderKL from a local diffusers-format folder (config.json + weights)."""
    if not path:
        raise VAEError("this is a latent model: set 'vae_path' to a local diffusers AutoencoderKL folder")
    if not (Path(path) / "config.json").is_file():
        raise VAEError(f"vae_path '{path}': expected a diffusers AutoencoderKL folder with config.json")
    try:
        from ppdiffusers.models import AutoencoderKL
    except ImportError:
        raise VAEError("decoding latents on Paddle needs ppdiffusers, an optional extra that cannot share an "
                       "environment with MindSpore: pip install -r requirements/paddle-vae.txt "
                       "(training on pre-extracted latents works without it)") from None
    # A folder diffusers (PyTorch) wrote holds diffusion_pytorch_model.*; one ppdiffusers wrote holds
    # diffusion_paddle_model.* or model_state.pdparams: only the first needs converting on load.
    paddle_files = list(Path(path).glob("diffusion_paddle_model.*")) + list(Path(path).glob("*.pdparams"))
    vae = AutoencoderKL.from_pretrained(path, from_diffusers=not paddle_files)
    vae.eval()
    return vae


@paddle.no_grad()
def encode(vae, images: paddle.Tensor, scale: float = LATENT_SCALE) -> paddle.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> scaled latents [N, 4, H/8, W/8] (a posterior sample)."""
    return vae.encode(images).latent_dist.sample() * scale


@paddle.no_grad()
def decode(vae, latents: paddle.Tensor, scale: float = LATENT_SCALE) -> paddle.Tensor:
    """Scaled latents [N, 4, h, w] -> images [N, 3, 8h, 8w] in [-1, 1]."""
    return vae.decode(latents / scale).sample.clip(-1.0, 1.0)
