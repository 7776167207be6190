"""One training step of a backend's real trainer, timed: the same calls ``common.trainer.run_training``
makes per step, through the backend's own ``TrainAdapter`` (backends/<backend>/train.py).

A step is: set the learning rate, ``train_step`` (the objective's draws from
``common.objectives.step_draws``, forward, loss, backward, gradient clipping), ``apply_update``
(AdamW) and ``update_ema``. What the trainer does around the step (reading data, logging,
checkpoints) is not timed: the micro-batch is read once, from random data shaped like the
config's, through the backend's own loader.

    python -m bench.train_step --backend paddle --model DiR-S/2 --input-size 32 --depth 2 --batch 8
    python -m bench.train_step --backend mindspore --mindspore-mode graph --recompute
    python -m bench.train_step --backend torch --model DiR-Tiny/2 --input-size 16 --in-channels 1 \
        --patch-size 4 --depth 4 --batch 32 --condition text     # the text demo's step

prints ``BENCH_RESULT {json}`` with ``step_s`` (median seconds per step over --repeats timed
steps after --warmup untimed ones; graph modes compile in the first), every timing, and the
spread. Exit code 3: the backend's framework is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # also runs as a file
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402

from bench.util import emit, measure, peak_rss_mb, spread, step_parser  # noqa: E402

BACKENDS = ("torch", "paddle", "mindspore")
ITEMS = 64  # random items in the synthetic data set (only the first micro-batch is read)


class RandomImages:
    """A data source (the ``common.data`` protocol) of seeded N(0, 0.5^2) images and labels."""

    def __init__(self, channels: int, size: int, num_classes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = (0.5 * rng.standard_normal((ITEMS, channels, size, size))).astype(np.float32)
        self.labels = rng.integers(0, num_classes, ITEMS)
        self.num_classes, self.in_channels = num_classes, channels
        self.class_names = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, key):
        index, _ = key
        return self.images[index].copy(), int(self.labels[index]), 0


class RandomCaptions(RandomImages):
    """Seeded images with seeded token-id captions ``[max_tokens]`` (ids 2..99, end-of-text 1 after
    8..max_tokens-1 of them, pads 0): what ``common.captions.TokenizedCaptions`` hands the loader."""

    def __init__(self, channels: int, size: int, max_tokens: int, seed: int = 0):
        super().__init__(channels, size, 10, seed)
        rng = np.random.default_rng([seed, 1])
        self.ids = np.zeros((ITEMS, max_tokens), dtype=np.int64)
        for row, length in zip(self.ids, rng.integers(min(8, max_tokens - 1), max_tokens, ITEMS)):
            row[:length] = rng.integers(2, 100, length)
            row[length] = 1
        self.num_classes, self.class_names = None, None

    def __getitem__(self, key):
        index, _ = key
        return self.images[index].copy(), self.ids[index].copy(), np.zeros(3, dtype=np.int64)


def parse_args(argv=None):
    parser = step_parser("any backend, through its trainer")
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm")
    parser.add_argument("--mindspore-mode", choices=["pynative", "graph"], default="graph",
                        help="MindSpore only (graph is what its users train with)")
    parser.add_argument("--recompute", action="store_true", help="gradient checkpointing per block")
    parser.add_argument("--condition", choices=["class", "text"], default="class",
                        help="text: the caption encoder of configs/train/digits_text.yaml (65,536-row embedding)")
    parser.add_argument("--text-depth", type=int, default=2)
    parser.add_argument("--text-max-tokens", type=int, default=24)
    return parser.parse_args(argv)


def train_config(args) -> dict:
    """The trainer's own defaults (common/config.py), with the bench's sizes."""
    from common.config import TRAIN_SCHEMA, parse_cli

    config, _ = parse_cli([], TRAIN_SCHEMA, "bench.train_step")
    config.update(model=args.model, global_batch_size=args.batch, grad_accum_steps=1, seed=args.seed,
                  objective=args.objective, mindspore_mode=args.mindspore_mode, recompute=args.recompute,
                  device=args.device if args.device in ("auto", "cpu", "cuda") else "auto",
                  precision="fp32", run_dir=tempfile.mkdtemp(prefix="bench-step-"))
    for key in ("depth", "scan", "patch_size"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config


def main(argv=None):
    args = parse_args(argv)
    framework = {"torch": "torch", "paddle": "paddle", "mindspore": "mindspore"}[args.backend]
    if importlib.util.find_spec(framework) is None:
        print(f"{framework} is not installed", file=sys.stderr)
        raise SystemExit(3)
    from bench.util import step_spec
    from common.data import StepSampler
    from common.objectives import step_draws
    from common.recipe import recipe_from_config
    from common.training import ema_decay, learning_rate

    config = train_config(args)
    spec = step_spec(args)
    if args.condition == "text":
        spec = type(spec).from_dict({**spec.to_dict(), "condition": "text", "text_depth": args.text_depth,
                                     "text_max_tokens": args.text_max_tokens})
        config["condition"] = "text"
    recipe = recipe_from_config(config, None if args.condition == "text" else
                                [str(i) for i in range(spec.num_classes)])
    backend = importlib.import_module(f"backends.{args.backend}.train").TrainAdapter()
    backend.setup(config)
    build_start = time.perf_counter()
    params = backend.build(spec, recipe, config)
    build_s = time.perf_counter() - build_start
    if args.condition == "text":
        source = RandomCaptions(spec.in_channels, spec.input_size, spec.text_max_tokens, args.seed)
    else:
        source = RandomImages(spec.in_channels, spec.input_size, spec.num_classes, args.seed)
    sampler = StepSampler(len(source), args.batch, 1, 0, 1, args.seed)
    micro_batch = next(iter(backend.loader(source, sampler, 0, 0)))
    shape = (args.batch, spec.in_channels, spec.input_size, spec.input_size)
    losses, step = [], [0]

    def one_step():
        backend.set_learning_rate(learning_rate(step[0], config))
        draws = step_draws(recipe, spec.class_dropout_prob, shape, args.seed, 1, 0, step[0], 0)
        values = backend.train_step([micro_batch], [draws])  # python floats: the step has finished
        backend.apply_update()
        backend.update_ema(ema_decay(step[0], config))
        losses.append(values["loss"])
        step[0] += 1

    timing = measure(one_step, warmup=args.warmup, repeats=args.repeats)
    version = importlib.import_module(framework).__version__
    emit({"backend": args.backend, "framework_version": version, "device": backend.device,
          "model": args.model, "spec": spec.to_dict(), "batch": args.batch, "tokens": spec.num_patches,
          "params": params, "objective": args.objective, "recompute": args.recompute, "condition": args.condition,
          "mindspore_mode": args.mindspore_mode if args.backend == "mindspore" else None,
          "step_s": timing["median_s"], "times_s": timing["times_s"], "spread": spread(timing["times_s"]),
          "warmup": timing["warmup"], "repeats": timing["repeats"], "build_s": build_s,
          "peak_rss_mb": peak_rss_mb(), "loss_first": losses[0], "loss_last": losses[-1],
          "step": "the trainer's step: TrainAdapter.train_step + apply_update + update_ema"})


if __name__ == "__main__":
    main()
