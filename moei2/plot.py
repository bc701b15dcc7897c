"""Figures of a compression report (needs the ``plot`` extra: matplotlib).

Every function takes the report dict that :func:`moei2.compress` returns (also stored in a saved
checkpoint as ``report.json``) and returns a matplotlib Figure; :func:`render_report` writes
all of them as PNG files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io import REPORT_NAME as REPORT_FILE  # io imports torch lazily, so plots stay light


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("moei2 plots need matplotlib: pip install 'moei2[plot]'") from exc
    return plt


def load_report(source) -> dict:
    """A report from a dict, a report JSON file, or a checkpoint directory holding one."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / REPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no compression report at {path}")
    return json.loads(path.read_text())


def _layers(report):
    return sorted(report["layers"], key=int)


def importance_and_kept(report):
    """Per-layer expert importance (heatmap, dropped experts marked) and experts kept per layer."""
    plt = _plt()
    layers = _layers(report)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    rows = [report["layers"][l].get("importance") for l in layers]
    if all(r is not None for r in rows):
        width = max(len(r) for r in rows)
        grid = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            grid[i, : len(r)] = r
        im = ax0.imshow(np.log10(grid + 1e-12), aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax0, label="log10 removal loss")
        for i, l in enumerate(layers):
            for j in report["layers"][l].get("dropped", []):
                ax0.plot(j, i, "rx", ms=4)
        ax0.set_yticks(range(len(layers)), layers)
        ax0.set_xlabel("expert")
        ax0.set_ylabel("layer")
        ax0.set_title("expert importance (x = dropped)")
    else:
        ax0.set_axis_off()
        ax0.set_title("no importance recorded (pruning disabled)")
    kept = [len(report["layers"][l].get("kept", [])) for l in layers]
    ax1.barh(range(len(layers)), kept, color="tab:blue")
    ax1.set_yticks(range(len(layers)), layers)
    ax1.invert_yaxis()
    ax1.set_xlabel("experts kept")
    ax1.set_title("experts kept per layer")
    fig.tight_layout()
    return fig


def search_convergence(report):
    """Best and mean loss per generation of the genetic search, one line pair per layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    layers = [l for l in _layers(report) if report["layers"][l].get("search", {}).get("history", {}).get("best")]
    for i, l in enumerate(layers):
        h = report["layers"][l]["search"]["history"]
        best = np.asarray(h["best"], dtype=float)
        color = cmap(i / max(1, len(layers) - 1))
        ax.plot(best / best[0], color=color, label=f"layer {l}")
        if h.get("mean"):
            ax.plot(np.asarray(h["mean"], dtype=float) / best[0], color=color, ls=":", alpha=0.6)
    ax.set_xlabel("generation")
    ax.set_ylabel("loss / first generation's best")
    ax.set_title("genetic search: best (solid) and population mean (dotted)")
    if layers:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def kt_choice(report):
    """Block loss of the KT choice against the combination of each layer's own best mask."""
    plt = _plt()
    blocks = [b for b in report.get("blocks", []) if b.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(blocks))
    ax.bar(x - 0.2, [b["per_layer_best_loss"] for b in blocks], 0.4, label="per-layer best")
    ax.bar(x + 0.2, [b["loss"] for b in blocks], 0.4, label="KT choice")
    ax.set_xticks(x, ["-".join(map(str, b["layers"])) for b in blocks])
    ax.set_xlabel("block (layers)")
    ax.set_ylabel("block output reconstruction loss")
    ax.set_title("block-wise KT-reception field")
    ax.legend()
    fig.tight_layout()
    return fig


def rank_heatmap(report):
    """Rank of every surviving expert (layer x expert)."""
    plt = _plt()
    layers = [l for l in _layers(report) if report["layers"][l].get("lowrank")]
    fig, ax = plt.subplots(figsize=(9, 4))
    if layers:
        width = max(len(report["layers"][l]["lowrank"]["ranks"]) for l in layers)
        grid = np.full((len(layers), width), np.nan)
        for i, l in enumerate(layers):
            r = report["layers"][l]["lowrank"]["ranks"]
            grid[i, : len(r)] = r
        im = ax.imshow(grid, aspect="auto", cmap="magma")
        fig.colorbar(im, ax=ax, label="rank")
        ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("surviving expert")
    ax.set_ylabel("layer")
    ax.set_title("rank allocation")
    fig.tight_layout()
    return fig


def spectra(report):
    """Normalised singular values of a few experts: plain weight against data-whitened."""
    plt = _plt()
    items = report.get("spectra", [])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, item in enumerate(items):
        plain = np.asarray(item["plain"], dtype=float)
        white = np.asarray(item["whitened"], dtype=float)
        line, = ax.semilogy(plain / plain[0], label=f"L{item['layer']} E{item['expert']} {item['matrix']} plain")
        if white.size and white[0] > 0:
            ax.semilogy(white / white[0], color=line.get_color(), ls="--", label="  whitened")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title("spectra: plain (solid) vs whitened (dashed)")
    if items:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def tradeoff(points):
    """Loss or perplexity against compression level. points: dicts with 'removed' (fraction of
    expert parameters removed), 'perplexity' and an optional 'method' label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict = {}
    for p in points:
        by_method.setdefault(p.get("method", "moei2"), []).append((p["removed"], p["perplexity"]))
    for method, pts in by_method.items():
        pts.sort()
        ax.plot([100 * a for a, _ in pts], [b for _, b in pts], "o-", label=method)
    ax.set_xlabel("expert parameters removed (%)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("compression trade-off")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


FIGURES = {
    "importance": importance_and_kept,
    "search_convergence": search_convergence,
    "kt_choice": kt_choice,
    "ranks": rank_heatmap,
    "spectra": spectra,
}


def render_report(source, output_dir=None, tradeoff_points=None) -> list[Path]:
    """Writes every figure of a report as PNG; returns the paths."""
    plt = _plt()
    report = load_report(source)
    if output_dir is None:
        if isinstance(source, dict):
            raise ValueError("output_dir is required when the report is given as a dict")
        base = Path(source)
        output_dir = (base if base.is_dir() else base.parent) / "figures"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    points = tradeoff_points if tradeoff_points is not None else report.get("tradeoff")
    figures = dict(FIGURES)
    if points:
        figures["tradeoff"] = lambda _r: tradeoff(points)
    for name, make in figures.items():
        fig = make(report)
        path = output_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
