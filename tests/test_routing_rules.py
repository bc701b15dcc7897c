"""The routing rules beyond softmax-then-top-k: RoutingRule.route and the C search's loss against
the float64 oracle (moei2._reference), on every mask of small layers."""
import itertools

import numpy as np
import pytest

from moei2 import _reference as ref
from moei2.search import Layer, RoutingRule

E = 8
BIAS = np.array([0.3, -0.2, 0.05, 0.4, -0.1, 0.0, 0.25, -0.3])

RULES = {
    "sigmoid-bias-renorm-eps": RoutingRule(3, True, 2.5, weights="sigmoid", choice_bias=BIAS, norm_eps=1e-6),
    "sigmoid-bias-plain": RoutingRule(2, False, 1.0, weights="sigmoid", choice_bias=BIAS),
    "sigmoid-nobias-renorm": RoutingRule(2, True, 1.0, weights="sigmoid"),
    "unit-top1": RoutingRule(1, False, weights="unit"),
    "groups-4-2": RoutingRule(2, True, 2.0, weights="sigmoid", choice_bias=BIAS, num_groups=4, top_groups=2,
                              norm_eps=1e-20),
    "groups-4-1": RoutingRule(2, False, 1.0, weights="sigmoid", choice_bias=BIAS, num_groups=4, top_groups=1),
    "softmax-bias-renorm": RoutingRule(2, True, 1.0, weights="softmax", choice_bias=BIAS),
    "softmax-plain": RoutingRule(2, False, 1.5),
    # PhiMoE's sparsemixer, windows wide enough to hold survivors of any rank
    "sparsemixer-top2": RoutingRule(2, False, weights="sparsemixer", window=0.6),
    "sparsemixer-top3-scaled": RoutingRule(3, False, 1.5, weights="sparsemixer", window=1.2),
}


def _layer_data(seed, N=36, d=5):
    rng = np.random.default_rng(seed)
    return 1.5 * rng.standard_normal((N, E)), rng.standard_normal((E, N, d))


@pytest.mark.parametrize("name", sorted(RULES))
def test_route_matches_reference(name):
    rule = RULES[name]
    logits, _ = _layer_data(1)
    for r in range(0, 4):
        for combo in list(itertools.combinations(range(E), r))[:20]:
            idx, w = rule.route(logits, list(combo))
            idx_ref, w_ref = ref.route_rule_reference(logits, rule, np.isin(np.arange(E), combo))
            np.testing.assert_array_equal(idx, idx_ref)
            np.testing.assert_allclose(w, w_ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", sorted(RULES))
def test_search_loss_is_the_loss_of_the_pruned_layer(name):
    """Every mask of up to r_max experts: the cached loss equals the recomputed one, and the
    exhaustive search's best mask is the brute-force best."""
    rule = RULES[name]
    logits, outputs = _layer_data(2)
    r_max = 4
    batches = [10, 26]
    layer = Layer.from_dense(logits, outputs, rule=rule, batch_sizes=batches, r_max=r_max)
    assert layer.num_candidates == (E if rule.reranks else rule.top_k + r_max)
    masks = np.array([np.isin(np.arange(E), c) for r in range(r_max + 1) for c in itertools.combinations(range(E), r)])
    cached = layer.loss(masks)
    direct = np.array([ref.rule_loss_reference(logits, outputs, rule, batches, m) for m in masks])
    np.testing.assert_allclose(cached, direct, rtol=1e-10, atol=1e-12)
    assert np.count_nonzero(direct) > len(masks) // 2
    best = layer.exhaustive(3, k_best=1)
    brute = min(ref.exhaustive_reference(
        lambda m: ref.rule_loss_reference(logits, outputs, rule, batches, m), E, 3))
    assert best.losses[0] == pytest.approx(brute[0], rel=1e-10)
    np.testing.assert_array_equal(np.flatnonzero(best.masks[0]), brute[1])


def test_candidate_bound_of_rank_stable_rules():
    """Under a rule whose order no drop changes, the new top-k always lies among the k + r best
    by choice key: checked on random masks against the full routing."""
    rule = RULES["sigmoid-bias-renorm-eps"]
    logits, _ = _layer_data(3, N=200)
    key = 1 / (1 + np.exp(-logits)) + BIAS
    rank = np.argsort(-key, axis=1, kind="stable")
    rng = np.random.default_rng(0)
    for r in range(1, 5):
        for _ in range(30):
            drop = rng.choice(E, r, replace=False)
            idx, _ = rule.route(logits, drop)
            for n in range(logits.shape[0]):
                assert set(idx[n]) <= set(rank[n, : rule.top_k + r])


def test_rule_validation():
    with pytest.raises(ValueError, match="weights"):
        RoutingRule(2, True, weights="tanh")
    with pytest.raises(ValueError, match="sigmoid weights only"):
        RoutingRule(2, True, num_groups=4, top_groups=2)
    with pytest.raises(ValueError, match="unit weights"):
        RoutingRule(1, False, weights="unit", choice_bias=BIAS)
    with pytest.raises(ValueError, match="sparsemixer weights take no"):
        RoutingRule(2, True, weights="sparsemixer", window=0.1)
    with pytest.raises(ValueError, match="window applies to sparsemixer"):
        RoutingRule(2, False, weights="sigmoid", window=0.1)
    with pytest.raises(ValueError, match="window must be"):
        RoutingRule(2, False, weights="sparsemixer", window=-1.0)
    with pytest.raises(ValueError, match="top_groups"):
        RoutingRule(2, True, weights="sigmoid", num_groups=2, top_groups=3)
    logits, outputs = _layer_data(4)
    with pytest.raises(ValueError, match="does not divide"):
        Layer.from_dense(logits, outputs, rule=RoutingRule(2, True, weights="sigmoid", num_groups=3, top_groups=1))
    with pytest.raises(ValueError, match="choice_bias has 3 entries"):
        Layer.from_dense(logits, outputs, rule=RoutingRule(2, True, weights="sigmoid", choice_bias=[0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="not both"):
        Layer.from_dense(logits, outputs, 2, True, rule=RULES["unit-top1"])
