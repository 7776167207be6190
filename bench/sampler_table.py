"""Sample quality against network evaluations: flow's Euler, Heun and SDE beside DDPM's DDIM.

    python -m bench.sampler_table --ddpm runs/digits --flow runs/digits_flow [--nfe 10 25 50]
                                  [--num-per-class 20] [--cfg-scale 2.0] [--out-dir bench/results]

Samples ``num_per_class`` images of every digit from the EMA weights of each run with each
sampler at (about) each evaluation count, scores them with the digits judge
(``tools/eval_digits.py``: class accuracy and the Frechet distance in its features, with
the real-vs-real floor), and writes ``<out-dir>/<date>-<host>-samplers.{json,md,png}``.
Heun evaluates the network 2n - 1 times for n steps, so its counts are the odd numbers
nearest the targets; the table gives the actual counts. Everything runs in PyTorch, fp32,
seed 0, through ``common.sampling.run_sampling`` (the same path as ``sample``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import socket
import tempfile
import time
from pathlib import Path

from common.atomic import atomic_write


def plan(nfe_targets: list[int]) -> list[tuple[str, str, int]]:
    """(objective, sampler, num_sampling_steps) for every target count."""
    rows = []
    for n in nfe_targets:
        rows.append(("ddpm", "ddim", n))
        rows.append(("flow", "euler", n))
        rows.append(("flow", "heun", max(1, (n + 1) // 2)))
        rows.append(("flow", "sde", max(2, n)))
    return rows


def run(args) -> dict:
    from backends.torch.sample import sample
    from common.config import SAMPLE_SCHEMA, parse_cli
    from tools.eval_digits import evaluate

    runs = {"ddpm": args.ddpm, "flow": args.flow}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for objective, sampler, steps in plan(args.nfe):
            if not runs[objective]:
                continue
            overrides = ["--ckpt", runs[objective], "--out_dir", f"{scratch}/{objective}-{sampler}-{steps}",
                         "--sampler", sampler, "--num_sampling_steps", str(steps), "--num_per_class",
                         str(args.num_per_class), "--cfg_scale", str(args.cfg_scale), "--save_images", "false",
                         "--seed", str(args.seed), "--batch_size", "200"]
            if objective == "ddpm":
                overrides += ["--clip_denoised", "true"]
            config, _ = parse_cli(overrides, SAMPLE_SCHEMA, "bench.sampler_table")
            start = time.perf_counter()
            paths = sample(config, "bench.sampler_table", keep_raw=False)
            seconds = time.perf_counter() - start
            import numpy as np

            with np.load(paths["npz"]) as data:
                scores = evaluate(data["arr_0"], data["labels"])
            info = json.loads(Path(paths["info"]).read_text())
            rows.append({"objective": objective, "sampler": sampler, "num_steps": steps,
                         "nfe": info["sampler"]["nfe"], "accuracy": scores["accuracy"],
                         "frechet_distance": scores["frechet_distance"], "seconds": seconds,
                         "checkpoint": info["weights_source"]["path"]})
            print(f"{objective:5s} {sampler:6s} steps {steps:3d} nfe {rows[-1]['nfe']:3d}: accuracy "
                  f"{scores['accuracy']:.3f}  FD {scores['frechet_distance']:.2f}  ({seconds:.1f} s)", flush=True)
    floor = scores["frechet_distance_real_halves"]
    return {"date": datetime.date.today().isoformat(), "host": socket.gethostname(), "rows": rows,
            "fd_real_vs_real": floor, "num_per_class": args.num_per_class, "cfg_scale": args.cfg_scale,
            "seed": args.seed, "command": "python -m bench.sampler_table " + " ".join(args.argv)}


def markdown(result: dict) -> str:
    lines = [f"# Samplers on the digits demo ({result['date']}, {result['host']})", "",
             f"`{result['command']}`; {result['num_per_class']} images per class, cfg {result['cfg_scale']}, "
             f"seed {result['seed']}. FD floor (real vs real halves): {result['fd_real_vs_real']:.2f}.", "",
             "| objective | sampler | steps | network evaluations | class accuracy | FD | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['objective']} | {row['sampler']} | {row['num_steps']} | {row['nfe']} | "
                     f"{row['accuracy']:.3f} | {row['frechet_distance']:.2f} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for name in sorted({(r["objective"], r["sampler"]) for r in result["rows"]}):
        rows = [r for r in result["rows"] if (r["objective"], r["sampler"]) == name]
        nfe = [r["nfe"] for r in rows]
        label = f"{name[0]} {name[1]}"
        left.plot(nfe, [r["accuracy"] for r in rows], marker="o", label=label)
        right.plot(nfe, [r["frechet_distance"] for r in rows], marker="o", label=label)
    right.axhline(result["fd_real_vs_real"], color="grey", ls="--", lw=1, label="real vs real")
    left.set(xlabel="network evaluations", ylabel="class accuracy", title="accuracy")
    right.set(xlabel="network evaluations", ylabel="Frechet distance", title="FD (lower is better)", yscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    right.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddpm", default="runs/digits", help="a DDPM digits run folder or checkpoint ('' to skip)")
    parser.add_argument("--flow", default="runs/digits_flow", help="a flow digits run folder or checkpoint ('' to skip)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--num-per-class", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args(argv)
    args.argv = argv
    result = run(args)
    stem = Path(args.out_dir) / f"{result['date']}-{result['host']}-samplers"
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    table = markdown(result)
    atomic_write(stem.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table))
    plot(result, stem.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
