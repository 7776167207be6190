"""The training recipe travels with the weights: every format, both layouts, through tools/convert_ckpt.py.

Also the layout of common/formats (one module per format) and common/atomic.py: the
package imports on its own and never imports common.checkpoint.
"""
import ast
import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

import common.formats as formats
from common.formats import (
    FormatError, load_pdparams, load_torch, read_contents, read_ms_checkpoint, read_safetensors, save_pdparams,
    save_torch, sidecar_path, write_checkpoint, write_ms_checkpoint, write_safetensors,
)
from common.param_mapping import to_framework
from common.params import init_canonical
from common.recipe import Recipe, recipe_from_config
from common.spec import build_spec
from conftest import REPO_ROOT
from tools.convert_ckpt import main

SPEC = build_spec("DiR-Tiny/2", hidden_size=32, depth=1, head_size=16, input_size=4, in_channels=1, num_classes=10,
                  mix_lora_rank=4, decay_lora_rank=4)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DDPM = recipe_from_config({"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "cosine",
                           "dataset": "digits"}, DIGITS)
FLOW = recipe_from_config({"objective": "flow", "flow_path": "gvp", "flow_prediction": "noise", "dataset": "digits"},
                          DIGITS)
HAS_TORCH = importlib.util.find_spec("torch") is not None
SUFFIXES = {"torch": "pth", "paddle": "pdparams", "mindspore": "ckpt", "safetensors": "safetensors"}
FORMATS = [fmt for fmt in SUFFIXES if fmt != "torch" or HAS_TORCH]
# (format, bare): every layout a file can have; safetensors has only one
LAYOUTS = [(fmt, bare) for fmt in FORMATS for bare in (False, True) if not (fmt == "safetensors" and bare)]


@pytest.fixture(scope="module")
def state():
    return init_canonical(SPEC, 0)


def layout_name(fmt, bare):
    return f"{fmt}_{'bare' if bare else 'train'}"


def expected_origin(path, bare):
    return f"sidecar {sidecar_path(path).name}" if bare else "file"


def convert(*args):
    return main([str(a) for a in args])


def test_the_recipes_hold_what_training_used():
    assert DDPM.to_dict() == {"recipe_version": 1, "objective": "ddpm", "diffusion_steps": 1000,
                              "noise_schedule": "cosine", "data": "pixels", "class_names": list(DIGITS),
                              "dataset": "digits"}
    assert (FLOW.objective, FLOW.flow_path, FLOW.flow_prediction) == ("flow", "gvp", "noise")
    # SiT's eps for a noise model on the GVP path, this project's time scale
    assert (FLOW.flow_train_eps, FLOW.flow_sample_eps, FLOW.flow_time_scale) == (1e-3, 1e-3, 1000.0)
    assert FLOW.diffusion_steps is None and FLOW.class_names[3] == "three"


# ---- every format pair ---------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", [DDPM, FLOW], ids=["ddpm_cosine", "flow_gvp_noise"])
def test_recipe_survives_every_format_pair_and_layout(recipe, state, tmp_path, capsys):
    for src_fmt, src_bare in LAYOUTS:
        src = tmp_path / f"src_{layout_name(src_fmt, src_bare)}.{SUFFIXES[src_fmt]}"
        write_checkpoint(src, src_fmt, state, SPEC, bare=src_bare, recipe=recipe, step=3)
        source = read_contents(src)
        assert source.recipe == recipe and source.recipe_origin == expected_origin(src, src_bare)
        for dst_fmt, dst_bare in LAYOUTS:
            dst = tmp_path / f"{layout_name(src_fmt, src_bare)}_to_{layout_name(dst_fmt, dst_bare)}.{SUFFIXES[dst_fmt]}"
            assert convert("--src", src, "--dst", dst, *(["--bare"] if dst_bare else [])) == 0, (src, dst)
            captured = capsys.readouterr()
            assert "no training recipe" not in captured.err, captured.err
            assert f"recipe {recipe.objective}" in captured.out
            contents = read_contents(dst)
            assert contents.recipe == recipe, (src_fmt, src_bare, dst_fmt, dst_bare)
            assert contents.recipe_origin == expected_origin(dst, dst_bare)
            assert contents.spec == SPEC and contents.layout == ("bare" if dst_bare or dst_fmt == "safetensors"
                                                                 else "training")
            # and once more to canonical weights: the recipe is still there, with the same values
            back = dst.with_name(dst.name + ".back.safetensors")
            assert convert("--src", dst, "--dst", back) == 0
            capsys.readouterr()
            assert read_contents(back).recipe.to_dict() == recipe.to_dict()


def test_where_each_format_stores_the_recipe(state, tmp_path):
    recipe = FLOW
    paths = {layout: tmp_path / f"{layout_name(*layout)}.{SUFFIXES[layout[0]]}" for layout in LAYOUTS}
    for (fmt, bare), path in paths.items():
        written = write_checkpoint(path, fmt, state, SPEC, bare=bare, recipe=recipe)
        assert written == ([path, sidecar_path(path)] if bare else [path])
    if HAS_TORCH:
        assert load_torch(paths["torch", False])["recipe"] == recipe.to_dict()  # a dict
        assert "recipe" not in load_torch(paths["torch", True])
    assert load_pdparams(paths["paddle", False])["recipe"] == recipe.to_dict()
    assert "recipe" not in load_pdparams(paths["paddle", True])
    entries = read_ms_checkpoint(paths["mindspore", False])
    assert isinstance(entries["recipe"], str) and json.loads(entries["recipe"]) == recipe.to_dict()  # JSON text
    assert list(entries)[-4:] == ["spec", "recipe", "config", "rng"]
    assert "recipe" not in read_ms_checkpoint(paths["mindspore", True])
    metadata = read_safetensors(paths["safetensors", False])[1]
    assert json.loads(metadata["recipe"]) == recipe.to_dict() and metadata["format"] == "dir-canonical"
    for fmt in FORMATS:
        if fmt != "safetensors":  # the sidecar of a bare state dict: {"spec": ..., "recipe": ...}
            side = json.loads(sidecar_path(paths[fmt, True]).read_text())
            assert side == {"spec": SPEC.to_dict(), "recipe": recipe.to_dict()}
            assert side["recipe"]["flow_time_scale"] == 1000.0 and side["recipe"]["class_names"][9] == "nine"


@pytest.mark.skipif(importlib.util.find_spec("mindspore") is None, reason="MindSpore is not installed")
def test_mindspore_reads_a_ckpt_with_a_recipe(state, tmp_path):
    """mindspore.load_checkpoint and backends/mindspore/train.py's reader take the 'recipe' string entry."""
    path = tmp_path / "with_recipe.ckpt"
    write_checkpoint(path, "mindspore", state, SPEC, recipe=DDPM, step=11, config={"lr": 1e-4})
    code = f"""
    import json
    import mindspore as ms
    raw = ms.load_checkpoint({str(path)!r})
    out = {{"recipe": raw["recipe"]}}
    from backends.mindspore.train import read_checkpoint
    checkpoint = read_checkpoint({str(path)!r})
    out["train_recipe"] = checkpoint["recipe"]
    out["model_keys_with_recipe"] = [k for k in checkpoint["model"] if "recipe" in k]
    out["step"] = checkpoint["step"]
    print(json.dumps(out))
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"], GLOG_v="3")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out["recipe"]) == DDPM.to_dict()
    train_recipe = out["train_recipe"]  # a string entry, not read as a tensor (JSON text, or already decoded)
    assert (json.loads(train_recipe) if isinstance(train_recipe, str) else train_recipe) == DDPM.to_dict()
    assert out["model_keys_with_recipe"] == [] and out["step"] == 11


# ---- files without a recipe ----------------------------------------------------------------------

def test_old_layout_sidecar_still_reads_and_gives_no_recipe(state, tmp_path, capsys):
    src = tmp_path / "old.pdparams"
    save_pdparams(src, to_framework("paddle", state, SPEC))
    sidecar_path(src).write_text(json.dumps(SPEC.to_dict(), indent=1))  # the layout before recipes
    contents = read_contents(src)
    assert contents.spec == SPEC and contents.spec_origin == "sidecar old.pdparams.spec.json"
    assert contents.recipe is None and contents.recipe_origin == ""
    out = tmp_path / "old_out.ckpt"
    assert convert("--src", src, "--dst", out, "--bare") == 0
    err = capsys.readouterr().err
    assert "old.pdparams carries no training recipe" in err and "--recipe" in err and "--objective" in err
    assert read_contents(out).recipe is None
    # without a recipe the sidecar keeps the old layout: older readers still read it
    assert json.loads(sidecar_path(out).read_text()) == SPEC.to_dict()
    # a bare state dict or canonical file without a recipe says nothing, and nothing is derived
    write_checkpoint(tmp_path / "none.safetensors", "safetensors", state, SPEC)
    assert "recipe" not in read_safetensors(tmp_path / "none.safetensors")[1]
    assert read_contents(tmp_path / "none.safetensors").recipe is None
    write_checkpoint(tmp_path / "none.pdparams", "paddle", state, SPEC)  # training layout, empty config
    assert read_contents(tmp_path / "none.pdparams").recipe is None


def test_training_checkpoint_without_recipe_derives_it_from_its_config(state, tmp_path, capsys):
    config = {"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "cosine", "lr": 1e-4,
              "dataset": "digits"}
    formats_with_training_layout = [fmt for fmt in FORMATS if fmt != "safetensors"]
    for fmt in formats_with_training_layout:
        src = tmp_path / f"older.{SUFFIXES[fmt]}"
        write_checkpoint(src, fmt, state, SPEC, config=config, step=500)  # as older checkpoints were: no 'recipe'
        contents = read_contents(src)
        assert contents.recipe == Recipe(objective="ddpm", diffusion_steps=1000, noise_schedule="cosine",
                                         dataset="digits")
        assert contents.recipe_origin == "config"
        out = tmp_path / f"older_{fmt}.safetensors"
        assert convert("--src", src, "--dst", out) == 0
        assert "no training recipe" not in capsys.readouterr().err
        metadata = read_safetensors(out)[1]
        assert json.loads(metadata["recipe"]) == {"recipe_version": 1, "objective": "ddpm", "diffusion_steps": 1000,
                                                  "noise_schedule": "cosine", "data": "pixels",
                                                  "dataset": "digits"}
        assert json.loads(metadata["converted"])["recipe"] == "config"
        assert read_contents(out).recipe_origin == "file"
    if HAS_TORCH:
        assert "recipe" not in load_torch(tmp_path / "older.pth")
    # a flow run's config, in a training .ckpt
    flow_config = {"objective": "flow", "flow_path": "linear", "flow_prediction": "velocity", "flow_time_scale": 1.0}
    write_checkpoint(tmp_path / "flow.ckpt", "mindspore", state, SPEC, config=flow_config)
    derived = read_contents(tmp_path / "flow.ckpt").recipe
    assert (derived.flow_path, derived.flow_prediction, derived.flow_time_scale) == ("linear", "velocity", 1.0)
    assert (derived.flow_train_eps, derived.flow_sample_eps) == (0.0, 1e-3)
    # a config whose objective is unknown: one clear line
    write_checkpoint(tmp_path / "odd.pdparams", "paddle", state, SPEC, config={"objective": "gan"})
    assert convert("inspect", tmp_path / "odd.pdparams") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "odd.pdparams" in err and "'objective' = 'gan'" in err


# ---- malformed recipes ---------------------------------------------------------------------------

def _bad_files(state, root):
    """(file, text the error must hold) for a malformed recipe in each format and in a sidecar."""
    bad = []
    good = {fmt: root / f"good.{SUFFIXES[fmt]}" for fmt in FORMATS}
    for fmt, path in good.items():
        write_checkpoint(path, fmt, state, SPEC, recipe=DDPM)
    if HAS_TORCH:
        obj = load_torch(good["torch"])
        obj["recipe"] = {**DDPM.to_dict(), "diffusion_steps": 0}
        save_torch(root / "bad.pth", obj)
        bad.append((root / "bad.pth", "recipe key 'diffusion_steps' = 0: must be an integer >= 1"))
        bare = {k: v for k, v in load_torch(good["torch"])["ema"].items()}
        save_torch(root / "bad_list.pth", {**bare, "spec": SPEC.to_dict(), "recipe": ["ddpm"]})
        bad.append((root / "bad_list.pth", "a recipe is a mapping of keys, found list"))
    obj = load_pdparams(good["paddle"])
    obj["recipe"]["objective"] = "diffusion"
    save_pdparams(root / "bad.pdparams", obj)
    bad.append((root / "bad.pdparams", "recipe key 'objective' = 'diffusion': allowed: ddpm, flow"))
    entries = read_ms_checkpoint(good["mindspore"])
    entries["recipe"] = '{"objective": "ddpm", '
    write_ms_checkpoint(root / "bad.ckpt", entries)
    bad.append((root / "bad.ckpt", "the recipe is not valid JSON"))
    tensors, metadata = read_safetensors(good["safetensors"])
    write_safetensors(root / "bad.safetensors", tensors, {**metadata, "recipe": '{"objective": "flow"}'})
    bad.append((root / "bad.safetensors", "recipe key 'flow_path' = None: required by objective 'flow'"))
    write_checkpoint(root / "bad_side.ckpt", "mindspore", state, SPEC, bare=True, recipe=DDPM)
    side = sidecar_path(root / "bad_side.ckpt")
    side.write_text(json.dumps({"spec": SPEC.to_dict(), "recipe": {**DDPM.to_dict(), "sampler": "ddim"}}))
    bad.append((root / "bad_side.ckpt", "unknown recipe keys ['sampler']"))
    return bad, side


def test_malformed_recipe_in_each_format_is_one_line_and_exit_code_2(state, tmp_path, capsys):
    bad, side = _bad_files(state, tmp_path)
    assert len(bad) == 5 + HAS_TORCH
    for path, why in bad:
        with pytest.raises(FormatError, match="recipe"):
            read_contents(path)
        for args in (["--src", path, "--dst", tmp_path / "out.safetensors"], ["inspect", path]):
            assert convert(*args) == 2, (path, args)
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("convert_ckpt: error: "), err
            named = side if path.name == "bad_side.ckpt" else path
            assert str(named) in lines[0] and why in lines[0], (why, lines[0])
            assert "unexpected" not in lines[0] and "Traceback" not in err
        assert not (tmp_path / "out.safetensors").exists()


# ---- --recipe ------------------------------------------------------------------------------------

def test_recipe_argument_fills_a_source_without_one(state, tmp_path, capsys):
    src = tmp_path / "plain.pdparams"
    save_pdparams(src, {**to_framework("paddle", state, SPEC), "spec": SPEC.to_dict()})  # a bare dict, no recipe
    assert read_contents(src).recipe is None
    assert convert("--src", src, "--dst", tmp_path / "flow.ckpt", "--recipe", FLOW.to_json()) == 0
    captured = capsys.readouterr()
    assert "no training recipe" not in captured.err and "recipe flow (from --recipe)" in captured.out
    contents = read_contents(tmp_path / "flow.ckpt")
    assert contents.recipe == FLOW and contents.recipe_origin == "file"
    rng = json.loads(read_ms_checkpoint(tmp_path / "flow.ckpt")["rng"])
    assert rng["converted"]["recipe"] == "--recipe"
    # from a JSON file, into a bare .pth with its sidecar
    recipe_file = tmp_path / "ddpm_recipe.json"
    recipe_file.write_text(json.dumps({"objective": "ddpm", "diffusion_steps": 4000, "noise_schedule": "linear"}))
    dst = tmp_path / ("from_file.pth" if HAS_TORCH else "from_file.pdparams")
    assert convert("--src", src, "--dst", dst, "--bare", "--recipe", recipe_file) == 0
    capsys.readouterr()
    assert read_contents(dst).recipe == Recipe(objective="ddpm", diffusion_steps=4000, noise_schedule="linear")
    assert json.loads(sidecar_path(dst).read_text())["recipe"]["diffusion_steps"] == 4000
    # a malformed or missing --recipe: exit code 2, one line, nothing written
    for value, why in (('{"objective": "ddpm"}', "recipe key 'diffusion_steps' = None: required by objective 'ddpm'"),
                       (str(tmp_path / "nowhere.json"), "is neither a JSON object nor a file")):
        assert convert("--src", src, "--dst", tmp_path / "x.safetensors", "--recipe", value) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("convert_ckpt: error: --recipe") and why in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_recipe_argument_contradicting_the_source_is_refused(state, tmp_path, capsys):
    src = tmp_path / "cosine.safetensors"
    write_checkpoint(src, "safetensors", state, SPEC, recipe=DDPM)
    linear = Recipe(objective="ddpm", diffusion_steps=1000, noise_schedule="linear", class_names=DIGITS)
    assert convert("--src", src, "--dst", tmp_path / "out.pdparams", "--recipe", linear.to_json()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--recipe contradicts the recipe the source carries (from file)" in err
    assert "noise_schedule: source 'cosine' vs --recipe 'linear'" in err
    assert not (tmp_path / "out.pdparams").exists()
    # the same recipe again is fine
    assert convert("--src", src, "--dst", tmp_path / "out.pdparams", "--recipe", DDPM.to_json()) == 0
    assert read_contents(tmp_path / "out.pdparams").recipe == DDPM
    # a recipe derived from an older checkpoint's config is the source's own too
    write_checkpoint(tmp_path / "older.ckpt", "mindspore", state, SPEC, config={"objective": "ddpm"})
    capsys.readouterr()
    assert convert("--src", tmp_path / "older.ckpt", "--dst", tmp_path / "o.safetensors", "--recipe",
                   DDPM.to_json()) == 2
    err = capsys.readouterr().err
    assert "(from config)" in err and "noise_schedule: source 'linear' vs --recipe 'cosine'" in err


# ---- inspect -------------------------------------------------------------------------------------

def test_inspect_shows_the_recipe(state, tmp_path, capsys):
    path = tmp_path / "flow.ckpt"
    write_checkpoint(path, "mindspore", state, SPEC, recipe=FLOW)
    assert convert("inspect", path) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("recipe:"))
    assert '"flow_path": "gvp"' in line and '"flow_prediction": "noise"' in line and line.endswith("(from file)")
    assert convert("inspect", path, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"] == FLOW.to_dict() and report["recipe_origin"] == "file"
    assert "recipe" not in report["other"]
    write_checkpoint(tmp_path / "bare.pdparams", "paddle", state, SPEC, bare=True, recipe=DDPM)
    assert convert("inspect", tmp_path / "bare.pdparams", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["noise_schedule"] == "cosine"
    assert report["recipe_origin"] == "sidecar bare.pdparams.spec.json"
    write_checkpoint(tmp_path / "none.safetensors", "safetensors", state, SPEC)
    assert convert("inspect", tmp_path / "none.safetensors") == 0
    assert "recipe:  none" in capsys.readouterr().out


# ---- the package layout --------------------------------------------------------------------------

FORMAT_MODULES = ("stored", "safetensors_io", "pdparams", "mindspore_ckpt", "torch_pth")
# every public name of common/formats.py before it became a package
OLD_PUBLIC_NAMES = (
    "CANONICAL_FORMAT", "FORMAT_VERSION", "CheckpointError", "atomic_path", "FORMATS", "SUFFIX_FORMAT",
    "FORMAT_ALIASES", "FORMAT_LABEL", "FORMAT_FRAMEWORK", "DTYPES", "WEIGHT_SETS", "FLOAT_DTYPES",
    "PDPARAMS_PROTOCOL", "MS_SLICE_BYTES", "MS_PREFIXES", "MS_TRAIN_FORMAT", "MS_RESERVED_TAGS", "FormatError",
    "UnsafeCheckpointError", "MissingFrameworkError", "detect_format", "sidecar_path", "Stored",
    "bf16_bits_to_float32", "float32_to_bf16_bits", "cast_for_output", "read_safetensors", "write_safetensors",
    "RestrictedUnpickler", "load_pdparams", "save_pdparams", "checkpoint_file_descriptor",
    "checkpoint_message_class", "read_ms_checkpoint", "write_ms_checkpoint", "load_torch", "save_torch",
    "Contents", "read_contents", "resolve_spec_argument", "canonical_weights", "read_checkpoint",
    "write_checkpoint", "parameter_summary", "table_order",
)


def _imported_modules(path):
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_formats_and_atomic_never_import_common_checkpoint():
    package = REPO_ROOT / "common" / "formats"
    assert not (REPO_ROOT / "common" / "formats.py").exists()
    sources = sorted(package.glob("*.py")) + [REPO_ROOT / "common" / "atomic.py"]
    assert {p.stem for p in sources} >= {"__init__", "atomic", *FORMAT_MODULES}
    for path in sources:
        imported = _imported_modules(path)
        assert imported, path
        offending = [name for name in imported if name == "common.checkpoint" or name.startswith("common.checkpoint.")]
        assert offending == [], f"{path.relative_to(REPO_ROOT)} imports {offending}"
    for name in FORMAT_MODULES:  # each format module says what the format is and how it is read
        doc = ast.get_docstring(ast.parse((package / f"{name}.py").read_text()))
        assert doc and len(doc.splitlines()) >= 3, name
    assert "common.atomic" in _imported_modules(package / "contents.py")


def test_import_common_formats_in_a_fresh_interpreter():
    code = ("import sys, common.formats as f; "
            "assert 'common.checkpoint' not in sys.modules, 'common.formats imported common.checkpoint'; "
            "assert 'torch' not in sys.modules and 'google.protobuf' not in sys.modules; "
            "print(len(f.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"]), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(formats.__all__)
    # and common.checkpoint on its own still offers what other modules import from it
    code = ("from common.checkpoint import CheckpointError, atomic_path, atomic_write, load_canonical, save_canonical; "
            "import common.atomic, common.formats; "
            "assert atomic_path is common.atomic.atomic_path and atomic_write is common.atomic.atomic_write; "
            "assert CheckpointError is common.formats.CheckpointError; "
            "assert issubclass(common.formats.FormatError, CheckpointError)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"]), timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_name_of_the_old_module_is_importable(monkeypatch):
    missing = [name for name in OLD_PUBLIC_NAMES if not hasattr(formats, name)]
    assert missing == []
    for name in ("_CKPT_CLASS", "_check_file", "_parse_spec", "_PICKLE_ALLOWED", "_ST_DTYPES"):  # private ones too
        assert hasattr(formats, name), name
    # a setting patched on the package reaches the module that uses it, and is restored
    from common.formats import mindspore_ckpt

    monkeypatch.setattr(formats, "MS_SLICE_BYTES", 4096)
    assert mindspore_ckpt.MS_SLICE_BYTES == 4096 == formats.MS_SLICE_BYTES
    monkeypatch.undo()
    assert mindspore_ckpt.MS_SLICE_BYTES == 512 * 1024 * 1024 == formats.MS_SLICE_BYTES
    formats.checkpoint_message_class()
    assert formats._CKPT_CLASS is mindspore_ckpt._CKPT_CLASS is not None
    cached = mindspore_ckpt._CKPT_CLASS
    formats._CKPT_CLASS = None  # what tests do to drop the cached protobuf class
    assert mindspore_ckpt._CKPT_CLASS is None
    mindspore_ckpt._CKPT_CLASS = cached


def test_atomic_write_keeps_the_old_file_on_failure_and_gives_the_usual_mode(tmp_path):
    from common.atomic import atomic_path, atomic_write

    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda tmp: tmp.write_text("first"))
    assert target.read_text() == "first"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
