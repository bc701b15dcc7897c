"""Adapters, expert pruning and low-rank experts on tiny models of every supported family."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moei2.models import get_adapter, lowrank_experts, prune_experts  # noqa: E402
from moei2.modules import LowRankExperts  # noqa: E402

from .moe_reference import dense_experts, routed_output, rule_extras  # noqa: E402
from .tiny_models import EXPERTS, FAMILIES, HIDDEN, TOP_K, build_model, input_ids  # noqa: E402

FACTS = {  # family: (dense layers of a 3-layer model, renormalize, scaling, shared experts, shared gate, width)
    "qwen2_moe": ([], False, 1.0, True, True, 16),
    "deepseek_v2": ([0], False, 1.5, True, False, 16),
    "mixtral": ([], True, 1.0, False, False, 16),
    "olmoe": ([], False, 1.0, False, False, 16),
    "qwen3_moe": ([], True, 1.0, False, False, 16),
    # softmax-then-top-k families
    "qwen3_next": ([], True, 1.0, True, True, 16),
    "qwen3_5_moe_text": ([], True, 1.0, True, True, 16),
    "granitemoe": ([], True, 1.0, False, False, 16),
    "hunyuan_v1_moe": ([], True, 1.0, True, False, 16),
    "gpt_oss": ([], True, 1.0, False, False, 16),
}



def block_routed(view, x):
    """The routed-experts output of the layer's own modules for rows ``x`` [T, H]."""
    with torch.no_grad():
        _, weights, index = view.router(x)
        return view.experts_module(x, index, weights)


def rows(n=40, seed=3):
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_view_matches_modules_and_routing_rule(family):
    model = build_model(family)
    adapter = get_adapter(model)
    dense, renorm, scale, has_shared, has_gate, inter = FACTS[family]
    assert adapter.family == family
    assert adapter.num_hidden_layers == 3
    assert isinstance(adapter.decoder_layers, torch.nn.ModuleList)
    assert adapter.dense_layers == dense
    views = adapter.moe_layers()
    assert [v.layer_index for v in views] == [i for i in range(3) if i not in dense]
    x = rows()
    for view in views:
        assert (view.num_experts, view.top_k, view.hidden_size, view.intermediate_size) == (EXPERTS, TOP_K, HIDDEN, inter)
        assert view.renormalize is renorm and view.scaling_factor == scale and view.act == "silu"
        assert (view.shared_experts is not None) == has_shared
        assert (view.shared_expert_gate is not None) == has_gate
        assert view.moe_module is getattr(adapter.decoder_layers[view.layer_index], adapter.moe_attr)
        assert tuple(view.router_weight.shape) == (EXPERTS, HIDDEN)
        gate, up, down = view.expert(5)
        assert tuple(gate.shape) == tuple(up.shape) == (inter, HIDDEN) and tuple(down.shape) == (HIDDEN, inter)
        if adapter.standard_experts:
            assert tuple(view.gate_up_proj.shape) == (EXPERTS, 2 * inter, HIDDEN)
            assert tuple(view.down_proj.shape) == (EXPERTS, HIDDEN, inter)
            assert torch.equal(gate, view.gate_up_proj[5, :inter]) and torch.equal(up, view.gate_up_proj[5, inter:])
            assert torch.equal(down, view.down_proj[5])
        else:
            assert view.gate_up_proj is None and view.down_proj is None
        # The adapter's statement of the routing rule reproduces the HF modules.
        expected = routed_output(x.double().numpy(), view.router_weight.double().numpy(), dense_experts(view),
                                 view.top_k, view.renormalize, view.scaling_factor, **rule_extras(view))
        np.testing.assert_allclose(block_routed(view, x).double().numpy(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        views[0].expert(EXPERTS)


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match="unsupported architecture Linear; supported: .*MixtralForCausalLM"):
        get_adapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_top_k_contradicting_the_experts_is_refused(family):
    model = build_model(family)
    adapter = get_adapter(model)
    adapter.view(adapter.moe_layer_indices[0]).router.top_k = EXPERTS + 1
    with pytest.raises(ValueError, match=f"top_k={EXPERTS + 1} experts but its router has {EXPERTS}"):
        get_adapter(model)


def test_group_limited_routing_is_refused():
    with pytest.raises(ValueError, match="group_limited_greedy"):
        get_adapter(build_model("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_routing_equals_rule_on_unpruned_weights(family):
    model = build_model(family)
    adapter = get_adapter(model)
    views = adapter.moe_layers()
    originals = {v.layer_index: (v.router_weight.double().numpy().copy(), dense_experts(v), rule_extras(v))
                 for v in views}
    shared_before = {v.layer_index: copy.deepcopy(v.shared_experts) for v in views}
    drops = {views[0].layer_index: [1, 4, 6], views[-1].layer_index: [7]}
    ids = input_ids(2, 8)
    assert prune_experts(model, drops) is model
    x = rows()
    for view in adapter.moe_layers():
        drop = drops.get(view.layer_index, [])
        assert view.num_experts == EXPERTS - len(drop)
        router_weight, experts, extras = originals[view.layer_index]
        expected = routed_output(x.double().numpy(), router_weight, experts, view.top_k, view.renormalize,
                                 view.scaling_factor, dropped=drop, **extras)
        np.testing.assert_allclose(block_routed(view, x).double().numpy(), expected, rtol=1e-4, atol=1e-5)
        kept = [j for j in range(EXPERTS) if j not in drop]
        assert np.array_equal(view.router_weight.double().numpy(), router_weight[kept])
        if view.shared_experts is not None:
            for a, b in zip(view.shared_experts.parameters(), shared_before[view.layer_index].parameters()):
                assert torch.equal(a, b)
    record = model.config.moei2["layers"]
    assert record[str(views[0].layer_index)]["kept"] == [0, 2, 3, 5, 7]
    assert record[str(views[-1].layer_index)]["kept"] == list(range(7))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def block_output(block, x):
    with torch.no_grad():
        out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_block_equals_hf_block_with_dropped_experts_masked(family, monkeypatch):
    """The family's own forward is the reference: the unpruned HF block with the dropped experts'
    router logits set to -inf (wherever the router computes them, through torch's linear) gives
    what the pruned block gives, shared experts included."""
    model = build_model(family)
    adapter = get_adapter(model)
    x = rows(64)
    layer_index = adapter.moe_layer_indices[-1]
    view = adapter.view(layer_index)
    drop = [0, 3, 4, 6]
    mask = torch.zeros(EXPERTS, dtype=torch.bool)
    mask[drop] = True
    router_weight = adapter.router_linear(view.router).weight
    linear = torch.nn.functional.linear
    calls = []

    def masked_linear(input, weight, bias=None):
        out = linear(input, weight, bias)
        if weight is router_weight or (weight.shape == router_weight.shape
                                       and weight.data_ptr() == router_weight.data_ptr()):
            calls.append(1)
            out = out.masked_fill(mask.to(out.device), float("-inf"))
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", masked_linear)
    expected = block_output(view.moe_module, x)
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    assert calls, "the router's logits did not go through torch.nn.functional.linear"
    prune_experts(model, {layer_index: drop})
    torch.testing.assert_close(block_output(adapter.view(layer_index).moe_module, x), expected, rtol=1e-5, atol=1e-6)


def test_pruning_twice_composes_to_original_indices():
    model = build_model("mixtral")
    prune_experts(model, {0: [0, 3]})  # kept 1 2 4 5 6 7
    prune_experts(model, {0: [0, 2]})  # drops originals 1 and 4
    assert model.config.moei2["layers"]["0"]["kept"] == [2, 5, 6, 7]
    reference = build_model("mixtral")
    prune_experts(reference, {0: [0, 1, 3, 4]})
    x = rows()
    a = block_routed(get_adapter(model).view(0), x)
    b = block_routed(get_adapter(reference).view(0), x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("drops, message", [
    ({0: [1]}, "layer 0 is not an MoE layer"),
    ({1: [8]}, "out of range"),
    ({1: [2, 2]}, "more than once"),
    ({1: list(range(7))}, "fewer than top_k=2"),
    ({1: [1], 2: ["a"]}, "not an integer"),
    ({1: 3}, "iterable of integers"),
    ([1, 2], "must be a mapping"),
])
def test_prune_errors_leave_model_untouched(drops, message):
    model = build_model("deepseek_v2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune_experts(model, drops)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(model.config, "moei2", None) is None


def svd_factors(w, rank):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_factors_reproduce_the_model(family):
    model = build_model(family)
    ids = input_ids(2, 10)
    with torch.no_grad():
        reference = model(ids).logits
    adapter = get_adapter(model)
    factors = {}
    for view in adapter.moe_layers():
        inter = view.intermediate_size
        factors[view.layer_index] = {
            j: {name: svd_factors(w, min(w.shape)) for name, w in zip(("gate", "up", "down"), view.expert(j))}
            for j in range(view.num_experts)}
    assert lowrank_experts(model, factors) is model
    for view in adapter.moe_layers():
        assert isinstance(view.experts_module, LowRankExperts)
        assert view.ranks == [(inter, inter, inter)] * EXPERTS
        assert model.config.moei2["layers"][str(view.layer_index)]["ranks"] == [[inter] * 3] * EXPERTS
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_per_expert_ranks_follow_the_factor_products_then_prune():
    model = build_model("olmoe")
    view = get_adapter(model).view(1)
    ranks = [(1 + j % 3, 2 + j % 5, 3 + j % 7) for j in range(EXPERTS)]
    factors = {j: {name: svd_factors(w, r) for name, w, r in zip(("gate", "up", "down"), view.expert(j), ranks[j])}
               for j in range(EXPERTS)}
    lowrank_experts(model, {1: factors})
    assert view.ranks == ranks
    products = [tuple((a.double() @ b.double()).numpy() for a, b in (factors[j][n] for n in ("gate", "up", "down")))
                for j in range(EXPERTS)]
    router_weight = view.router_weight.double().numpy()
    x = rows()
    expected = routed_output(x.double().numpy(), router_weight, products, TOP_K, False, 1.0)
    np.testing.assert_allclose(block_routed(view, x).double().numpy(), expected, rtol=1e-4, atol=1e-5)
    # Pruning a low-rank layer keeps the survivors' factors and ranks.
    prune_experts(model, {1: [0, 3]})
    assert view.ranks == [r for j, r in enumerate(ranks) if j not in (0, 3)]
    assert model.config.moei2["layers"]["1"]["ranks"] == [list(r) for j, r in enumerate(ranks) if j not in (0, 3)]
    expected = routed_output(x.double().numpy(), router_weight, products, TOP_K, False, 1.0, dropped=[0, 3])
    np.testing.assert_allclose(block_routed(view, x).double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_lowrank_errors():
    model = build_model("qwen3_moe")
    view = get_adapter(model).view(0)
    good = {j: {name: svd_factors(w, 2) for name, w in zip(("gate", "up", "down"), view.expert(j))}
            for j in range(EXPERTS)}
    missing = {j: good[j] for j in range(EXPERTS - 1)}
    with pytest.raises(ValueError, match=r"experts \[7\] are missing"):
        lowrank_experts(model, {0: missing})
    bad_shape = {**good, 2: dict(good[2], up=(torch.zeros(16, 2), torch.zeros(3, HIDDEN)))}
    with pytest.raises(ValueError, match=r"factors\[0\]\[2\]\['up'\]"):
        lowrank_experts(model, {0: bad_shape})
    nan = {**good, 1: dict(good[1], down=(torch.full((HIDDEN, 2), float("nan")), torch.zeros(2, 16)))}
    with pytest.raises(ValueError, match="NaN"):
        lowrank_experts(model, {0: nan})
    with pytest.raises(ValueError, match="not an MoE layer"):
        lowrank_experts(model, {5: good})
    assert not isinstance(view.experts_module, LowRankExperts)
