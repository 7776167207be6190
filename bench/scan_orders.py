"""2-D token shift and scan orders on MNIST, at an equal training budget (a benchmark, not a test).

For each patch size, each setting (token_shift/scan_order: raster/raster, q_shift/raster,
q_shift/alternate, q_shift/zigzag) and DiT's attention at the same width and depth
(``bench/dit.py``) is trained with the same steps, batch, learning-rate schedule, EMA and
seeded draws (``common.objectives.step_draws``), on the same 4500 MNIST training images
(32x32, one channel) with the MNIST config's flow objective. Each is sampled the same way
(Heun, guidance 2, 50 per digit, the same noise) and scored by the MNIST judge
(``tools/eval_digits.py``: class accuracy, and the Frechet distance in the judge's features
against the 500 held-out digits).

Speed: each setting's training-step time over raster/raster's, measured in the same run,
interleaved (round-robin, so a load change hits every setting alike), at the initial weights:
median of ``--timing-rounds`` rounds, and the spread (min..max of the ratio over rounds).

    OMP_NUM_THREADS=2 python -m bench.scan_orders --patch 4 2 --seeds 0 1 --seeds-patch2 0 --steps 600 --steps-patch2 250
    # -> bench/results/<date>-scan-orders.{json,md,png}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench.util import REPO_ROOT, set_threads
from common.atomic import atomic_path

SETTINGS = {  # name -> (token_shift, scan_order); "dit" is the attention reference
    "raster/raster": ("raster", "raster"),
    "q_shift/raster": ("q_shift", "raster"),
    "q_shift/alternate": ("q_shift", "alternate"),
    "q_shift/zigzag": ("q_shift", "zigzag"),
    "dit": None,
}
# configs/train/mnist.yaml's model and objective (steps and batch are the bench's budget)
MODEL = dict(hidden_size=128, depth=4, head_size=32, mix_lora_rank=16, decay_lora_rank=32, input_size=32,
             in_channels=1, num_classes=10, class_dropout_prob=0.1, learn_sigma=False)
RECIPE = {"objective": "flow", "flow_path": "linear", "flow_prediction": "velocity",
          "flow_time_sampling": "logit_normal", "flow_time_scale": 1000.0}


def spec_for(setting: str, patch: int):
    from common.spec import build_spec

    token_shift, scan_order = SETTINGS[setting] or ("raster", "raster")
    return build_spec("DiR-Tiny/2", **MODEL, patch_size=patch, token_shift=token_shift, scan_order=scan_order)


def build_model(setting: str, patch: int, seed: int):
    import torch

    from backends.torch.models import DiR
    from bench.dit import DiT

    spec = spec_for(setting, patch)
    if setting == "dit":
        torch.manual_seed(seed)
        model = DiT(spec)
        dit_initialize_weights(model)
        return model, spec
    return DiR.from_spec(spec, seed=seed), spec


def dit_initialize_weights(model) -> None:
    """DiT's own init (facebookresearch/DiT ``initialize_weights``): xavier-uniform linears with zero
    bias, the patch projection as a linear, label table and timestep MLP N(0, 0.02), adaLN-Zero and a
    zero final layer. (The first run of this bench, 2026-12-01, left PyTorch's defaults in place for
    all but the zeros; its DiT row is marked so.)"""
    import torch.nn as nn

    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.x_embedder.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class Trainer:
    """The MNIST config's optimisation (AdamW, warmup + cosine, clipping, EMA with warmup) in a
    plain loop, so DiR and DiT are trained identically."""

    def __init__(self, setting: str, patch: int, seed: int, steps: int, batch: int):
        import copy

        import torch

        from backends.torch.objectives import build_objective
        from common.recipe import recipe_from_config

        self.model, self.spec = build_model(setting, patch, seed)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.recipe = recipe_from_config(RECIPE)
        self.objective = build_objective(self.recipe, False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-3, weight_decay=0.0)
        self.config = {"lr": 2e-3, "warmup_steps": min(100, steps // 10), "max_steps": steps,
                       "lr_schedule": "cosine", "min_lr": 2e-4, "ema_decay": 0.998, "ema_warmup": True}
        self.seed, self.batch, self.step = seed, batch, 0

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> float:
        import torch

        from common.conditions import drop_conditions
        from common.objectives import step_draws
        from common.training import ema_decay, learning_rate

        draws = step_draws(self.recipe, self.spec.class_dropout_prob, images.shape, self.seed, 1, 0, self.step)
        cond = torch.from_numpy(drop_conditions(self.spec, labels, draws.drop))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.config)
        loss = self.objective.losses_from_inputs(self.model, torch.from_numpy(images), cond,
                                                 {k: torch.as_tensor(v) for k, v in draws.inputs.items()},
                                                 torch.from_numpy(draws.noise))["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        decay = ema_decay(self.step, self.config)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        self.step += 1
        return loss.item()


def batches(images, labels, batch: int, seed: int):
    """Epochs of the training set in a seeded shuffle, the same for every setting."""
    rng = np.random.default_rng([seed, 7])
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch + 1, batch):
            pick = order[start:start + batch]
            yield images[pick], labels[pick]


def train_and_score(setting: str, patch: int, seed: int, steps: int, batch: int, per_class: int,
                    sample_steps: int) -> dict:
    import torch
    from tqdm import tqdm

    from backends.torch.objectives import generate
    from common.data import mnist_arrays
    from common.objectives import SamplerSettings
    from tools.eval_digits import evaluate

    images, labels = mnist_arrays(32, "train")
    trainer = Trainer(setting, patch, seed, steps, batch)
    data = batches(images, labels, batch, seed)
    losses, start = [], time.perf_counter()
    for _ in tqdm(range(steps), desc=f"{setting} p{patch} s{seed}", leave=False):
        losses.append(trainer.train_step(*next(data)))
    train_s = time.perf_counter() - start
    trainer.ema.eval()
    settings = SamplerSettings(sampler="heun", num_steps=sample_steps, cfg_scale=2.0)
    cond = np.repeat(np.arange(10), per_class)
    rng = np.random.default_rng([seed, 11])
    out = []
    for chunk in np.array_split(cond, max(1, len(cond) // 100)):
        x, nfe = generate(trainer.ema, trainer.spec, trainer.recipe, settings, chunk, rng, "cpu")
        out.append(x)
    samples = np.concatenate(out)
    uint8 = np.clip((samples + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    scores = evaluate(uint8, cond, seed=0, dataset="mnist")
    torch.set_grad_enabled(True)
    return {"setting": setting, "patch": patch, "tokens": trainer.spec.num_patches, "seed": seed,
            "steps": steps, "batch": batch, "train_s": train_s, "final_loss": float(np.mean(losses[-50:])),
            "class_accuracy": scores["accuracy"], "fd": scores["frechet_distance"],
            "fd_floor": scores["frechet_distance_real_halves"],
            "sample_nfe": nfe}


def time_steps(patch: int, batch: int, rounds: int, steps_per_round: int) -> dict:
    """Step time of every setting, interleaved round by round; ratios to raster/raster."""
    from common.data import mnist_arrays

    images, labels = mnist_arrays(32, "train")
    trainers = {name: Trainer(name, patch, 0, 10 ** 6, batch) for name in SETTINGS}
    data = {name: batches(images, labels, batch, 0) for name in SETTINGS}
    for name, trainer in trainers.items():  # warm-up
        for _ in range(2):
            trainer.train_step(*next(data[name]))
    times = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                trainer.train_step(*next(data[name]))
            times[name].append((time.perf_counter() - start) / steps_per_round)
    base = times["raster/raster"]
    result = {}
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, base)]
        result[name] = {"median_step_ms": 1e3 * statistics.median(values), "ratio_median": statistics.median(ratios),
                        "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds}
    return result


def summarise(runs: list[dict]) -> dict:
    table = {}
    for run in runs:
        key = f"{run['setting']} p{run['patch']}"
        table.setdefault(key, []).append(run)
    summary = {}
    for key, group in table.items():
        acc = [r["class_accuracy"] for r in group]
        fd = [r["fd"] for r in group]
        summary[key] = {"setting": group[0]["setting"], "patch": group[0]["patch"], "tokens": group[0]["tokens"],
                        "seeds": [r["seed"] for r in group],
                        "accuracy_mean": float(np.mean(acc)), "accuracy_min": min(acc), "accuracy_max": max(acc),
                        "fd_mean": float(np.mean(fd)), "fd_min": min(fd), "fd_max": max(fd),
                        "train_s_mean": float(np.mean([r["train_s"] for r in group]))}
    return summary


def markdown(result: dict) -> str:
    lines = [f"# Scan orders on MNIST ({result['date']}, {result['command']})", "",
             f"Budget per run: {result['steps']} steps of {result['batch']} (patch 2: {result['steps_patch2']}); sampling Heun {result['sample_steps']} "
             f"steps, guidance 2, {result['per_class']} per digit. Spread = min..max over seeds.", "",
             "| setting | patch (tokens) | seeds | class accuracy | FD (judge features) | step time / raster |",
             "|---|---|---|---|---|---|"]
    for key, row in result["summary"].items():
        timing = result["timing"].get(str(row["patch"]), {}).get(row["setting"])
        speed = (f"{timing['ratio_median']:.3f} ({timing['ratio_min']:.3f}..{timing['ratio_max']:.3f})"
                 if timing else "-")
        lines.append(f"| {row['setting']} | {row['patch']} ({row['tokens']}) | {len(row['seeds'])} | "
                     f"{row['accuracy_mean']:.3f} ({row['accuracy_min']:.3f}..{row['accuracy_max']:.3f}) | "
                     f"{row['fd_mean']:.1f} ({row['fd_min']:.1f}..{row['fd_max']:.1f}) | {speed} |")
    if result.get("load_warning"):
        lines += ["", f"Warning: {result['load_warning']}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patches = sorted({row["patch"] for row in result["summary"].values()}, reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(patches))
    names = list(SETTINGS)
    for i, patch in enumerate(patches):
        rows = [result["summary"].get(f"{name} p{patch}") for name in names]
        xs = np.arange(len(names)) + i * width
        for ax, key in zip(axes, ("accuracy", "fd")):
            mean = [r[f"{key}_mean"] if r else np.nan for r in rows]
            low = [r[f"{key}_mean"] - r[f"{key}_min"] if r else 0 for r in rows]
            high = [r[f"{key}_max"] - r[f"{key}_mean"] if r else 0 for r in rows]
            ax.bar(xs, mean, width, yerr=[low, high], capsize=3, label=f"patch {patch} ({(32 // patch) ** 2} tokens)")
    for ax, title in zip(axes, ("class accuracy (higher is better)", "FD in judge features (lower is better)")):
        ax.set_xticks(np.arange(len(names)) + width * (len(patches) - 1) / 2, names, rotation=20)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"MNIST, {result['steps']} steps of {result['batch']} (patch 2: {result['steps_patch2']}), "
                 f"bars = min..max over seeds")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seeds-patch2", type=int, nargs="+", default=None,
                        help="seeds for patch 2 (256 tokens, 4x the cost); default: --seeds")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--steps-patch2", type=int, default=None, help="steps for patch 2; default: --steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--sample-steps", type=int, default=7, help="Heun steps (2n-1 network evaluations)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--timing-steps", type=int, default=5)
    parser.add_argument("--timing-only", action="store_true", help="only the step-time ratios (no training runs)")
    parser.add_argument("--no-timing", action="store_true", help="skip the step-time ratios")
    parser.add_argument("--out", default=None, help="results prefix (default bench/results/<date>-scan-orders)")
    args = parser.parse_args(argv)
    threads = set_threads()
    load_before = os.getloadavg()[0]
    date = datetime.date.today().isoformat()
    prefix = Path(args.out) if args.out else REPO_ROOT / "bench" / "results" / f"{date}-scan-orders"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    timing = {}
    for patch in ([] if args.no_timing else args.patch):
        timing[str(patch)] = time_steps(patch, args.batch, args.timing_rounds, args.timing_steps)
        print(json.dumps({"timing": patch, **{k: round(v["ratio_median"], 3) for k, v in timing[str(patch)].items()}}),
              flush=True)
    runs = []
    for patch in ([] if args.timing_only else args.patch):
        seeds = args.seeds_patch2 if (patch == 2 and args.seeds_patch2) else args.seeds
        steps = args.steps_patch2 if (patch == 2 and args.steps_patch2) else args.steps
        for seed in seeds:
            for setting in args.settings:
                run = train_and_score(setting, patch, seed, steps, args.batch, args.per_class, args.sample_steps)
                runs.append(run)
                print(json.dumps(run), flush=True)
    load_after = os.getloadavg()[0]
    warning = None
    if max(load_before, load_after) > (os.cpu_count() or 1):
        warning = (f"load average {max(load_before, load_after):.1f} was above the core count "
                   f"{os.cpu_count()}: timings are noisy")
        print("warning:", warning)
    result = {"date": date, "command": "python -m bench.scan_orders " + " ".join(argv or os.sys.argv[1:]),
              "threads": threads, "steps": args.steps, "steps_patch2": args.steps_patch2 or args.steps, "batch": args.batch, "per_class": args.per_class,
              "sample_steps": args.sample_steps, "seeds": args.seeds, "timing": timing, "runs": runs,
              "summary": summarise(runs), "load_before": load_before, "load_after": load_after,
              "load_warning": warning}
    write_atomic(prefix.with_suffix(".json"), json.dumps(result, indent=1))
    write_atomic(prefix.with_suffix(".md"), markdown(result))
    plot(result, prefix.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
