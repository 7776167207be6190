"""Encode an ImageFolder into VAE latents in the fast-DiT / PaddleMIX layout.

    python -m tools.extract_features --data-path /data/imagenet/train --vae /models/sd-vae-ft-ema \\
        --out /data/imagenet256_latents --image-size 256 [--batch-size 64] [--device cuda] [--flip]

``--vae`` is a local diffusers-format AutoencoderKL folder (config.json plus
weights, e.g. a saved ``stabilityai/sd-vae-ft-ema``); nothing is downloaded.
Images get ADM's centre crop; latents are a posterior sample times 0.18215.
Writes ``OUT/imagenet{S}_features/{i}.npy`` ([1, 4, S/8, S/8] float32) and
``OUT/imagenet{S}_labels/{i}.npy`` ([1] int64), i = the image's index in the
folder listing. Then train with ``dataset: latents`` and ``data_path: OUT``.
With ``--flip`` a horizontally flipped copy of every image is also written (as
fast-DiT's random flip at extraction time, but both ways). Unreadable images are
skipped with a warning and counted; existing outputs are kept (re-running resumes).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.checkpoint import atomic_path
from common.data import DataError, ImageFolderSource, UnreadableItemWarning


class _Images(torch.utils.data.Dataset):
    """(image [3, S, S] or zeros, label, ok) so one bad file never stops a batch."""

    def __init__(self, source: ImageFolderSource, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        try:
            x = torch.from_numpy(self.source.read(index))
            ok = True
        except Exception as err:  # PIL / OS errors: skip this file
            warnings.warn(f"skipping unreadable image {self.source.samples[index][0]}: {err}", UnreadableItemWarning)
            x, ok = torch.zeros(3, self.source.image_size, self.source.image_size), False
        return x, self.source.label(index), index, ok


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a handle keeps numpy from renaming the temp file
            np.save(handle, array)


def output_dirs(out: str | Path, image_size: int) -> tuple[Path, Path]:
    out = Path(out)
    return out / f"imagenet{image_size}_features", out / f"imagenet{image_size}_labels"


@torch.no_grad()
def extract(source: ImageFolderSource, vae, out: str | Path, batch_size: int = 32, device="cpu",
            flip: bool = False, num_workers: int = 0) -> dict:
    """Encode every readable image of ``source`` with ``vae``; returns counts written / skipped."""
    from backends.torch.vae import encode

    features_dir, labels_dir = output_dirs(out, source.image_size)
    features_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    copies = 2 if flip else 1

    def name(index, copy):
        return f"{index * copies + copy}.npy"

    todo = [i for i in range(len(source)) if not (features_dir / name(i, copies - 1)).is_file()]
    loader = torch.utils.data.DataLoader(_Images(source, todo), batch_size=batch_size, num_workers=num_workers)
    written, skipped = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("always", UnreadableItemWarning)
        for x, labels, indices, ok in tqdm(loader, desc="encoding", unit="batch"):
            skipped += int((~ok).sum())
            if not ok.any():
                continue
            x, labels, indices = x[ok].to(device), labels[ok], indices[ok]
            views = [x, x.flip(-1)] if flip else [x]
            for copy, view in enumerate(views):
                latents = encode(vae, view).float().cpu().numpy()
                for latent, label, index in zip(latents, labels.tolist(), indices.tolist()):
                    _save_npy(features_dir / name(index, copy), latent[None].astype(np.float32))
                    _save_npy(labels_dir / name(index, copy), np.array([label], dtype=np.int64))
                    written += 1
    return {"written": written, "skipped_unreadable": skipped, "already_done": len(source) - len(todo),
            "features": str(features_dir), "labels": str(labels_dir)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True, help="ImageFolder root (one sub-folder per class)")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    parser.add_argument("--out", required=True, help="output folder (gets imagenet{S}_features/ and imagenet{S}_labels/)")
    parser.add_argument("--image-size", type=int, default=256, help="image side before encoding (multiple of 8)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--flip", action="store_true", help="also write a horizontally flipped copy of every image")
    args = parser.parse_args(argv)
    if args.image_size % 8:
        print(f"error: --image-size {args.image_size} must be a multiple of 8 (the VAE downsamples by 8)", file=sys.stderr)
        return 2
    from backends.torch.vae import VAEError, load_vae

    try:
        source = ImageFolderSource(args.data_path, args.image_size)
        vae = load_vae(args.vae, args.device)
    except (DataError, VAEError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = extract(source, vae, args.out, args.batch_size, args.device, args.flip, args.num_workers)
    print(f"wrote {result['written']} latents to {result['features']} (labels in {result['labels']}); "
          f"skipped {result['skipped_unreadable']} unreadable images; {result['already_done']} already done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
