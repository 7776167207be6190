"""The training recipe: everything besides the weights and the spec that sampling needs.

A model's weights and spec say what network to build; the recipe says how it was
trained, and therefore how it must be sampled: which objective (DDPM or flow
matching) with which settings (diffusion steps and noise schedule; path,
prediction and time scale), and what the model's inputs are (pixels, or VAE
latents with their scale and the VAE they came from). It travels inside every
training checkpoint and every converted file (see ``common/formats``), so a
``.safetensors`` converted from a cosine-trained DDPM run samples with the cosine
schedule, not with a guessed default.

A recipe is plain data: ``Recipe.to_dict()`` is JSON, ``Recipe.from_dict`` checks it.
Its keys carry the same names as the training config keys they come from
(``objective``, ``diffusion_steps``, ``flow_path``, ...), so a sample config can fill
in a recipe that a file lacks with the very keys training used.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

RECIPE_VERSION = 1

OBJECTIVES = ("ddpm", "flow")
NOISE_SCHEDULES = ("linear", "cosine")
FLOW_PATHS = ("linear", "gvp", "vp")
FLOW_PREDICTIONS = ("velocity", "noise", "score")
FLOW_TIME_SAMPLINGS = ("uniform", "logit_normal")
FLOW_LOSS_WEIGHTS = ("none", "velocity", "likelihood")
DATA_KINDS = ("pixels", "latents")

# The samplers of each objective; a sampler that does not fit stops with a message.
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun", "sde", "dopri5")}
ALL_SAMPLERS = tuple(s for names in SAMPLERS.values() for s in names)

# Keys of each objective (beside 'objective' itself); the others must be absent (None).
DDPM_KEYS = ("diffusion_steps", "noise_schedule")
FLOW_KEYS = ("flow_path", "flow_prediction", "flow_time_sampling", "flow_logit_mean", "flow_logit_std",
             "flow_train_eps", "flow_sample_eps", "flow_time_scale", "flow_loss_weight")
DATA_KEYS = ("data", "latent_scale", "vae", "class_names", "dataset")
# Keys a sample config may set to fill in (or must agree with) the recipe of a file.
SAMPLE_RECIPE_KEYS = ("objective", *DDPM_KEYS, "flow_path", "flow_prediction", "flow_sample_eps",
                      "flow_time_scale", "data", "latent_scale")


class RecipeError(ValueError):
    """A recipe is missing, incomplete or inconsistent; the message names the key."""


@dataclass(frozen=True)
class Recipe:
    objective: str
    # DDPM (Ho et al.; DiT): number of training timesteps and the beta schedule
    diffusion_steps: int | None = None
    noise_schedule: str | None = None
    # flow matching (SiT): x_t = alpha_t x_data + sigma_t noise, t = 0 noise, t = 1 data
    flow_path: str | None = None
    flow_prediction: str | None = None
    flow_time_sampling: str | None = None
    flow_logit_mean: float | None = None
    flow_logit_std: float | None = None
    flow_train_eps: float | None = None
    flow_sample_eps: float | None = None
    flow_time_scale: float | None = None  # the network sees t * flow_time_scale
    flow_loss_weight: str | None = None
    # the model's inputs
    data: str = "pixels"
    latent_scale: float | None = None  # latents = scale * VAE posterior sample (0.18215 for SD's VAE)
    vae: str | None = None  # what the latents were encoded with (a diffusers folder or model name)
    class_names: tuple[str, ...] | None = None  # label id -> name, when the data set has names
    dataset: str | None = None  # the training data set (digits, mnist, imagefolder, latents): picks the judge

    def __post_init__(self):
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        validate(self)

    @property
    def is_latent(self) -> bool:
        return self.data == "latents"

    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS[self.objective]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the keys that do not apply (None)."""
        out = {"recipe_version": RECIPE_VERSION}
        for key, value in dataclasses.asdict(self).items():
            if value is not None:
                out[key] = list(value) if key == "class_names" else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(values, dict):
            raise RecipeError(f"{source}: a recipe is a mapping of keys, found {type(values).__name__}")
        values = dict(values)
        version = values.pop("recipe_version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError(f"{source}: recipe_version {version!r} is not supported (expected {RECIPE_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RecipeError(f"{source}: unknown recipe keys {unknown}; valid keys: {', '.join(sorted(names))}")
        if "objective" not in values:
            raise RecipeError(f"{source}: the recipe has no 'objective' (expected one of {', '.join(OBJECTIVES)})")
        try:
            return cls(**values)
        except RecipeError as err:
            raise RecipeError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "recipe") -> "Recipe":
        try:
            values = json.loads(text, object_pairs_hook=unique_keys)
        except (ValueError, TypeError, RecursionError) as err:  # JSONDecodeError is a ValueError
            raise RecipeError(f"{source}: the recipe is not valid JSON ({str(err)[:200]})") from None
        return cls.from_dict(values, source)


def unique_keys(pairs: list) -> dict:
    """``json.loads`` hook: a key given twice is an error, not last-wins."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {str(key)[:80]!r} appears twice")
        out[key] = value
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(recipe: Recipe) -> Recipe:
    """Raise RecipeError naming the key, value and rule; the recipe otherwise."""
    def fail(key, rule):
        raise RecipeError(f"recipe key '{key}' = {getattr(recipe, key)!r}: {rule}")

    def choice(key, options):
        if getattr(recipe, key) not in options:
            fail(key, f"allowed: {', '.join(options)}")

    choice("objective", OBJECTIVES)
    own = DDPM_KEYS if recipe.objective == "ddpm" else FLOW_KEYS
    for key in DDPM_KEYS + FLOW_KEYS:
        present = getattr(recipe, key) is not None
        if key in own and not present:
            fail(key, f"required by objective '{recipe.objective}'")
        if key not in own and present:
            fail(key, f"does not apply to objective '{recipe.objective}'")
    if recipe.objective == "ddpm":
        if isinstance(recipe.diffusion_steps, bool) or not isinstance(recipe.diffusion_steps, int) \
                or recipe.diffusion_steps < 1:
            fail("diffusion_steps", "must be an integer >= 1")
        choice("noise_schedule", NOISE_SCHEDULES)
    else:
        choice("flow_path", FLOW_PATHS)
        choice("flow_prediction", FLOW_PREDICTIONS)
        choice("flow_time_sampling", FLOW_TIME_SAMPLINGS)
        choice("flow_loss_weight", FLOW_LOSS_WEIGHTS)
        for key in ("flow_logit_mean", "flow_logit_std", "flow_train_eps", "flow_sample_eps", "flow_time_scale"):
            if not _is_number(getattr(recipe, key)):
                fail(key, "must be a number")
        if recipe.flow_logit_std <= 0:
            fail("flow_logit_std", "must be positive")
        for key in ("flow_train_eps", "flow_sample_eps"):
            if not 0.0 <= getattr(recipe, key) < 0.5:
                fail(key, "must be in [0, 0.5)")
        if recipe.flow_time_scale <= 0:
            fail("flow_time_scale", "must be positive")
    choice("data", DATA_KINDS)
    if recipe.data == "latents":
        if not _is_number(recipe.latent_scale) or recipe.latent_scale <= 0:
            fail("latent_scale", "latent models need a positive latent scale (0.18215 for Stable Diffusion's VAE)")
    elif recipe.latent_scale is not None:
        fail("latent_scale", "applies only to data: latents")
    if recipe.vae is not None and not isinstance(recipe.vae, str):
        fail("vae", "must be a string (a VAE folder or model name)")
    if recipe.class_names is not None and not all(isinstance(n, str) for n in recipe.class_names):
        fail("class_names", "must be a list of strings")
    if recipe.dataset is not None and not isinstance(recipe.dataset, str):
        fail("dataset", "must be a string (the training data set's name)")
    return recipe


def check_sampler(recipe: Recipe, sampler: str, source: str = "config") -> None:
    """Stop when a sampler does not fit the objective the weights were trained with."""
    if sampler not in ALL_SAMPLERS:
        raise RecipeError(f"{source}: key 'sampler' = {sampler!r} is unknown; allowed: {', '.join(ALL_SAMPLERS)}")
    if sampler not in recipe.samplers():
        raise RecipeError(f"{source}: key 'sampler' = {sampler!r} does not fit a model trained with objective "
                          f"'{recipe.objective}'; its samplers are {', '.join(recipe.samplers())}")


# ---- where a recipe comes from --------------------------------------------------------------

def default_flow_eps(path: str, prediction: str) -> tuple[float, float]:
    """SiT's (train_eps, sample_eps): how far from t = 0 and t = 1 training and sampling stay.

    A velocity model on the linear or GVP path is well defined at both ends (0); noise and
    score models divide by sigma_t or alpha_t near them (1e-3); VP's alpha never reaches 1
    (1e-5 in training). sample_eps is 1e-3 everywhere: the SDE's SBDM diffusion is infinite
    at t = 0, and SiT's NaN there for velocity models comes from starting at 0.
    """
    if path == "vp":
        return 1e-5, 1e-3
    if prediction == "velocity":
        return 0.0, 1e-3
    return 1e-3, 1e-3


def recipe_from_config(config: dict, class_names=None) -> Recipe:
    """The recipe a training config trains with (keys of ``common.config.TRAIN_SCHEMA``).

    Older configs (before flow matching) hold only the DDPM keys; they read as DDPM.
    """
    objective = config.get("objective", "ddpm")
    values: dict[str, Any] = {"objective": objective}
    if objective == "ddpm":
        values.update(diffusion_steps=config.get("diffusion_steps", 1000),
                      noise_schedule=config.get("noise_schedule", "linear"))
    elif objective == "flow":
        path = config.get("flow_path", "linear")
        prediction = config.get("flow_prediction", "velocity")
        train_eps, sample_eps = default_flow_eps(path, prediction)
        values.update(
            flow_path=path, flow_prediction=prediction,
            flow_time_sampling=config.get("flow_time_sampling", "uniform"),
            flow_logit_mean=float(config.get("flow_logit_mean", 0.0)),
            flow_logit_std=float(config.get("flow_logit_std", 1.0)),
            flow_train_eps=float(train_eps if config.get("flow_train_eps") is None else config["flow_train_eps"]),
            flow_sample_eps=float(sample_eps if config.get("flow_sample_eps") is None else config["flow_sample_eps"]),
            flow_time_scale=float(config.get("flow_time_scale", 1000.0)),
            flow_loss_weight=config.get("flow_loss_weight", "none"),
        )
    else:
        raise RecipeError(f"config key 'objective' = {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    if config.get("dataset") == "latents":
        from common.data import LATENT_SCALE

        values.update(data="latents", latent_scale=float(config.get("latent_scale") or LATENT_SCALE),
                      vae=config.get("vae_path"))
    if class_names:
        values["class_names"] = tuple(class_names)
    if isinstance(config.get("dataset"), str):
        values["dataset"] = config["dataset"]
    return Recipe(**values)


def resolve_recipe(stored: Recipe | None, sample_config: dict, source: str, where: str) -> Recipe:
    """The recipe to sample with: the file's, checked against (or filled in from) the sample config.

    ``stored`` is what the checkpoint carries (None for a bare or older state dict). A sample
    config key that is set must agree with the file's recipe; with no recipe in the file, the
    keys must say it all, and the message names the ones to pass. Nothing is guessed.
    """
    given = {key: sample_config.get(key) for key in SAMPLE_RECIPE_KEYS if sample_config.get(key) is not None}
    if stored is not None:
        clashes = [f"{key}: file {getattr(stored, key)!r} vs {source} {value!r}"
                   for key, value in given.items() if getattr(stored, key) != value]
        if clashes:
            raise RecipeError(f"{where} was trained with a different recipe than {source} asks for ("
                              + "; ".join(clashes) + "); leave those keys unset (null) to sample as trained")
        return stored
    if "objective" not in given:
        raise RecipeError(
            f"{where} carries no training recipe (a bare or older state dict), and sampling it with a guessed "
            "schedule gives wrong images. Say how it was trained: --objective ddpm --diffusion_steps 1000 "
            "--noise_schedule linear (DiT's recipe; cosine for improved DDPM), or --objective flow --flow_path "
            "linear --flow_prediction velocity --flow_time_scale 1000 (SiT's convention is --flow_time_scale 1); "
            "and --data latents --latent_scale 0.18215 for a latent model. Or convert it again with "
            "tools/convert_ckpt.py --recipe")
    values: dict[str, Any] = {"objective": given["objective"]}
    if given["objective"] == "ddpm":
        missing = [key for key in DDPM_KEYS if key not in given]
        values.update({key: given[key] for key in DDPM_KEYS if key in given})
    elif given["objective"] == "flow":
        missing = [key for key in ("flow_path", "flow_prediction", "flow_time_scale") if key not in given]
        if not missing:
            train_eps, sample_eps = default_flow_eps(given["flow_path"], given["flow_prediction"])
            values.update(flow_path=given["flow_path"], flow_prediction=given["flow_prediction"],
                          flow_time_scale=float(given["flow_time_scale"]),
                          flow_sample_eps=float(given.get("flow_sample_eps", sample_eps)),
                          # training-only settings: recorded as unknown-but-harmless defaults
                          flow_time_sampling="uniform", flow_logit_mean=0.0, flow_logit_std=1.0,
                          flow_train_eps=train_eps, flow_loss_weight="none")
    else:
        raise RecipeError(f"{source}: key 'objective' = {given['objective']!r}; allowed: {', '.join(OBJECTIVES)}")
    if missing:
        raise RecipeError(f"{where} carries no training recipe; with --objective {given['objective']} also pass "
                          + " ".join(f"--{key} ..." for key in missing))
    if given.get("data") == "latents":
        if "latent_scale" not in given:
            raise RecipeError(f"{where} carries no training recipe; with --data latents also pass --latent_scale "
                              "(0.18215 for Stable Diffusion's VAE)")
        values.update(data="latents", latent_scale=float(given["latent_scale"]))
    try:
        return Recipe(**values)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
