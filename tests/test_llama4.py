"""Llama 4's text model: top-1 by logit, the expert's input scaled by sigmoid(logit), a shared
expert; the routing rule against the transformers block, the search's loss against the pruned
layer, compression with pruning and low rank through save and load, and the streamed run."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moei2.models import get_adapter, lowrank_experts  # noqa: E402
from moei2.models.llama4 import StackedLowRankExperts  # noqa: E402
from moei2.search import Layer  # noqa: E402

from .moe_reference import silu  # noqa: E402
from .test_models import svd_factors  # noqa: E402
from .test_scored_families import (captured_inputs, check_compressed_save_load,  # noqa: E402
                                   check_pruned_block_is_the_block_with_dropped_logits,
                                   check_streamed_run_equals_the_in_memory_run, pruned_view)
from .tiny_models import EXPERTS, HIDDEN, LLAMA4, build_model, input_ids  # noqa: E402


def routed(view, x):
    """The routed part of the transformers block on rows ``x`` [T, H], formed as its forward does
    (router, score-scaled stacked inputs, experts, sum over experts); the shared expert excluded."""
    with torch.no_grad():
        scores, _ = view.router(x)
        stacked = x.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
        return view.experts_module(stacked).reshape(scores.shape[1], -1, x.shape[-1]).sum(dim=0)


def reference(view, x, dropped=()):
    """float64 NumPy: each token's best surviving expert j by logit, down(silu(gate s x) * up s x)
    with s = sigmoid(z_j)."""
    x = x.double().numpy()
    z = x @ view.router_weight.double().numpy().T
    z[:, list(dropped)] = -np.inf
    out = np.zeros_like(x)
    for t, j in enumerate(np.argmax(z, axis=1)):
        gate, up, down = (w.double().numpy() for w in view.expert(int(j)))
        s = 1.0 / (1.0 + np.exp(-z[t, j]))
        out[t] = down @ (silu(gate @ (s * x[t])) * (up @ (s * x[t])))
    return out


def rows(n=48, seed=3):
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_adapter_view_and_rule_match_the_block():
    adapter = get_adapter(build_model(LLAMA4))
    assert adapter.family == LLAMA4 and adapter.dense_layers == [0]
    x = rows()
    for view in adapter.moe_layers():
        assert (view.num_experts, view.top_k, view.intermediate_size) == (EXPERTS, 1, 16)
        assert view.rule.weights == "unit" and not view.rule.renormalize and view.rule.scaling_factor == 1.0
        assert view.shared_experts is not None and view.shared_expert_gate is None
        assert view.gate_up_proj is None and view.down_proj is None
        gate, up, down = view.expert(5)
        assert tuple(gate.shape) == tuple(up.shape) == (16, HIDDEN) and tuple(down.shape) == (HIDDEN, 16)
        np.testing.assert_allclose(routed(view, x).double().numpy(), reference(view, x), rtol=1e-4, atol=1e-5)
        drop = [1, 4, 6]
        np.testing.assert_allclose(routed(pruned_view(adapter, view, drop), x).double().numpy(),
                                   reference(view, x, drop), rtol=1e-4, atol=1e-5)
        # expert_output is the expert on the score-scaled input, the rule's weight 1
        j = 3
        with torch.no_grad():
            got = view.expert_output(j, x).double().numpy()
        z = x.double().numpy() @ view.router_weight.double().numpy().T
        s = 1.0 / (1.0 + np.exp(-z[:, j:j + 1]))
        g, u, d = (w.double().numpy() for w in view.expert(j))
        xs = s * x.double().numpy()
        np.testing.assert_allclose(got, (silu(xs @ g.T) * (xs @ u.T)) @ d.T, rtol=1e-4, atol=1e-5)


def test_pruned_block_equals_the_block_with_dropped_logits_at_minus_infinity(monkeypatch):
    check_pruned_block_is_the_block_with_dropped_logits(build_model(LLAMA4), monkeypatch, output=lambda out: out[0])


def test_search_loss_is_the_error_of_the_pruned_layer():
    from moei2.stages.selection import candidate_outputs, router_logits_float64

    model = build_model(LLAMA4)
    adapter = get_adapter(model)
    inputs = captured_inputs(model, adapter, input_ids(3, 16))
    batches = [16, 32]
    for view in adapter.moe_layers():
        X = inputs[view.layer_index]
        layer = Layer.from_candidate_outputs(router_logits_float64(view, X), candidate_outputs(view, X),
                                             rule=view.rule, r_max=4, batch_sizes=batches)
        assert layer.num_candidates == 5
        y = routed(view, X)
        for drop in ([0], [2, 5], [1, 4, 6], [1, 3, 6, 7]):
            ys = routed(pruned_view(adapter, view, drop), X)
            expected = sum(torch.linalg.vector_norm((y[a:b] - ys[a:b]).double()).item() for a, b in ((0, 16), (16, 48)))
            assert expected > 0
            assert layer.loss(np.isin(np.arange(EXPERTS), drop))[0] == pytest.approx(expected, rel=2e-5)


def test_masked_routing_is_the_pruned_layer():
    from moei2.stages import masked_routing

    model = build_model(LLAMA4)
    adapter = get_adapter(model)
    x = torch.randn(3, 10, HIDDEN, generator=torch.Generator().manual_seed(2))
    for view, drop in zip(adapter.moe_layers(), ([1, 4, 6], [7])):
        mask = np.isin(np.arange(EXPERTS), drop)
        with torch.no_grad():
            with masked_routing(view, mask):
                masked = view.moe_module(x)[0]
            expected = pruned_view(adapter, view, drop).moe_module(x)[0]
            unmasked = view.moe_module(x)[0]
        torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(unmasked, expected)


def test_full_rank_factors_reproduce_the_model():
    model = build_model(LLAMA4)
    ids = input_ids(2, 10)
    with torch.no_grad():
        before = model(ids).logits
    adapter = get_adapter(model)
    factors = {view.layer_index: {j: dict(zip(("gate", "up", "down"),
                                              (svd_factors(w, min(w.shape)) for w in view.expert(j))))
                                  for j in range(view.num_experts)}
               for view in adapter.moe_layers()}
    lowrank_experts(model, factors)
    assert all(isinstance(v.experts_module, StackedLowRankExperts) for v in adapter.moe_layers())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_compressed_save_load_gives_the_in_memory_logits(tmp_path):
    views, _ = check_compressed_save_load(build_model(LLAMA4), tmp_path)
    assert all(isinstance(v.experts_module, StackedLowRankExperts) for v in views)


def test_streamed_run_equals_the_in_memory_run(tmp_path):
    check_streamed_run_equals_the_in_memory_run(lambda **kw: build_model(LLAMA4, **kw), tmp_path)
