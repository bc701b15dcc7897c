"""Streamed calibration statistics against a direct computation on the whole, unmodified model."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moei2.calibrate import iter_layer_stats  # noqa: E402
from moei2.models import get_adapter, prune_experts  # noqa: E402

from .moe_reference import dense_experts, routed_output, rule_extras, silu  # noqa: E402
from .tiny_models import EXPERTS, FAMILIES, HIDDEN, build_model, input_ids  # noqa: E402


def direct_moe_inputs(model, ids):
    """Per MoE layer, the MoE block's input in one full forward pass; and every layer's input."""
    adapter = get_adapter(model)
    captured, handles = {}, []
    for view in adapter.moe_layers():
        def hook(module, args, index=view.layer_index):
            captured[index] = args[0].reshape(-1, args[0].shape[-1]).clone()
        handles.append(view.moe_module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return captured, out.hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_match_direct_computation(family):
    model = build_model(family)
    ids = input_ids(5, 9)
    X_direct, hidden_states = direct_moe_inputs(model, ids)
    adapter = get_adapter(model)
    views = {v.layer_index: v for v in adapter.moe_layers()}
    seen = []
    for stats in iter_layer_stats(model, ids, grams="all", batch_size=2, progress=False):
        view = views[stats.layer_index]
        seen.append(stats.layer_index)
        torch.testing.assert_close(stats.X, X_direct[stats.layer_index], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.hidden_in, hidden_states[stats.layer_index], rtol=1e-5, atol=1e-5)
        X = stats.X.double().numpy()
        W = view.router_weight.double().numpy()
        extras = rule_extras(view)
        logits = X @ W.T + (0.0 if extras["router_bias"] is None else extras["router_bias"])
        np.testing.assert_allclose(stats.router_logits.double().numpy(), logits, rtol=1e-4, atol=1e-5)
        experts = dense_experts(view)
        expected_Y = routed_output(X, W, experts, view.top_k, view.renormalize, view.scaling_factor, **extras)
        np.testing.assert_allclose(stats.Y.double().numpy(), expected_Y, rtol=1e-4, atol=1e-5)
        # Grams over the tokens the router sends to each expert (its top-k by logit).
        top = np.argsort(-logits, axis=1, kind="stable")[:, :view.top_k]
        assert stats.gram_in.dtype == torch.float64 and stats.gram_down.dtype == torch.float64
        assert tuple(stats.gram_in.shape) == (EXPERTS, HIDDEN, HIDDEN)
        inter = view.intermediate_size
        assert tuple(stats.gram_down.shape) == (EXPERTS, inter, inter)
        for j in range(EXPERTS):
            routed = (top == j).any(axis=1)
            assert int(stats.token_counts[j]) == routed.sum()
            xj = X[routed]
            gate, up, _, biases = experts[j]
            if biases is None:
                hj = silu(xj @ gate.T) * (xj @ up.T)
            else:
                hj = extras["glu"](xj @ gate.T + biases[0], xj @ up.T + biases[1])
            np.testing.assert_allclose(stats.gram_in[j].numpy(), xj.T @ xj, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stats.gram_down[j].numpy(), hj.T @ hj, rtol=1e-4, atol=1e-6)
        assert int(stats.token_counts.sum()) == ids.numel() * view.top_k
    assert seen == sorted(views)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_grams_one_expert_at_a_time_equal_the_layer_grams(family):
    """The decomposition's per-expert Grams (computed again from X when needed) are the very values
    the capture accumulates for the whole layer: same additions, same order."""
    from moei2.calibrate import ExpertGrams

    model = build_model(family)
    ids = input_ids(5, 9)
    views = {v.layer_index: v for v in get_adapter(model).moe_layers()}
    batch_size, seq_len = 2, ids.shape[1]
    rows = [slice(s * seq_len, min(s + batch_size, ids.shape[0]) * seq_len) for s in range(0, ids.shape[0], batch_size)]
    for stats in iter_layer_stats(model, ids, grams="all", batch_size=batch_size, progress=False):
        grams = ExpertGrams(views[stats.layer_index], stats.X, stats.top_k_index, rows)
        for j in range(EXPERTS):
            gram_in, gram_down = grams(j)
            assert torch.equal(gram_in, stats.gram_in[j]) and torch.equal(gram_down, stats.gram_down[j])
        with pytest.raises(IndexError, match=f"expert {EXPERTS} out of range"):
            grams(EXPERTS)


def test_grams_only_for_requested_layers_and_no_propagation_mode():
    model = build_model("qwen2_moe")
    ids = input_ids(3, 7)
    first = list(iter_layer_stats(model, ids, grams={1}, progress=False))
    assert [s.gram_in is not None for s in first] == [False, True, False]
    second = list(iter_layer_stats(model, ids, propagate=False, batch_size=1, progress=False))
    for a, b in zip(first, second):
        torch.testing.assert_close(a.X, b.X, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.Y, b.Y, rtol=1e-5, atol=1e-5)


def test_changes_made_while_streaming_reach_later_layers():
    model = build_model("mixtral")
    ids = input_ids(3, 7)
    reference = build_model("mixtral")
    prune_experts(reference, {0: [2, 5]})
    X_pruned, _ = direct_moe_inputs(reference, ids)
    for stats in iter_layer_stats(model, ids, progress=False):
        if stats.layer_index == 0:
            prune_experts(model, {0: [2, 5]})
        else:
            torch.testing.assert_close(stats.X, X_pruned[stats.layer_index], rtol=1e-5, atol=1e-5)


def test_progress_bar_and_training_mode_restored(capsys):
    model = build_model("olmoe").train()
    stats = list(iter_layer_stats(model, input_ids(2, 5), progress=True, desc="tiny"))
    assert len(stats) == 3 and model.training
    assert "tiny" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, error, message", [
    ({"grams": "some"}, ValueError, "grams must be None, 'all' or a set"),
    ({"grams": {0}}, ValueError, "layer 0 is not an MoE layer"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
    ({"device": "nonsense"}, ValueError, "device"),
])
def test_bad_arguments(kwargs, error, message):
    model = build_model("deepseek_v2")
    with pytest.raises(error, match=message):
        iter_layer_stats(model, input_ids(2, 5), **kwargs)


@pytest.mark.parametrize("ids, error, message", [
    ([[1, 2]], TypeError, "torch.LongTensor"),
    (torch.ones(2, 3), TypeError, "dtype torch.long"),
    (torch.ones(3, dtype=torch.long), ValueError, "shape"),
    (torch.full((1, 3), 500), ValueError, r"vocabulary"),
])
def test_bad_input_ids(ids, error, message):
    with pytest.raises(error, match=message):
        iter_layer_stats(build_model("mixtral"), ids)
