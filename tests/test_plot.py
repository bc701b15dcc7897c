import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from moei2 import plot  # noqa: E402


def synthetic_report(num_layers=3, num_experts=8, seed=0):
    """A report with the structure moei2.compress returns, filled with plausible numbers."""
    rng = np.random.default_rng(seed)
    layers = {}
    for l in range(num_layers):
        importance = rng.gamma(2.0, 1.0, num_experts)
        dropped = sorted(rng.choice(num_experts, size=2, replace=False).tolist())
        kept = [j for j in range(num_experts) if j not in dropped]
        best = np.sort(rng.uniform(1, 2, 20))[::-1]
        layers[str(l)] = {
            "importance": importance.tolist(), "layer_importance": float(importance.sum()), "prune_count": 2,
            "search": {"candidates": [], "candidate_losses": [1.0, 1.1, 1.2],
                       "history": {"best": best.tolist(), "mean": (best * 1.3).tolist()},
                       "evaluations": 500, "chosen_candidate": 0},
            "dropped": dropped, "kept": kept,
            "lowrank": {"ranks": rng.integers(4, 12, len(kept)).tolist()},
        }
    spectrum = np.sort(rng.uniform(0.01, 3.0, 16))[::-1]
    return {
        "seed": 42, "layers": layers,
        "blocks": [{"layers": [0, 1, 2], "choice": [1, 0, 0], "loss": 2.0, "per_layer_best_loss": 2.3}],
        "spectra": [{"layer": 0, "expert": 0, "matrix": "gate", "plain": spectrum.tolist(),
                     "whitened": (spectrum ** 2).tolist()}],
    }


POINTS = [{"removed": 0.25, "perplexity": 30.0}, {"removed": 0.5, "perplexity": 40.0},
          {"removed": 0.5, "perplexity": 55.0, "method": "plain SVD"}]
# Figure sizes in inches (moei2.plot) at the dpi render_report writes with.
SIZES = {"importance": (12, 4), "search_convergence": (7, 4), "kt_choice": (7, 4), "ranks": (9, 4),
         "spectra": (7, 4), "tradeoff": (6, 4)}


def test_render_report_writes_every_figure(tmp_path):
    import matplotlib.image

    report = synthetic_report()
    (tmp_path / plot.REPORT_FILE).write_text(json.dumps(report))
    paths = plot.render_report(tmp_path, tradeoff_points=POINTS)
    assert sorted(p.name for p in paths) == sorted(f"{n}.png" for n in SIZES)
    for p in paths:
        assert p.parent == tmp_path / "figures"
        image = matplotlib.image.imread(p)
        width, height = SIZES[p.stem]
        assert image.shape[:2] == (height * 110, width * 110), p.name
        # Something was drawn: many distinct colours, not a blank canvas.
        assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 50, p.name


def test_importance_figure_shows_the_report():
    report = synthetic_report()
    fig = plot.importance_and_kept(report)
    heat, bars = fig.axes[:2]
    grid = np.array([report["layers"][str(l)]["importance"] for l in range(3)])
    np.testing.assert_allclose(heat.images[0].get_array(), np.log10(grid + 1e-12))
    marks = sorted((int(line.get_xdata()[0]), int(line.get_ydata()[0])) for line in heat.lines)
    assert marks == sorted((j, l) for l in range(3) for j in report["layers"][str(l)]["dropped"])
    assert [patch.get_width() for patch in bars.patches] == [6, 6, 6]


def test_search_and_kt_figures_show_the_report():
    report = synthetic_report()
    fig = plot.search_convergence(report)
    lines = fig.axes[0].lines
    assert len(lines) == 2 * 3  # best and mean per layer
    best = np.asarray(report["layers"]["0"]["search"]["history"]["best"])
    np.testing.assert_allclose(lines[0].get_ydata(), best / best[0])
    np.testing.assert_allclose(lines[1].get_ydata(), 1.3 * best / best[0])
    heights = [patch.get_height() for patch in plot.kt_choice(report).axes[0].patches]
    assert heights == [2.3, 2.0]  # per-layer best, then the KT choice


def test_rank_spectra_and_tradeoff_figures_show_the_report():
    report = synthetic_report()
    grid = plot.rank_heatmap(report).axes[0].images[0].get_array()
    assert grid.tolist() == [report["layers"][str(l)]["lowrank"]["ranks"] for l in range(3)]
    plain, whitened = plot.spectra(report).axes[0].lines
    spectrum = np.asarray(report["spectra"][0]["plain"])
    np.testing.assert_allclose(plain.get_ydata(), spectrum / spectrum[0])
    np.testing.assert_allclose(whitened.get_ydata(), spectrum ** 2 / spectrum[0] ** 2)
    lines = plot.tradeoff(POINTS).axes[0].lines
    assert [line.get_label() for line in lines] == ["moei2", "plain SVD"]
    assert lines[0].get_xdata().tolist() == [25.0, 50.0] and lines[0].get_ydata().tolist() == [30.0, 40.0]


def test_render_report_without_pruning_or_lowrank(tmp_path):
    report = {"seed": 0, "layers": {"0": {"dropped": [], "kept": list(range(4))}}}
    paths = plot.render_report(report, tmp_path)
    assert sorted(p.stem for p in paths) == sorted(set(SIZES) - {"tradeoff"})
    heat, bars = plot.importance_and_kept(report).axes[:2]
    assert heat.get_title() == "no importance recorded (pruning disabled)"
    assert [patch.get_width() for patch in bars.patches] == [4]
    assert not plot.rank_heatmap(report).axes[0].images
    assert not plot.kt_choice(report).axes[0].patches


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compression report"):
        plot.load_report(tmp_path)
    with pytest.raises(ValueError, match="output_dir"):
        plot.render_report(synthetic_report())
