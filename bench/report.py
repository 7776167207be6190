"""Turn a bench result dict into its JSON file, a Markdown table and PNG plots."""
from __future__ import annotations

import json
import re
from pathlib import Path

from bench.util import spread

MODEL_LABELS = {"dit": "DiT (SDPA attention)", "dir-causal": "DiR causal", "dir-bidirectional": "DiR bidirectional",
                "dir-causal+recompute": "DiR causal, recompute", "dir-bidirectional+recompute": "DiR bidirectional, recompute"}


# ---- targets ---------------------------------------------------------------------------------
def evaluate_targets(results: dict) -> list[dict]:
    """Each issue target with its measured value and whether it is met (None: not measured)."""
    targets = []

    def add(name, value, ok, rule, source):
        targets.append({"target": name, "rule": rule, "measured": value,
                        "met": (None if value is None else bool(ok(value))), "source": source})

    wkv = {row["T"]: row for row in results.get("wkv", {}).get("rows", [])}
    for length, need in ((1024, 15.0), (4096, 50.0)):
        row = wkv.get(length)
        add(f"WKV6 chunked fwd+bwd speed-up over the reference at T={length}",
            row["speedup_fwd_bwd"] if row else None, lambda v, n=need: v >= n, f">= {need:g}x", "wkv")
    for length in sorted(wkv):
        add(f"Chunked WKV6 forward over a same-FLOPs bmm at T={length}",
            wkv[length]["chunked_fwd_over_matmul"], lambda v: v <= 2.0, "<= 2x", "wkv")
    ratios = results.get("scaling", {}).get("summary", {}).get("ratios", {})
    rows = {(r["model"], r["tokens"]): r for r in results.get("scaling", {}).get("rows", []) if r.get("status") == "ok"}
    dit_big = rows.get(("dit", 16384))
    for model in ("dir-causal", "dir-bidirectional", "dir-bidirectional+recompute"):
        row = rows.get((model, 16384))
        add(f"{MODEL_LABELS[model]}: step peak memory at 16384 tokens over DiT's",
            row["step_peak_mb"] / dit_big["step_peak_mb"] if row and dit_big and dit_big.get("step_peak_mb") else None,
            lambda v: v <= 1.0, "<= 1 (DiT's)", "scaling")
    ratio_256 = ratios.get("dit_over_dir-bidirectional@256")
    add("DiR bidirectional time per image at 256 tokens over DiT's", 1.0 / ratio_256 if ratio_256 else None,
        lambda v: v <= 1.2, "<= 1.2", "scaling")
    for model in ("dir-bidirectional", "dir-causal"):
        add(f"{MODEL_LABELS[model]}: time/image at 16384 tokens over 4096",
            ratios.get(f"{model}_16384_over_4096"), lambda v: v <= 4.5, "<= 4.5 (linear: 4.0)", "scaling")
    for model in ("dir-bidirectional", "dir-causal"):
        add(f"DiT time over {MODEL_LABELS[model]} time at 4096 tokens",
            ratios.get(f"dit_over_{model}@4096"), lambda v: v > 1.0, "> 1 (DiR faster)", "scaling")
        add(f"DiT time over {MODEL_LABELS[model]} time at 16384 tokens",
            ratios.get(f"dit_over_{model}@16384"), lambda v: v >= 3.0, ">= 3x", "scaling")
    for section, label in (("backends_demo", "demo config"), ("backends_text", "text demo config"),
                           ("backends", "DiR-S/2 at 256 tokens")):
        for row in results.get(section, {}).get("rows", []):
            if row.get("backend") in ("paddle", "mindspore"):
                add(f"{row['backend']} training step over PyTorch's, {label}", row.get("ratio_to_torch"),
                    lambda v: v <= 2.0, "<= 2x (aim 1.5x)", section)
    return targets


# ---- markdown --------------------------------------------------------------------------------
def _fmt(value, spec="{:.3g}"):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return spec.format(value)


def _ms(seconds):
    return "-" if seconds is None else (f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}")


def _ms_range(times, scale: float = 1.0) -> str:
    """The spread of timed runs, min-max in ms ("-" for fewer than two)."""
    if not times or len(times) < 2:
        return "-"
    return f"{_ms(min(times) * scale)}-{_ms(max(times) * scale)}"


def _ratio_range(numerator_times, denominator_times) -> str:
    """The spread of a ratio of two timed figures, from their interquartile ranges: the numerator's
    lower quartile over the denominator's upper one, to the other way round ("-" without raw times)."""
    if not numerator_times or not denominator_times or min(len(numerator_times), len(denominator_times)) < 2:
        return "-"
    n, d = spread(numerator_times), spread(denominator_times)
    return f"{n['q1_s'] / d['q3_s']:.2f}-{n['q3_s'] / d['q1_s']:.2f}"


def markdown(results: dict, plot_names: dict) -> str:
    m = results["machine"]
    lines = [f"# DiR benchmarks: {results['date']} on {m['host']}", "",
             f"- mode: `{results['mode']}` (`{results['command']}`), total {results['wall_s'] / 60:.1f} min",
             f"- device: **{m['device']}**" + (f" ({m.get('cuda_device')})" if m["device"].startswith("cuda") else "")
             + f"; CPU {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} threads"
             + (f", load average at start {m['load_average'][0]:.1f}" if m.get("load_average") else ""),
             "- every time is the median of several runs after a warm-up; ratios are between figures of this run", ""]
    if not results.get("complete", True):
        lines[1:1] = ["", f"**Partial run**: sections done so far: {', '.join(results['section_wall_s'])}."]

    targets = results.get("targets", [])
    if targets:
        lines += ["## Targets", "", "| target | rule | measured | met |", "|---|---|---|---|"]
        for t in targets:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {t['rule']} | {_fmt(t['measured'], '{:.2f}')} | {met} |")
        lines.append("")

    wkv = results.get("wkv")
    if wkv:
        c = wkv["config"]
        lines += [f"## WKV6: chunked vs reference (B={c['B']}, H={c['H']}, K={c['K']}, causal, fp32)", "",
                  "| T | chunked fwd ms (range) | reference fwd ms | fwd speed-up | chunked fwd+bwd ms (range) "
                  "| reference fwd+bwd ms | fwd+bwd speed-up | same-FLOPs bmm ms (range) | chunked fwd / bmm "
                  "(interquartile) | chunked GFLOP/s | max abs err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in wkv["rows"]:
            t = r.get("timings", {})
            lines.append(f"| {r['T']} | {_ms(r['chunked_fwd_s'])} ({_ms_range(t.get('chunked_fwd'))}) | "
                         f"{_ms(r['reference_fwd_s'])} | {r['speedup_fwd']:.1f}x | {_ms(r['chunked_fwd_bwd_s'])} "
                         f"({_ms_range(t.get('chunked_fwd_bwd'))}) | {_ms(r['reference_fwd_bwd_s'])} | "
                         f"{r['speedup_fwd_bwd']:.1f}x | {_ms(r['matmul_s'])} ({_ms_range(t.get('matmul'))}) | "
                         f"{r['chunked_fwd_over_matmul']:.2f}x ({_ratio_range(t.get('chunked_fwd'), t.get('matmul'))}) | "
                         f"{r['chunked_fwd_gflops']:.1f} | {r['max_abs_err_vs_reference']:.1e} |")
        peak = wkv["peak_gemm"]
        lines += ["", f"Same FLOPs: the chunked forward's matrix-product FLOPs, 2L(LK + LV + 2KV) per chunk of "
                  f"L={c['chunk_size']} per batch element and head, done by one `torch.bmm` of "
                  f"[B·H·chunks, {c['chunk_size']}, K] x [.., K, 4L]. A {peak['size']}^3 GEMM runs at "
                  f"{peak['gflops']:.1f} GFLOP/s here (the machine's matmul rate). Reference: "
                  f"{', '.join(f'T={k}: {v} run(s)' for k, v in c['reference_repeats'].items())}; chunked: "
                  f"median of {c['repeats']} after {c['warmup']} warm-up.", ""]
        if plot_names.get("wkv"):
            lines += [f"![WKV6 times]({plot_names['wkv']})", ""]

    sc = results.get("scaling")
    if sc:
        c = sc["config"]
        lines += [f"## DiR vs DiT: forward+backward per image (width {c['width']}, {c['heads']} heads of "
                  f"{c['head_size']}, patch 2, depth {c['depth']}; {c['batch_rule']}, token budget {c['token_budget']})",
                  ""]
        models = [m for m in MODEL_LABELS if any(r["model"] == m for r in sc["rows"])]
        by = {(r["model"], r["tokens"]): r for r in sc["rows"]}
        head = "| tokens | batch | " + " | ".join(f"{MODEL_LABELS[m]} ms/img (range)" for m in models)
        head += " | " + " | ".join(f"DiT / {MODEL_LABELS[m]}" for m in models if m != "dit")
        head += " | " + " | ".join(f"{MODEL_LABELS[m]} step peak MB" for m in models) + " |"
        lines += [head, "|" + "---|" * (2 + len(models) + (len(models) - 1) + len(models))]
        for tokens in c["tokens"]:
            cells = [str(tokens), str(by.get((models[0], tokens), {}).get("batch", "-"))]
            for m in models:
                r = by.get((m, tokens), {})
                cells.append(f"{_ms(r['per_image_s'])} ({_ms_range(r.get('times_s'), 1 / r['batch'])})"
                             if r.get("status") == "ok" else r.get("status", "-"))
            for m in models:
                if m == "dit":
                    continue
                cells.append(_fmt(sc["summary"]["ratios"].get(f"dit_over_{m}@{tokens}"), "{:.2f}x"))
            for m in models:
                r = by.get((m, tokens), {})
                cells.append(f"{r['step_peak_mb']:.0f}" if r.get("status") == "ok" else r.get("status", "-"))
            lines.append("| " + " | ".join(cells) + " |")
        s = sc["summary"]
        lines += ["", "Fitted log-log slope of time per image against tokens (1 = linear, 2 = quadratic): "
                  + "; ".join(f"{MODEL_LABELS[m]} {_fmt(s['slopes'].get(m), '{:.2f}')} over all sizes, "
                              f"{_fmt(s['slopes_last_two'].get(m), '{:.2f}')} over the last two" for m in models) + ".",
                  "", f"Memory: {c['memory']}", ""]
        if r0 := next((r for r in sc["rows"] if r.get("sdpa_backend")), None):
            lines += [f"DiT attention: `scaled_dot_product_attention`, kernel chosen by torch: "
                      f"`{r0['sdpa_backend']}`.", ""]
        for key in ("scaling_time", "scaling_memory"):
            if plot_names.get(key):
                lines += [f"![{key}]({plot_names[key]})", ""]

    kernels = results.get("kernels")
    if kernels:
        c = kernels["config"]
        lines += [f"## Token-mixing kernels: fwd+bwd of the op alone ({c['dtype']} on {c['device']}, WKV6 "
                  f"{c['wkv']}, heads of {c['head_size']}, batch = token budget {c['token_budget']} // tokens)", "",
                  "| width | tokens | batch | WKV6 chunked ms | WKV6 fla ms | SDPA ms | chunked / SDPA | fla / SDPA |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in kernels["rows"]:
            cells = [r["width"], str(r["tokens"]), str(r["batch"])]
            for k in ("chunked", "fla", "sdpa"):
                cells.append(_ms(r[k]["fwd_bwd_s"]) if r[k]["status"] == "ok" else r[k]["status"])
            cells += [_fmt(r.get("chunked_over_sdpa"), "{:.2f}x"), _fmt(r.get("fla_over_sdpa"), "{:.2f}x")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    for key, title in (("backends_demo", "Training step per backend: the digits demo config"),
                       ("backends_text", "Training step per backend: the text demo config"),
                       ("backends", "Training step per backend")):
        be = results.get(key)
        if not be:
            continue
        c = be["config"]
        patch = c.get("patch_size") or 2
        lines += [f"## {title}", "",
                  f"Config: {c['model']}, {c['input_size']}x{c['input_size']}x{c['in_channels']} inputs "
                  f"({(c['input_size'] // patch) ** 2} tokens of {patch}x{patch}), depth {c['depth']}, batch {c['batch']}, "
                  + (f"captions of {c['text_max_tokens']} ids through {c['text_depth']} text blocks"
                     if c.get("condition") == "text" else f"{c['num_classes']} classes")
                  + f"; {c['repeats']} timed steps after {c['warmup']} warm-up per round, "
                  f"{be.get('rounds', 1)} round(s). {be['step']}.", "",
                  "| backend | status | ms/step (median) | min..max ms | ratio to PyTorch |", "|---|---|---|---|---|"]
        for r in be["rows"]:
            status = r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
            mode = (r.get("result") or {}).get("mindspore_mode")
            name = r["backend"] + (f" ({mode} mode)" if isinstance(mode, str) else "")
            spread = r.get("spread") or (r.get("result") or {}).get("spread")
            span = f"{_ms(spread['min_s'])}..{_ms(spread['max_s'])}" if spread else "-"
            lines.append(f"| {name} | {status} | {_ms(r.get('step_s'))} | {span} | "
                         f"{_fmt(r.get('ratio_to_torch'), '{:.2f}x')} |")
        lines.append("")
    notes = results.get("notes")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------
def plot_wkv(wkv: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = wkv["rows"]
    t = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, label, style in (("reference_fwd_bwd_s", "reference fwd+bwd", "o--"),
                              ("reference_fwd_s", "reference fwd", "o:"),
                              ("chunked_fwd_bwd_s", "chunked fwd+bwd", "s-"),
                              ("chunked_fwd_s", "chunked fwd", "s-"),
                              ("matmul_s", "bmm of the chunked fwd's FLOPs", "^-.")):
        ax.loglog(t, [r[key] for r in rows], style, label=label)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("seconds (median)")
    c = wkv["config"]
    ax.set_title(f"WKV6 B={c['B']} H={c['H']} K={c['K']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_scaling(scaling: dict, path_time: Path, path_mem: Path) -> None:
    import matplotlib.pyplot as plt

    s = scaling["summary"]
    for path, key, ylabel in ((path_time, "per_image_s", "forward+backward seconds per image"),
                              (path_mem, "step_peak_mb", "peak memory of the step, MB")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for model, label in MODEL_LABELS.items():
            pts = [(r["tokens"], r[key]) for r in scaling["rows"] if r["model"] == model and r.get("status") == "ok"
                   and r.get(key)]
            if not pts:
                continue
            name = label
            if key == "per_image_s" and s["slopes"].get(model) is not None:
                name += f" (slope {s['slopes'][model]:.2f}; last two {s['slopes_last_two'][model]:.2f})"
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            failed = [r["tokens"] for r in scaling["rows"] if r["model"] == model and r.get("status") != "ok"]
            for tok in failed:
                ax.axvline(tok, color="grey", alpha=0.3)
        if key == "per_image_s":  # guides: linear and quadratic growth from the smallest DiT point
            base = [(r["tokens"], r[key]) for r in scaling["rows"] if r.get("status") == "ok" and r.get(key)]
            if base:
                t0, y0 = min(base)
                xs = sorted({r["tokens"] for r in scaling["rows"]})
                for power, style in ((1, ":"), (2, "--")):
                    ax.loglog(xs, [y0 * (x / t0) ** power for x in xs], style, color="grey", alpha=0.5,
                              label=f"slope {power} guide")
        c = scaling["config"]
        ax.set_xlabel("tokens per image")
        ax.set_ylabel(ylabel)
        ax.set_title(f"DiR vs DiT, width {c['width']}, depth {c['depth']}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        _save_figure(fig, path)
        plt.close(fig)


def _save_figure(fig, path: Path) -> None:
    """A PNG written to a temp name and renamed (``common.atomic``): never a torn file."""
    from common.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _write_text(path: Path, text: str) -> None:
    from common.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_all(results: dict, out_dir: Path, stem: str | None = None) -> dict:
    """Write <date>-<host>.json/.md and the PNGs into ``out_dir`` (named ``stem``.* instead when
    given); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", results["machine"]["host"])
    stem = stem or f"{results['date']}-{host}" + (f"-{results['mode']}" if results["mode"] not in ("quick",) else "")
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    plot_names = {}
    if results.get("wkv", {}).get("rows"):
        paths["wkv"] = out_dir / f"{stem}-wkv.png"
        plot_wkv(results["wkv"], paths["wkv"])
    if results.get("scaling", {}).get("rows"):
        paths["scaling_time"] = out_dir / f"{stem}-scaling-time.png"
        paths["scaling_memory"] = out_dir / f"{stem}-scaling-memory.png"
        plot_scaling(results["scaling"], paths["scaling_time"], paths["scaling_memory"])
    for key in ("wkv", "scaling_time", "scaling_memory"):
        if key in paths:
            plot_names[key] = paths[key].name
    results["files"] = {k: p.name for k, p in paths.items()}
    _write_text(paths["json"], json.dumps(results, indent=1, default=str) + "\n")
    _write_text(paths["markdown"], markdown(results, plot_names))
    return paths


if __name__ == "__main__":  # python -m bench.report RESULTS.json: re-render its Markdown and plots, under its name
    import sys

    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    data["targets"] = evaluate_targets(data) if data.get("mode") != "smoke" else []
    for name, path in write_all(data, source.parent, source.stem).items():
        print(name, path)
