"""Sampling bookkeeping shared by every backend: which classes, which names, what gets written.

Outputs of one sampling run (``out_dir``):

* ``grid.png``          all samples, one row per requested class;
* ``images/NNNNNN_cK.png`` one PNG per image (K = class id);
* ``samples.npz``       ``arr_0`` uint8 [N, H, W, C] (what FID tools read) and
                        ``arr_1`` int64 [N] class labels (ADM's layout); ``labels`` is the same array.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tqdm.auto import tqdm

from common.atomic import atomic_path, atomic_write
from common.checkpoint import CheckpointError
from common.config import ConfigError, check_sample_config, closest_key
from common.data import DIGIT_NAMES
from common.images import label_rows, make_grid, save_png, to_uint8_nhwc
from common.objectives import SamplerSettings, check_sampling, sample_settings
from common.recipe import Recipe, resolve_recipe
from common.spec import DiRSpec
from common.training import find_checkpoint

IMAGENET_CLASSES_JSON = Path(__file__).with_name("imagenet_classes.json")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet names by id, each the standard comma-separated synonym list."""
    table = json.loads(IMAGENET_CLASSES_JSON.read_text())["classes"]
    return [entry["name"] for entry in sorted(table, key=lambda e: e["id"])]


def imagenet_wnids() -> list[str]:
    table = json.loads(IMAGENET_CLASSES_JSON.read_text())["classes"]
    return [entry["wnid"] for entry in sorted(table, key=lambda e: e["id"])]


def class_names_for(setting: str, num_classes: int, recipe: Recipe | None) -> list[str] | None:
    """The id -> name table the ``class_names`` sample key asks for (None: classes by index only)."""
    if setting == "none":
        return None
    if setting == "imagenet":
        names = imagenet_class_names()
    elif setting == "digits":
        names = list(DIGIT_NAMES)
    elif setting == "auto":
        if recipe is not None and recipe.class_names:
            names = list(recipe.class_names)
        elif num_classes == 1000:
            names = imagenet_class_names()
        else:
            return None
    else:
        path = Path(setting)
        if not path.is_file():
            raise ConfigError(f"key 'class_names' = '{setting}': not auto/imagenet/digits/none and no such JSON file")
        try:
            names = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"key 'class_names': '{path}' is not valid JSON ({err})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"key 'class_names': '{path}' must hold a JSON list of strings (name of class i at i)")
    if len(names) != num_classes:
        raise ConfigError(f"key 'class_names' = '{setting}' gives {len(names)} names but the model has {num_classes} classes")
    return names


def _name_index(names: list[str]) -> dict[str, int]:
    """Lower-cased full names and each comma-separated synonym -> class id (first wins)."""
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        for alias in [name, *name.split(",")]:
            index.setdefault(alias.strip().lower(), i)
    return index


def parse_classes(classes, num_classes: int, names: list[str] | None) -> list[int]:
    """``"all"`` or a list of indices / names -> class ids, in the order given."""
    if classes == "all":
        return list(range(num_classes))
    if isinstance(classes, (str, int)):
        classes = [classes]
    lookup = _name_index(names) if names else {}
    ids = []
    for item in classes:
        if isinstance(item, bool):
            raise ConfigError(f"key 'classes': {item!r} is not a class index or name")
        if isinstance(item, int) or (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
            value = int(item)
            if not 0 <= value < num_classes:
                raise ConfigError(f"key 'classes': class index {value} is out of range; the model has classes 0..{num_classes - 1}")
            ids.append(value)
            continue
        if not isinstance(item, str):
            raise ConfigError(f"key 'classes': {item!r} has type {type(item).__name__}, expected a class index or name")
        if not names:
            raise ConfigError(f"key 'classes': '{item}' is a name but this model's classes have no names; "
                              "give indices, or set class_names")
        key = item.strip().lower()
        if key not in lookup:
            raise ConfigError(f"key 'classes': unknown class name '{item}'{closest_key(key, lookup)}")
        ids.append(lookup[key])
    if not ids:
        raise ConfigError("key 'classes' is an empty list; give 'all' or at least one class")
    return ids


def sample_labels(class_ids: list[int], num_per_class: int) -> np.ndarray:
    """[len(class_ids) * num_per_class] int64: each class repeated, class-major (one grid row each)."""
    return np.repeat(np.asarray(class_ids, dtype=np.int64), num_per_class)


def read_prompts(config: dict, source: str = "config") -> list[str]:
    """The prompts of a text model's sampling job: ``prompts`` ("a; b" or a list) or ``prompts_file``
    (one a line; blank lines skipped)."""
    if config["prompts"] and config["prompts_file"]:
        raise ConfigError(f"{source}: give 'prompts' or 'prompts_file', not both")
    if config["prompts_file"]:
        path = Path(config["prompts_file"])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{source}: key 'prompts_file' = '{path}' cannot be read as UTF-8 text ({err})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{source}: key 'prompts_file' = '{path}' has no prompts (one a line)")
        return prompts
    value = config["prompts"]
    if value is None:
        raise ConfigError(f"{source}: this model is text-conditioned: give 'prompts' (\"a cat; a dog\") or "
                          "'prompts_file' (one a line)")
    prompts = [p.strip() for p in value.split(";")] if isinstance(value, str) else [str(p).strip() for p in value]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ConfigError(f"{source}: key 'prompts' = {value!r} holds no prompt")
    return prompts


def prompt_conditions(config: dict, spec: DiRSpec, source: str = "config"):
    """(prompts per image, their token ids [N, text_max_tokens], labels or None, negative ids [1, L] or None).

    Each prompt is repeated ``num_per_prompt`` times (a grid row each). With ``prompt_labels: digits``
    the labels are the digit each prompt names (the digits judge scores them); a prompt naming none
    or several is an error then.
    """
    from common.captions import digits_named
    from common.text import world_tokenizer

    prompts = [p for p in read_prompts(config, source) for _ in range(config["num_per_prompt"])]
    tokenizer = world_tokenizer()
    ids, cut = tokenizer.encode_batch(prompts, spec.text_max_tokens, fixed_length=True)
    if cut:
        tqdm.write(f"warning: {cut // config['num_per_prompt']} prompt(s) longer than text_max_tokens "
                   f"({spec.text_max_tokens} ids) were cut")
    labels = None
    if config["prompt_labels"] == "digits":
        found = [digits_named(p) for p in prompts[::config["num_per_prompt"]]]
        bad = [p for p, f in zip(prompts[::config["num_per_prompt"]], found) if len(set(f)) != 1]
        if bad:
            raise ConfigError(f"{source}: key 'prompt_labels' = 'digits' but these prompts name no digit or several: "
                              f"{bad[:5]}")
        labels = np.repeat(np.asarray([f[0] for f in found], dtype=np.int64), config["num_per_prompt"])
    negative = None
    if config["negative_prompt"]:
        negative, _ = tokenizer.encode_batch([config["negative_prompt"]], spec.text_max_tokens, fixed_length=True)
    return prompts, ids, labels, negative


def batches(labels: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]


def write_outputs(out_dir: str | Path, images_nhwc: np.ndarray, labels: np.ndarray | None, nrow: int,
                  save_images: bool = True, grid_upscale: int = 1, metadata: dict | None = None,
                  prompts: list[str] | None = None) -> dict:
    """Write grid.png, images/*.png (optional), samples.npz and info.json; returns their paths.

    Text models pass ``prompts`` (one per image: the grid's rows are labelled with them and
    samples.npz gets a ``prompts`` str array) and ``labels`` only when each prompt names a class
    (the digit a digits prompt names), else None.
    """
    out_dir = Path(out_dir)
    n = len(images_nhwc)
    if images_nhwc.dtype != np.uint8 or images_nhwc.ndim != 4 or (labels is not None and len(labels) != n) \
            or (prompts is not None and len(prompts) != n):
        raise ValueError(f"expected uint8 [N, H, W, C] images and N labels / prompts, found {images_nhwc.dtype} "
                         f"{images_nhwc.shape}, {None if labels is None else len(labels)} labels and "
                         f"{None if prompts is None else len(prompts)} prompts")
    paths = {"grid": out_dir / "grid.png", "npz": out_dir / "samples.npz", "info": out_dir / "info.json"}
    grid = make_grid(images_nhwc, nrow=nrow, upscale=grid_upscale)
    if prompts is not None:
        grid = label_rows(grid, prompts[::nrow], rows=-(-n // nrow))
    save_png(paths["grid"], grid)
    if save_images:
        for i, image in enumerate(images_nhwc):
            tag = f"p{i // nrow}" if labels is None else f"c{int(labels[i])}"
            save_png(out_dir / "images" / f"{i:06d}_{tag}.png", image)
        paths["images"] = out_dir / "images"
    arrays = {"arr_0": images_nhwc}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        arrays.update(arr_1=labels, labels=labels)
    if prompts is not None:
        arrays["prompts"] = np.asarray(prompts, dtype=str)
    with atomic_path(paths["npz"]) as tmp:
        with open(tmp, "wb") as handle:  # a file handle keeps numpy from appending '.npz' to the temp name
            np.savez(handle, **arrays)
    info = {"num_images": int(n), "shape": list(images_nhwc.shape), **(metadata or {})}
    atomic_write(paths["info"], lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return paths


# A compressed member may declare at most this many bytes per compressed byte (deflate's own limit is ~1032):
# beyond it, a samples file of a few MB would unpack to gigabytes. Small members are always allowed.
_MAX_EXPANSION = 200
_ALWAYS_ALLOWED_BYTES = 64 << 20


def read_npz_member(archive, info, path: Path, check) -> np.ndarray:
    """One ``.npy`` member of a samples .npz: its header checked (by ``check(shape, dtype)`` too) before its
    data is read, its declared size against the zip's, its CRC at the end."""
    from common.data import read_npy_data, read_npy_header

    where = f"{path}: member {info.filename}"
    with archive.open(info) as handle:
        shape, fortran, dtype = read_npy_header(handle, where)
        check(shape, dtype)
        header_bytes = handle.tell()
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if info.file_size != header_bytes + nbytes:
            raise ValueError(f"{where}: its header declares {dtype} {str(shape)[:120]} but the member holds "
                             f"{max(0, info.file_size - header_bytes):,} bytes of data (corrupt)")
        if info.compress_type != 0 and nbytes > max(_ALWAYS_ALLOWED_BYTES, _MAX_EXPANSION * info.compress_size):
            raise ValueError(f"{where}: {info.compress_size:,} compressed bytes declare {nbytes:,} bytes of data; "
                             "refusing to unpack it (a decompression bomb?)")
        array = read_npy_data(handle, shape, fortran, dtype, where, size=nbytes)
        if handle.read(1):  # also makes zipfile check the CRC of the whole member
            raise ValueError(f"{where}: trailing bytes after the array (corrupt)")
    return array


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels int64 [N]) from a samples.npz, with clear errors.

    The file is untrusted: every member's .npy header is checked against what a samples
    file holds and against the member's size in the zip before any data is read, so a
    damaged or crafted file is a ``ValueError`` naming it, never gigabytes of memory.
    """
    import lzma
    import struct
    import zipfile
    import zlib

    from common.data import DataError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such samples file")

    def images_ok(shape, dtype):
        if dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{path}: arr_0 is {dtype} of shape {tuple(shape)}, expected uint8 [N, H, W, C]")
        if 0 in shape:
            raise ValueError(f"{path}: arr_0 has shape {tuple(shape)}: no samples")

    def labels_ok(shape, dtype):
        if len(shape) != 1 or dtype.kind not in "biuf" or dtype.fields is not None:
            raise ValueError(f"{path}: the labels are {dtype} of shape {tuple(shape)}, expected integers [N]")

    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist()]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"{path}: the archive holds {twice[0]!r} twice (corrupt or crafted)")
            keys = {name[:-4] for name in names if name.endswith(".npy")}
            if "arr_0" not in keys:
                raise ValueError(f"{path}: no 'arr_0' (images) array; found {sorted(keys)}")
            images = read_npz_member(archive, archive.getinfo("arr_0.npy"), path, images_ok)
            label_key = "labels" if "labels" in keys else "arr_1" if "arr_1" in keys else None
            labels = None if label_key is None else read_npz_member(archive, archive.getinfo(f"{label_key}.npy"), path,
                                                                labels_ok)
    except DataError as err:  # a member's .npy header (its message names the file and the member)
        raise ValueError(str(err)) from None
    except ValueError as err:  # ours name the file; zipfile's (a negative offset, a name not UTF-8) do not
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable samples .npz ({type(err).__name__}: {str(err)[:300]})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, struct.error, OSError, EOFError,
            NotImplementedError, RuntimeError, OverflowError, KeyError, IndexError) as err:
        # zipfile's ways of saying "damaged": a bad CRC, a bad header, an unsupported method, encryption
        text = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"{path}: not a readable samples .npz ({type(err).__name__}: {text[:300]})") from None
    if labels is None:
        raise ValueError(f"{path}: no class labels ('labels' or 'arr_1'); conditional samples are needed")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    if labels.dtype.kind == "f" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
        raise ValueError(f"{path}: the labels are floats that are not whole numbers")
    return images, labels.astype(np.int64)


# ---- the sampling flow, once for every backend -----------------------------------------------

READABLE_EXTENSIONS = ("pt", "pth", "pdparams", "ckpt", "safetensors")


class SampleBackend:
    """What a framework supplies to :func:`run_sampling` (each backend's ``sample.py`` subclasses it).

    ``rank`` and ``world_size`` come from the launcher (torchrun, paddle.distributed.launch, msrun);
    the processes share the work without collectives (see :func:`run_sampling`).
    """

    framework = "?"
    rank, world_size = 0, 1

    def setup(self, config: dict) -> str:
        """Pick the device (and execution mode), set rank and world_size; returns a label for the log."""
        raise NotImplementedError

    def load_model(self, state: dict[str, np.ndarray], spec: DiRSpec):
        """The network in eval mode with canonical weights ``state``."""
        raise NotImplementedError

    def load_vae(self, path: str | None):
        raise NotImplementedError

    def generate(self, model, spec: DiRSpec, recipe: Recipe, settings: SamplerSettings, labels: np.ndarray,
                 rng: np.random.Generator, config: dict, null: np.ndarray | None = None) -> np.ndarray:
        """(samples for the conditions ``labels`` [N, ...] (class ids, or caption token ids) as float
        [N, C, H, W], latents undecoded, noise drawn from ``rng``; network evaluations per image).
        Guidance pairs them with ``null`` (default: the model's null condition)."""
        raise NotImplementedError

    def decode(self, vae, latents: np.ndarray, latent_scale: float) -> np.ndarray:
        """Latents [N, 4, h, w] -> images [N, 3, 8h, 8w] in [-1, 1]."""
        raise NotImplementedError


def read_weights(ckpt: str, weights: str) -> tuple[dict[str, np.ndarray], DiRSpec, "Recipe | None", dict]:
    """Any backend's checkpoint (a run folder, .pt/.pth, .pdparams, .ckpt, .safetensors) through the one
    reader of ``common/formats``: canonical float32 weights, spec, recipe (or None) and where they came from."""
    from common.formats import FormatError, canonical_weights, read_contents

    path = find_checkpoint(ckpt, READABLE_EXTENSIONS)
    try:
        contents = read_contents(path)
        state, spec, used = canonical_weights(contents, weights)
    except FormatError as err:
        raise CheckpointError(str(err)) from None
    source = {"path": str(path), "format": contents.format, "layout": contents.layout, "weights": used,
              "step": contents.step, "recipe_from": contents.recipe_origin or None}
    return state, spec, contents.recipe, source


def batch_rng(seed: int, batch: int) -> np.random.Generator:
    """The noise of global batch ``batch``: the same images whichever process samples it."""
    return np.random.default_rng([seed, batch])


def _fingerprint(config: dict, weights_source: dict, num_images: int) -> str:
    """What identifies one sampling job across its processes (a part of another job is never merged)."""
    import hashlib

    keys = {k: v for k, v in config.items() if k not in ("out_dir", "device")}
    text = json.dumps({"config": keys, "weights": weights_source, "n": num_images}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def _parts_folder(out_dir) -> Path:
    return Path(out_dir) / ".parts"


def write_part(out_dir, rank: int, fingerprint: str, images: dict[int, np.ndarray], nfe: list[int]) -> Path:
    """One process's batches, by global batch index, written atomically."""
    path = _parts_folder(out_dir) / f"rank{rank:05d}.npz"
    arrays = {f"batch_{b:07d}": x for b, x in images.items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, fingerprint=np.asarray(fingerprint), nfe=np.asarray(nfe, dtype=np.int64), **arrays)
    return path


def gather_parts(out_dir, world_size: int, fingerprint: str, timeout_s: float):
    """Rank 0: wait for every process's part of this job, then (images by batch, nfe per batch)."""
    import time

    folder, start = _parts_folder(out_dir), time.monotonic()
    pending = set(range(1, world_size))
    images, nfe = {}, []
    while pending:
        for rank in sorted(pending):
            path = folder / f"rank{rank:05d}.npz"
            if not path.is_file():
                continue
            with np.load(path) as part:
                if str(part["fingerprint"]) != fingerprint:
                    continue  # left by another job in this out_dir; its own part is still coming
                images.update({int(name[6:]): part[name] for name in part.files if name.startswith("batch_")})
                nfe += part["nfe"].tolist()
            pending.discard(rank)
        if pending:
            if time.monotonic() - start > timeout_s:
                raise CheckpointError(f"{folder}: no samples from rank(s) {sorted(pending)} after {timeout_s:.0f} s; "
                                      "a process probably died (its log says why); run the job again")
            time.sleep(0.2)
    return images, nfe


def run_sampling(config: dict, backend: SampleBackend, source_name: str = "config", keep_raw: bool = False) -> dict:
    """Run one sampling job: read the weights and their recipe, sample batch by batch, write the outputs.

    Under a launcher (``world_size`` > 1) the batches are dealt round-robin to the processes and
    batch b's noise comes from ``batch_rng(seed, b)``, so N processes give exactly the images one
    process gives; each writes its batches to ``out_dir/.parts/``, and rank 0 waits for them, writes
    the one ``samples.npz`` (``arr_0`` uint8 NHWC, as DiT's sample_ddp.py), the grid and info.json,
    and removes the parts. Returns the written paths (and, with ``keep_raw``, the float samples
    before quantisation under ``'raw'``, for tests that compare backends).
    """
    import time

    check_sample_config(config, source_name)
    device = backend.setup(config)
    rank, world_size = backend.rank, backend.world_size
    state, spec, stored_recipe, weights_source = read_weights(config["ckpt"], config["weights"])
    recipe = resolve_recipe(stored_recipe, config, source_name, weights_source["path"])
    settings = sample_settings(config, recipe)
    check_sampling(recipe, settings, backend.framework, source_name)
    if settings.cfg_scale > 1.0 and not spec.has_null_class:
        raise ConfigError(f"{source_name}: key 'cfg_scale' = {settings.cfg_scale} needs a model trained with "
                          "class_dropout_prob > 0 (it has no null class); set cfg_scale: 1")
    prompts, negative, nrow = None, None, config["num_per_class"]
    if spec.condition == "text":
        prompts, conditions, labels, negative = prompt_conditions(config, spec, source_name)
        names, nrow = None, config["num_per_prompt"]
    else:
        names = class_names_for(config["class_names"], spec.num_classes, recipe)
        labels = conditions = sample_labels(parse_classes(config["classes"], spec.num_classes, names),
                                            config["num_per_class"])
    all_batches = batches(conditions, config["batch_size"])
    mine = [b for b in range(len(all_batches)) if b % world_size == rank]
    model = backend.load_model(state, spec)
    vae = backend.load_vae(config["vae_path"]) if recipe.is_latent else None
    tqdm.write(f"sampling {len(conditions)} images with {backend.framework} on {device}"
               + (f" (rank {rank} of {world_size}: {len(mine)} of {len(all_batches)} batches)" if world_size > 1 else "")
               + f": {settings.sampler}, {recipe.objective} weights ({weights_source['weights']}) from "
               f"{weights_source['path']}")
    start = time.monotonic()
    images, raw, nfe = {}, {}, []
    for b in tqdm(mine, desc=f"sampling ({settings.sampler})", disable=rank != 0):
        null = None if negative is None else np.repeat(negative, len(all_batches[b]), axis=0)
        x, evaluations = backend.generate(model, spec, recipe, settings, all_batches[b], batch_rng(config["seed"], b),
                                          config, null)
        nfe.append(int(evaluations))
        if vae is not None:
            x = backend.decode(vae, x, recipe.latent_scale)
        if keep_raw:
            raw[b] = x
        images[b] = to_uint8_nhwc(x)
    if world_size > 1:
        fingerprint = _fingerprint(config, weights_source, len(conditions))
        if rank != 0:
            return {"part": write_part(config["out_dir"], rank, fingerprint, images, nfe)}
        others, other_nfe = gather_parts(config["out_dir"], world_size, fingerprint,
                                         timeout_s=max(600.0, 2.0 * (time.monotonic() - start)))
        images.update(others)
        nfe += other_nfe
        missing = sorted(set(range(len(all_batches))) - set(images))
        if missing:
            raise CheckpointError(f"{_parts_folder(config['out_dir'])}: the parts lack batches {missing[:10]}; "
                                  "run the job again")
    ordered = np.concatenate([images[b] for b in range(len(all_batches))])
    metadata = {"framework": backend.framework, "device": device, "seed": config["seed"], "world_size": world_size,
                "weights_source": weights_source, "recipe": recipe.to_dict(), "spec": spec.to_dict(),
                "sampler": {**settings.relevant(recipe), "nfe": nfe[0] if len(set(nfe)) == 1 else nfe},
                "batch_size": config["batch_size"],
                "precision": config["precision"],
                "class_names": [names[int(c)] for c in np.unique(labels)] if names else None}
    if prompts is not None:
        metadata["prompts"] = list(dict.fromkeys(prompts))
        metadata["negative_prompt"] = config["negative_prompt"]
        metadata["prompt_labels"] = config["prompt_labels"]
    if backend.framework == "mindspore":
        metadata["mindspore_mode"] = config["mindspore_mode"]
    if backend.framework == "paddle":
        metadata["paddle_to_static"] = config["paddle_to_static"]
    paths = write_outputs(config["out_dir"], ordered, labels, nrow=nrow, save_images=config["save_images"],
                          grid_upscale=config["grid_upscale"], metadata=metadata, prompts=prompts)
    if world_size > 1:
        import shutil

        shutil.rmtree(_parts_folder(config["out_dir"]), ignore_errors=True)
    tqdm.write(f"wrote {len(conditions)} samples: {paths['grid']}, {paths['npz']}")
    if keep_raw:
        paths["raw"] = np.concatenate([raw[b] for b in sorted(raw)])
    return paths
