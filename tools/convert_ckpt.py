"""Convert DiR checkpoints between PyTorch, Paddle, MindSpore and canonical safetensors.

    python tools/convert_ckpt.py --src A --dst B [--weights ema|model] [--dtype fp32|fp16|bf16]
                                 [--src-format F] [--dst-format F] [--spec S] [--recipe JSON_OR_FILE] [--bare]
    python tools/convert_ckpt.py inspect FILE [--format F] [--weights ema|model|all] [--spec S] [--json]

Formats (from the suffix, or ``--src-format``/``--dst-format``): ``torch`` (.pth/.pt),
``paddle`` (.pdparams), ``mindspore`` (.ckpt), ``safetensors`` (.safetensors). Everything goes
through the canonical parameter table (common/params.py), so a conversion renames and
re-lays-out tensors (Paddle's Linear weights are transposed, MindSpore's norm and embedding
leaves renamed) and checks every name and shape: a missing, unexpected or wrongly shaped
tensor stops it with the full list and nothing is written. Output goes to a temp file that
is renamed at the end.

Only .pth/.pt needs its framework (torch); .pdparams is read with a restricted unpickler and
written with pickle, .ckpt is read and written with the protobuf package, .safetensors by a
small reader/writer in common/formats/safetensors_io.py. A checkpoint is untrusted input: a
file that asks to run code is refused with a message, never executed.

``--spec`` (a preset such as DiR-S/2, a JSON object or a JSON file) is only needed for a
bare state dict that carries no spec and has no ``FILE.spec.json`` beside it.

The training recipe (objective, noise schedule or flow path, data; common/recipe.py) travels
with the weights: the output carries the source's recipe (from the file, its sidecar, or for
an older training checkpoint its training config). ``--recipe`` (a JSON object or a JSON file)
supplies one for a source that has none; it must agree with the source's own if it has one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python tools/convert_ckpt.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint import CheckpointError  # noqa: E402
from common.formats import (  # noqa: E402
    DTYPES, FORMAT_LABEL, FORMATS, WEIGHT_SETS, FormatError, canonical_weights, detect_format,
    parameter_summary, read_contents, resolve_recipe_argument, resolve_spec_argument, table_order, write_checkpoint,
)
from common.spec import SpecError  # noqa: E402

PROG = "convert_ckpt"
EXIT_ERROR = 2


class CliError(Exception):
    """A problem with the command line or the files it names (printed without a traceback)."""


def _format_help() -> str:
    return f"{', '.join(FORMATS)} (default: from the suffix)"


def build_convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/convert_ckpt.py",
        description="Convert a DiR checkpoint between .pth/.pt, .pdparams, .ckpt and .safetensors "
                    "(or 'inspect FILE' to list what a checkpoint holds).",
        epilog="Subcommand: python tools/convert_ckpt.py inspect FILE [--weights ema|model|all] [--json]")
    parser.add_argument("--src", required=True, help="checkpoint to read (bare state dict or training checkpoint)")
    parser.add_argument("--dst", required=True, help="file to write")
    parser.add_argument("--src-format", help=_format_help())
    parser.add_argument("--dst-format", help=_format_help())
    parser.add_argument("--weights", choices=WEIGHT_SETS, default="ema",
                        help="which weights of a training checkpoint to convert (default: ema; "
                             "ignored for a bare state dict)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="dtype of the written tensors (default: fp32; bf16 is kept as bf16 in every format)")
    parser.add_argument("--spec", help="the model spec when the source has none: a preset (DiR-S/2), "
                                       "a JSON object or a JSON file")
    parser.add_argument("--recipe", metavar="JSON_OR_FILE",
                        help="the training recipe when the source has none: a JSON object (e.g. "
                             "'{\"objective\": \"ddpm\", \"diffusion_steps\": 1000, \"noise_schedule\": "
                             "\"linear\"}') or a JSON file; it must agree with the source's own recipe if it has one")
    parser.add_argument("--input-size", type=int,
                        help="--src-format di-r: the latent side the Di-R model was trained at (32 for 256 px images; "
                             "a Di-R file does not record it)")
    parser.add_argument("--pos-embed", choices=("none", "sincos"), default="none",
                        help="--src-format di-r: whether it was trained with --is-pos-emb (sin-cos; default none, "
                             "Di-R's default)")
    parser.add_argument("--bare", action="store_true",
                        help="write only the state dict (.pth/.pdparams/.ckpt) and the spec and recipe beside it "
                             "as DST.spec.json, instead of the training-checkpoint layout the samplers load")
    return parser


def build_inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/convert_ckpt.py inspect",
                                     description="List the tensors, parameter count, spec and training recipe "
                                                 "of a DiR checkpoint.")
    parser.add_argument("file")
    parser.add_argument("--format", help=_format_help())
    parser.add_argument("--weights", choices=(*WEIGHT_SETS, "all"), default="ema",
                        help="which weights of a training checkpoint to list (default: ema)")
    parser.add_argument("--spec", help="spec to check a spec-less file against (preset, JSON or JSON file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


# ---- convert ------------------------------------------------------------------------------------

def read_di_r_source(src: Path, args, given_recipe):
    """(state, spec, recipe, where the recipe came from) of a yynil/Di-R v0 model.pth."""
    from common.formats.di_r import DI_R_RECIPE, read_di_r
    from common.recipe import Recipe

    if args.input_size is None:
        raise CliError("--src-format di-r needs --input-size: the latent side the model was trained at (32 for 256 "
                       "px images, 64 for 512 px); a Di-R file does not record it")
    contents = read_contents(src, "torch")
    if contents.layout != "bare":
        raise CliError(f"{src}: a Di-R model.pth is a flat state dict; this file is a training checkpoint of this "
                       "project (convert it without --src-format di-r)")
    state, spec = read_di_r(contents.sets["state"], args.input_size, args.pos_embed, str(src))
    if given_recipe is not None:
        return state, spec, given_recipe, "--recipe"
    return state, spec, Recipe.from_dict(DI_R_RECIPE), "Di-R's training (DiT's diffusion, SD-VAE latents)"


def convert(args: argparse.Namespace) -> list[Path]:
    src, dst = Path(args.src), Path(args.dst)
    if (args.src_format or "").lower() in ("di-r", "dir", "di_r"):
        return convert_di_r(src, dst, args)
    src_format = detect_format(src, args.src_format, "src")
    dst_format = detect_format(dst, args.dst_format, "dst")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise CliError(f"--dst {dst} is the source file; write the conversion to another path")
    if dst.is_dir():
        raise CliError(f"--dst {dst} is a folder; give a file name")
    spec = resolve_spec_argument(args.spec) if args.spec else None
    given_recipe = resolve_recipe_argument(args.recipe) if args.recipe is not None else None
    contents = read_contents(src, src_format)
    state, spec, used = canonical_weights(contents, args.weights, spec)
    recipe, recipe_origin = choose_recipe(contents, given_recipe)
    wide = [name for name, value in contents.weight_set(args.weights)[1].items() if value.dtype == "float64"]
    if wide:
        print(f"{PROG}: note: {len(wide)} float64 tensors were narrowed to float32 (DiR computes in float32)",
              file=sys.stderr)
    if args.dtype == "fp16":
        import numpy as np

        big = [name for name, value in state.items() if value.size and float(np.abs(value).max()) > 65504.0]
        if big:
            print(f"{PROG}: warning: values beyond the fp16 range (65504) become inf in: {', '.join(big)}",
                  file=sys.stderr)
    provenance = {"source": src.name, "source_format": src_format, "weights": used, "dtype": args.dtype,
                  "tool": "tools/convert_ckpt.py"}
    if recipe is not None:
        provenance["recipe"] = recipe_origin
    try:
        written = write_checkpoint(dst, dst_format, state, spec, dtype=args.dtype, step=contents.step,
                                   config=contents.config, bare=args.bare, provenance=provenance, recipe=recipe)
    except OSError as err:
        raise CliError(f"cannot write {dst}: {err.strerror or err} (nothing was written)") from None
    total = sum(int(value.size) for value in state.values())
    what = f"'{used}' weights" if contents.layout == "training" else "state dict"
    if contents.layout == "bare" and args.weights != "ema":
        print(f"{PROG}: note: {src} is a bare state dict; --weights {args.weights} does not apply", file=sys.stderr)
    if recipe is None:
        print(f"{PROG}: note: {src} carries no training recipe, so neither does {written[0]}: sampling it will need "
              "the recipe keys (--objective ddpm --diffusion_steps N --noise_schedule linear|cosine, or --objective "
              "flow --flow_path P --flow_prediction Q --flow_time_scale S; --data latents --latent_scale X for a "
              "latent model). To store the recipe in the file, convert again with --recipe '{\"objective\": "
              "\"ddpm\", \"diffusion_steps\": 1000, \"noise_schedule\": \"linear\"}' (or a JSON file)",
              file=sys.stderr)
    print(f"{PROG}: wrote {written[0]} ({FORMAT_LABEL[dst_format]}, {args.dtype}) from the {what} of {src} "
          f"({FORMAT_LABEL[src_format]}): {len(state)} tensors, {total:,} parameters"
          + (f"; recipe {recipe.objective} (from {recipe_origin})" if recipe is not None else "; no recipe")
          + (f"; spec{' and recipe' if recipe is not None else ''} in {written[1]}" if len(written) > 1 else ""))
    return written


def convert_di_r(src: Path, dst: Path, args) -> list[Path]:
    dst_format = detect_format(dst, args.dst_format, "dst")
    if dst.is_dir():
        raise CliError(f"--dst {dst} is a folder; give a file name")
    given_recipe = resolve_recipe_argument(args.recipe) if args.recipe is not None else None
    state, spec, recipe, recipe_origin = read_di_r_source(src, args, given_recipe)
    provenance = {"source": src.name, "source_format": "di-r (yynil/Di-R v0 model.pth)", "weights": "state",
                  "dtype": args.dtype, "tool": "tools/convert_ckpt.py", "recipe": recipe_origin,
                  "folded": "norm1/norm2 affine LayerNorms into adaLN_modulation (exact; block_norm_eps 1e-5)"}
    try:
        written = write_checkpoint(dst, dst_format, state, spec, dtype=args.dtype, step=None, config=None,
                                   bare=args.bare, provenance=provenance, recipe=recipe)
    except OSError as err:
        raise CliError(f"cannot write {dst}: {err.strerror or err} (nothing was written)") from None
    total = sum(int(value.size) for value in state.values())
    print(f"{PROG}: wrote {written[0]} ({FORMAT_LABEL[dst_format]}, {args.dtype}) from Di-R v0 {src}: "
          f"{len(state)} tensors, {total:,} parameters; {spec.hidden_size} wide, {spec.depth} blocks, text encoder "
          f"{spec.text_hidden_size} x {spec.text_depth}, causal, positions {spec.pos_embed}, input {spec.input_size}; "
          f"recipe from {recipe_origin}")
    return written


def choose_recipe(contents, given):
    """(recipe to write, where it came from): the source's, or ``--recipe`` for a source without one."""
    if given is None:
        return contents.recipe, contents.recipe_origin
    if contents.recipe is None:
        return given, "--recipe"
    if given != contents.recipe:
        mine, theirs = contents.recipe.to_dict(), given.to_dict()
        diffs = "; ".join(f"{key}: source {mine.get(key)!r} vs --recipe {theirs.get(key)!r}"
                          for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key))
        raise CliError(f"{contents.path}: --recipe contradicts the recipe the source carries (from "
                       f"{contents.recipe_origin}): {diffs}; leave --recipe out to keep the source's recipe")
    return contents.recipe, contents.recipe_origin


# ---- inspect ------------------------------------------------------------------------------------

def inspect(args: argparse.Namespace) -> dict:
    path = Path(args.file)
    fmt = detect_format(path, args.format, "src")
    contents = read_contents(path, fmt)
    spec = resolve_spec_argument(args.spec) if args.spec else None
    if spec is not None and contents.spec is None:
        contents.spec, contents.spec_origin = spec, "--spec"
    names = list(contents.sets) if args.weights == "all" or contents.layout == "bare" else [args.weights]
    report = {
        "file": str(path), "format": fmt, "format_label": FORMAT_LABEL[fmt], "layout": contents.layout,
        "weight_sets": list(contents.sets), "step": contents.step,
        "spec": contents.spec.to_dict() if contents.spec else None, "spec_origin": contents.spec_origin or None,
        "recipe": contents.recipe.to_dict() if contents.recipe else None,
        "recipe_origin": contents.recipe_origin or None,
        "other": contents.other, "sets": {},
    }
    for name in names:
        if name not in contents.sets:
            raise CliError(f"{path}: no '{name}' weights; it holds {', '.join(contents.sets) or 'none'}")
        stored = contents.sets[name]
        total, dtypes = parameter_summary(stored)
        if contents.spec is None:
            check = "not checked (no spec; pass --spec)"
        else:
            try:
                canonical_weights(contents, name if contents.layout == "training" else "ema")
                check = "ok: matches the DiR parameter table"
            except FormatError as err:
                check = str(err)
        report["sets"][name] = {
            "tensors": len(stored), "parameters": total, "dtypes": dtypes, "check": check,
            "entries": [{"name": n, "shape": list(stored[n].shape), "dtype": stored[n].dtype}
                        for n in table_order(stored, contents.spec, contents.framework)],
        }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(render_inspect(report))
    return report


def render_inspect(report: dict) -> str:
    lines = [f"file:    {report['file']}", f"format:  {report['format']} ({report['format_label']})"]
    if report["layout"] == "training":
        step = f", step {report['step']}" if report["step"] is not None else ""
        lines.append(f"layout:  training checkpoint with weights {', '.join(report['weight_sets'])}{step}")
    else:
        lines.append("layout:  bare state dict" + (f" (step {report['step']})" if report["step"] else ""))
    if report["spec"] is None:
        lines.append("spec:    none (no spec in the file and no FILE.spec.json beside it; pass --spec)")
    else:
        lines.append(f"spec:    {json.dumps(report['spec'], sort_keys=True)}  (from {report['spec_origin']})")
    if report["recipe"] is None:
        lines.append("recipe:  none (the file does not say how it was trained; sampling needs the recipe keys, "
                     "or convert it with --recipe)")
    else:
        lines.append(f"recipe:  {json.dumps(report['recipe'], sort_keys=True)}  (from {report['recipe_origin']})")
    for key, value in report["other"].items():
        lines.append(f"other:   {key}: {value}")
    for name, info in report["sets"].items():
        label = "state dict" if name == "state" else f"weights '{name}'"
        dtypes = ", ".join(f"{d} x{n}" for d, n in info["dtypes"].items()) or "-"
        lines.append(f"{label}: {info['tensors']} tensors, {info['parameters']:,} parameters, dtypes {dtypes}")
        lines.append("check:   " + info["check"].replace("\n", "\n         "))
        width = max([len(e["name"]) for e in info["entries"]] + [4])
        lines.append(f"  {'name':<{width}}  {'shape':<18}  dtype")
        for entry in info["entries"]:
            lines.append(f"  {entry['name']:<{width}}  {str(entry['shape']):<18}  {entry['dtype']}")
    return "\n".join(lines)


# ---- entry point -------------------------------------------------------------------------------

def _one_line(err) -> str:
    """An error's message on one line: a list of problems (one per line) joined with '; '."""
    text = str(err).strip() or type(err).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["inspect"]:
            inspect(build_inspect_parser().parse_args(argv[1:]))
        else:
            if argv[:1] == ["convert"]:
                argv = argv[1:]
            convert(build_convert_parser().parse_args(argv))
    except (CliError, CheckpointError, SpecError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # permissions, disk full, a folder where a file should be
        print(f"{PROG}: error: {err.filename or ''}: {_one_line(err.strerror or err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still no traceback unless asked for
        if os.environ.get("CONVERT_CKPT_DEBUG"):
            raise
        print(f"{PROG}: error: unexpected {type(err).__name__}: {_one_line(err)} (set CONVERT_CKPT_DEBUG=1 for "
              "the traceback and please report it)", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
