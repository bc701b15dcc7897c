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


def test_render_report_writes_every_figure(tmp_path):
    report = synthetic_report()
    (tmp_path / plot.REPORT_FILE).write_text(json.dumps(report))
    points = [{"removed": 0.25, "perplexity": 30.0}, {"removed": 0.5, "perplexity": 40.0},
              {"removed": 0.5, "perplexity": 55.0, "method": "plain SVD"}]
    paths = plot.render_report(tmp_path, tradeoff_points=points)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{n}.png" for n in ["importance", "search_convergence", "kt_choice", "ranks",
                                               "spectra", "tradeoff"])
    for p in paths:
        assert p.parent == tmp_path / "figures"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5000


def test_render_report_without_pruning_or_lowrank(tmp_path):
    report = {"seed": 0, "layers": {"0": {"dropped": [], "kept": list(range(4))}}}
    paths = plot.render_report(report, tmp_path)
    assert len(paths) == 5


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compression report"):
        plot.load_report(tmp_path)
    with pytest.raises(ValueError, match="output_dir"):
        plot.render_report(synthetic_report())
