"""REAP saliency, the budget allocator (against brute force) and budget mode end to end."""
import numpy as np
import pytest
import torch

from moei2.models import get_adapter

from .tiny_models import build_model


def _silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("family", ["deepseek_v2", "mixtral"])
def test_reap_saliency_matches_numpy(family):
    """REAP's S_j = mean over routed tokens of softmax_j(logits) * ||expert_j(x)||_2, computed
    directly in float64 NumPy from the weights, every expert on every token."""
    from moei2.calibrate import iter_layer_stats
    from moei2.stages.selection import reap_saliency

    model = build_model(family, layers=2)
    adapter = get_adapter(model)
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    stats = next(iter(iter_layer_stats(model, ids, batch_size=2, progress=False)))
    view = adapter.view(stats.layer_index)
    got = reap_saliency(stats, view)

    X = stats.X.double().numpy()
    logits = X @ view.router_weight.double().numpy().T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :view.top_k]
    gate_up = view.gate_up_proj.double().numpy()
    down = view.down_proj.double().numpy()
    inter = view.intermediate_size
    expected = np.zeros(view.num_experts)
    for j in range(view.num_experts):
        routed = (top == j).any(axis=1)
        if not routed.any():
            continue
        h = X[routed] @ gate_up[j].T
        out = (_silu(h[:, :inter]) * h[:, inter:]) @ down[j].T
        expected[j] = np.mean(p[routed, j] * np.linalg.norm(out, axis=1))
    assert (expected > 0).sum() >= view.num_experts - 1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)
