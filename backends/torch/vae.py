"""The Stable Diffusion VAE (diffusers AutoencoderKL from a local folder) for latent models."""
from __future__ import annotations

from pathlib import Path

import torch

from common.data import LATENT_SCALE


class VAEError(ValueError):
    """The VAE folder is missing, or diffusers is not installed."""


def load_vae(path: str | None, device):
    """AutoencoderKL from a local diffusers-format folder (config.json + weights)."""
    if not path:
        raise VAEError("this is a latent model: set 'vae_path' to a local diffusers AutoencoderKL folder")
    if not (Path(path) / "config.json").is_file():
        raise VAEError(f"vae_path '{path}': expected a diffusers AutoencoderKL folder with config.json")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise VAEError("latent models need diffusers: pip install diffusers") from None
    return AutoencoderKL.from_pretrained(path).to(device).eval()


@torch.no_grad()
def encode(vae, images: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> scaled latents [N, 4, H/8, W/8] (a posterior sample)."""
    return vae.encode(images).latent_dist.sample() * scale


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Scaled latents [N, 4, h, w] -> images [N, 3, 8h, 8w] in [-1, 1]."""
    return vae.decode(latents / scale).sample.clamp(-1.0, 1.0)
