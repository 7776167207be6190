"""The benchmark runner end to end at its tiny --smoke setting: files, fields, positive ratios.

The figures themselves are not checked (tiny sizes on a shared CPU measure overheads);
that the pipeline runs and writes what bench/README.md documents is.
"""
import json
import math

import pytest

from tests.conftest import REPO_ROOT, run_python

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.torch


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_smoke_writes_json_markdown_and_plots(tmp_path):
    proc = run_python(["-m", "bench.run", "--smoke", "--out-dir", str(tmp_path)], timeout=600)
    files = sorted(p.name for p in tmp_path.iterdir())
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1, files
    results = json.loads((tmp_path / jsons[0]).read_text())
    stem = jsons[0][: -len(".json")]
    for suffix in (".md", "-wkv.png", "-scaling-time.png", "-scaling-memory.png"):
        assert stem + suffix in files, (suffix, files)
    assert (tmp_path / f"{stem}-wkv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert results["mode"] == "smoke"
    for key in ("schema", "date", "command", "machine", "wall_s", "section_wall_s", "wkv", "scaling", "kernels", "backends", "backends_demo",
                "backends_text", "targets", "notes", "files"):
        assert key in results, key
    for key in ("host", "device", "cpu", "cpu_count", "torch", "torch_threads"):
        assert key in results["machine"], key

    # WKV6: every length, positive times and ratios, chunked agrees with the reference
    wkv = results["wkv"]
    assert [row["T"] for row in wkv["rows"]] == wkv["config"]["lengths"]
    for row in wkv["rows"]:
        for key in ("chunked_fwd_s", "chunked_fwd_bwd_s", "reference_fwd_s", "reference_fwd_bwd_s", "matmul_s",
                    "speedup_fwd", "speedup_fwd_bwd", "chunked_fwd_over_matmul", "chunked_fwd_matmul_flops"):
            assert _positive(row[key]), (key, row[key])
        assert row["max_abs_err_vs_reference"] < 1e-4
    assert _positive(wkv["peak_gemm"]["gflops"])

    # DiR vs DiT: every (model, tokens) pair ran, with memory, ratios and slopes
    scaling = results["scaling"]
    pairs = {(row["model"], row["tokens"]) for row in scaling["rows"] if row["status"] == "ok"}
    assert pairs == {(m, t) for m in ("dit", "dir-causal", "dir-bidirectional") for t in scaling["config"]["tokens"]}
    for row in scaling["rows"]:
        assert _positive(row["per_image_s"]) and _positive(row["peak_mem_mb"]) and row["step_peak_mb"] >= 0
    ratios = scaling["summary"]["ratios"]
    for model in ("dir-causal", "dir-bidirectional"):
        for tokens in scaling["config"]["tokens"]:
            assert _positive(ratios[f"dit_over_{model}@{tokens}"])
        assert isinstance(scaling["summary"]["slopes"][model], float)

    # kernels: chunked WKV6 and SDPA timed at every size; fla says why not on a CPU
    for row in results["kernels"]["rows"]:
        assert row["chunked"]["status"] == row["sdpa"]["status"] == "ok"
        assert _positive(row["chunked_over_sdpa"]) and row["chunked"]["spread"]["min_s"] > 0
        assert row["fla"]["status"] in ("ok", "needs CUDA", "fla not installed")
    assert "Token-mixing kernels" in (tmp_path / f"{stem}.md").read_text()

    # training step: torch ran in its own process and is its own reference
    for section in ("backends_demo", "backends_text", "backends"):
        torch_row = next(row for row in results[section]["rows"] if row["backend"] == "torch")
        assert torch_row["status"] == "ok", torch_row
        assert _positive(torch_row["step_s"]) and torch_row["ratio_to_torch"] == pytest.approx(1.0)
    # the demo step really is the demo's 16 tokens of 4x4 pixels
    demo_row = next(row for row in results["backends_demo"]["rows"] if row["backend"] == "torch")
    assert demo_row["result"]["tokens"] == 16 and demo_row["result"]["spec"]["patch_size"] == 4
    text_row = next(row for row in results["backends_text"]["rows"] if row["backend"] == "torch")
    assert text_row["result"]["condition"] == "text" and text_row["result"]["spec"]["condition"] == "text"
    assert text_row["result"]["params"] > 65536 * 128  # the caption encoder's embedding is in the step

    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| T |" in markdown and "DiR vs DiT" in markdown and "Training step per backend" in markdown
    assert "wrote" in proc.stdout


def test_quick_mode_covers_the_issue_sizes():
    """The figures the issues ask for are what --quick measures (not run here: minutes)."""
    from bench.run import MODES

    quick = MODES["quick"]
    assert tuple(quick["wkv"]["lengths"]) == (256, 1024, 4096)
    assert (quick["wkv"]["batch"], quick["wkv"]["heads"], quick["wkv"]["head_size"]) == (2, 6, 64)
    assert tuple(quick["scaling"]["tokens"]) == (256, 1024, 4096, 16384)
    assert (quick["scaling"]["width"], quick["scaling"]["head_size"]) == (384, 64)
    assert set(quick["backends"]["backends"]) == {"torch", "paddle", "mindspore"}
    assert (quick["backends"]["config"]["model"], quick["backends"]["config"]["input_size"]) == ("DiR-S/2", 32)
    assert set(quick["backends_demo"]["backends"]) == {"torch", "paddle", "mindspore"}
    assert set(quick["backends_text"]["backends"]) == {"torch", "paddle", "mindspore"}
    assert quick["backends_text"]["config"]["condition"] == "text" and quick["backends_text"]["config"]["repeats"] >= 5
    assert tuple(quick["kernels"]["tokens"]) == (256, 1024, 4096)
    assert tuple(quick["kernels"]["widths"]) == ("DiR-S/2", "DiR-XL/2")
    assert "dir-bidirectional+recompute" in quick["scaling"]["models"]
    # every timed figure is a median of at least 5 runs
    assert quick["wkv"]["repeats"] >= 5 and min(quick["wkv"]["ref_repeats"].values()) >= 5
    assert quick["scaling"]["repeats"] >= 5 and quick["scaling"]["repeats_large"] >= 5
    assert quick["kernels"]["repeats"] >= 5
    assert quick["backends"]["config"]["repeats"] >= 5 and quick["backends_demo"]["config"]["repeats"] >= 5


def test_demo_step_matches_the_demo_config():
    """bench's demo step times the model and batch configs/train/digits.yaml trains."""
    from bench.run import DEMO_STEP
    from common.config import TRAIN_SCHEMA, parse_cli

    config, _ = parse_cli(["-c", str(REPO_ROOT / "configs/train/digits.yaml")], TRAIN_SCHEMA, "t")
    assert DEMO_STEP["input_size"] == config["image_size"] and DEMO_STEP["patch_size"] == config["patch_size"]
    assert DEMO_STEP["depth"] == config["depth"] and DEMO_STEP["batch"] == config["global_batch_size"]
    assert DEMO_STEP["model"] == config["model"]


def test_text_step_matches_the_text_demo_config():
    """bench's text step times the network, caption encoder and batch configs/train/digits_text.yaml trains."""
    from bench.run import TEXT_STEP
    from common.config import TRAIN_SCHEMA, parse_cli

    config, _ = parse_cli(["-c", str(REPO_ROOT / "configs/train/digits_text.yaml")], TRAIN_SCHEMA, "t")
    assert config["condition"] == TEXT_STEP["condition"] == "text"
    for key, config_key in (("input_size", "image_size"), ("patch_size", "patch_size"), ("depth", "depth"),
                            ("batch", "global_batch_size"), ("model", "model"), ("text_depth", "text_depth"),
                            ("text_max_tokens", "text_max_tokens")):
        assert TEXT_STEP[key] == config[config_key], key


def test_step_commands_and_result_parsing():
    from bench.train_steps import command, merge_rounds, parse_result

    args = command("paddle", {"batch": 2, "depth": None, "recompute": True, "mindspore_mode": "graph"})
    assert args == ["-m", "bench.train_step", "--backend", "paddle", "--batch", "2", "--recompute",
                    "--mindspore-mode", "graph"]
    with pytest.raises(KeyError, match="batch_size"):
        command("torch", {"batch_size": 2})
    assert parse_result('noise\nBENCH_RESULT {"step_s": 0.5}\n') == {"step_s": 0.5}
    assert parse_result("no result line") is None
    rounds = [{"status": "ok", "step_s": 2.0, "result": {"times_s": [1.0, 2.0, 3.0]}},
              {"status": "timeout"},
              {"status": "ok", "step_s": 5.0, "result": {"times_s": [4.0, 5.0, 6.0]}}]
    row = merge_rounds(rounds)
    assert row["step_s"] == 3.5 and row["rounds"] == 2 and row["failed_rounds"] == ["timeout"]
    assert row["spread"]["min_s"] == 1.0 and row["spread"]["max_s"] == 6.0


def test_spread_and_load_warning(monkeypatch):
    import os

    from bench import util

    s = util.spread([3.0, 1.0, 2.0, 4.0, 5.0])
    assert (s["min_s"], s["max_s"], s["q1_s"], s["q3_s"]) == (1.0, 5.0, 2.0, 4.0)
    assert s["range_over_median"] == pytest.approx(4.0 / 3.0)
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 1.0, 1.0))
    assert "load average 99.0" in util.load_warning("start")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 1.0, 1.0))
    assert util.load_warning("start") is None


def test_report_gives_spreads_and_rerenders_under_the_file_name(tmp_path):
    from bench import report

    assert report._ms_range([0.003, 0.001, 0.002]) == "1.0-3.0"
    assert report._ms_range([0.002], 1.0) == "-"
    # interquartile bounds of [1..5] are 2 and 4; the denominator's are 1 and 1
    assert report._ratio_range([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5) == "2.00-4.00"
    assert report._ratio_range([1.0, 2.0], None) == "-"
    results = {"date": "2026-01-01", "mode": "quick", "command": "python -m bench.run", "wall_s": 60.0,
               "machine": {"host": "h", "device": "cpu", "cpu": "c", "cpu_count": 2, "torch": "t", "torch_threads": 2}}
    paths = report.write_all(results, tmp_path, "renamed-run")
    assert paths["markdown"] == tmp_path / "renamed-run.md" and paths["markdown"].is_file()
    assert json.loads((tmp_path / "renamed-run.json").read_text())["files"]["markdown"] == "renamed-run.md"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # written through temp names, renamed


@pytest.mark.parametrize("backend", ["paddle", "mindspore"])
def test_backend_step_timer_runs_the_demo_step(backend):
    """Each backend's trainer step builds the demo spec, trains and reports a positive step time
    with a finite loss (the --smoke run above only times torch)."""
    pytest.importorskip(backend)
    from bench.train_steps import run_backend

    config = dict(model="DiR-Tiny/2", input_size=16, patch_size=4, in_channels=1, num_classes=10, depth=1,
                  batch=2, warmup=1, repeats=2, device="cpu")
    row = run_backend(backend, config, timeout=300, threads=1)
    assert row["status"] == "ok", row
    result = row["result"]
    assert result["tokens"] == 16 and result["spec"]["patch_size"] == 4 and result["spec"]["depth"] == 1
    assert _positive(row["step_s"]) and len(result["times_s"]) == 2 and result["backend"] == backend
    assert "TrainAdapter" in result["step"]
    assert math.isfinite(result["loss_first"]) and math.isfinite(result["loss_last"])
