"""Families routed by a score-correction bias, sigmoid scores, group-limited top-k or PhiMoE's
sparsemixer: the routing rule against the transformers modules, the search's loss against the pruned layer, compression
with pruning and low rank through save and load, and configs that contradict their weights."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2.models import get_adapter, prune_experts  # noqa: E402
from moei2.search import Layer  # noqa: E402

from .test_pipeline import CharTokenizer, calibration_texts, small_config  # noqa: E402
from .tiny_models import EXPERTS, HIDDEN, SCORED_FAMILIES, build_scored_model, input_ids  # noqa: E402

# (family, config overrides, experts dropped per MoE layer). deepseek_v3-groups routes to the best
# of 2 groups and can only lose equally from every group.
CASES = [(f, {}, [[1, 4, 6], [7], [0, 5]]) for f in SCORED_FAMILIES] + [
    ("deepseek_v3", {"n_group": 2, "topk_group": 1}, [[0, 5], [2, 7]]),
    ("lfm2_moe", {"use_expert_bias": False, "norm_topk_prob": False}, [[2, 3], [6]]),
    ("glm4_moe", {"norm_topk_prob": False}, [[0, 1, 2], [3]]),
]
IDS = [f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else f for f, o, _ in CASES]


def captured_inputs(model, adapter, ids):
    """The input of every MoE block on ``ids``: {layer: [T, H]}."""
    seen, handles = {}, []
    for view in adapter.moe_layers():
        def hook(module, args, kwargs, index=view.layer_index):
            x = args[0] if args else kwargs["hidden_states"]
            seen[index] = x.detach().reshape(-1, x.shape[-1]).clone()
        handles.append(view.moe_module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def routed(view, x):
    """The routed-experts output of the layer's own modules (shared experts excluded)."""
    with torch.no_grad():
        if view.adapter.family == "minimax_m2":
            _, weights, index = view.router(x, view.moe_module.e_score_correction_bias)
        elif view.adapter.family == "lfm2_moe":
            block = view.moe_module
            _, weights, index = view.router(x, block.expert_bias if block.use_expert_bias else None)
        else:
            _, weights, index = view.router(x)
        return view.experts_module(x, index, weights), index, weights


def pruned_view(adapter, view, drop):
    """The view of layer ``view`` in a pruned copy of the model (the original stays whole)."""
    model = prune_experts(copy.deepcopy(adapter.model), {view.layer_index: drop})
    return get_adapter(model).view(view.layer_index)


@pytest.mark.parametrize("family, overrides, drops", CASES, ids=IDS)
def test_rule_is_the_transformers_router_of_the_pruned_layer(family, overrides, drops):
    """RoutingRule.route on the original logits with the dropped experts masked chooses the
    experts and weights that the transformers router of the pruned layer computes."""
    model = build_scored_model(family, **overrides)
    adapter = get_adapter(model)
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(5))
    for view, drop in zip(adapter.moe_layers(), drops):
        logits = (x.double() @ view.router_weight.double().T).numpy()
        rule = view.rule
        kept = np.array([j for j in range(EXPERTS) if j not in drop])
        _, index, weights = routed(pruned_view(adapter, view, drop), x)
        idx, w = rule.route(logits, drop)
        hf = np.sort(np.stack([kept[index.numpy()], weights.double().numpy()], axis=-1), axis=1)
        ours = np.sort(np.stack([idx, w], axis=-1), axis=1)
        np.testing.assert_array_equal(hf[..., 0], ours[..., 0])
        np.testing.assert_allclose(hf[..., 1], ours[..., 1], rtol=2e-6, atol=1e-7)
        # ... and the rule of the pruned layer (sliced bias) routes its logits the same way.
        pidx, pw = pruned_view(adapter, view, drop).rule.route(logits[:, kept])
        np.testing.assert_array_equal(np.sort(kept[pidx], axis=1), np.sort(idx, axis=1))
        # Dropping nothing is the unpruned router.
        _, index, weights = routed(view, x)
        idx, w = rule.route(logits)
        np.testing.assert_array_equal(np.sort(index.numpy(), axis=1), np.sort(idx, axis=1))


@pytest.mark.parametrize("family, overrides, drops", CASES, ids=IDS)
def test_search_loss_is_the_error_of_the_pruned_layer(family, overrides, drops):
    model = build_scored_model(family, **overrides)
    adapter = get_adapter(model)
    inputs = captured_inputs(model, adapter, input_ids(3, 16))
    batches = [16, 32]
    for view, drop in zip(adapter.moe_layers(), drops):
        X = inputs[view.layer_index]
        layer = Layer.from_moe(X.numpy(), view.router_weight.numpy(), view.gate_up_proj.numpy(),
                               view.down_proj.numpy(), rule=view.rule, r_max=4, batch_sizes=batches)
        y, _, _ = routed(view, X)
        masks = [np.isin(np.arange(EXPERTS), drop)]
        if not view.rule.grouped:
            masks += [np.isin(np.arange(EXPERTS), d) for d in ([0], [2, 5], [1, 3, 6, 7])]
        for mask in masks:
            ys, _, _ = routed(pruned_view(adapter, view, np.flatnonzero(mask).tolist()), X)
            expected = sum(torch.linalg.vector_norm((y[a:b] - ys[a:b]).double()).item()
                           for a, b in ((0, 16), (16, 48)))
            assert expected > 0
            assert layer.loss(mask)[0] == pytest.approx(expected, rel=2e-5)


@pytest.mark.parametrize("family, overrides", [
    ("deepseek_v3", {"n_group": 2, "topk_group": 1}),
    ("ernie4_5_moe", {}),
    ("minimax_m2", {}),
    ("phimoe", {}),
])
def test_torch_candidate_outputs_equal_from_moe(family, overrides):
    """The device path's cache (candidate outputs in torch, ranked by the rule) equals from_moe's."""
    from moei2.calibrate import iter_layer_stats
    from moei2.source import InMemorySource
    from moei2.stages.common import Context
    from moei2.stages.selection import search_layer

    model = build_scored_model(family, layers=2)
    adapter = get_adapter(model)
    ids = input_ids(6, 16)
    stats = next(iter(iter_layer_stats(model, ids, batch_size=3, progress=False)))
    view = adapter.view(stats.layer_index)
    ctx = Context(source=InMemorySource(model, adapter=adapter), config=None, runner=None, input_ids=ids,
                  batches=[], batch_sizes=[48, 48], state=None)
    reference = search_layer(ctx, stats, view, 4)
    ctx.torch_candidates = True
    torch_layer = search_layer(ctx, stats, view, 4)
    assert torch_layer.num_candidates == reference.num_candidates == (EXPERTS if view.rule.reranks else 6)
    masks = np.zeros((12, EXPERTS), dtype=bool)
    rng = np.random.default_rng(2)
    for m in masks:
        m[rng.choice(EXPERTS, size=rng.integers(1, 5), replace=False)] = True
    np.testing.assert_allclose(torch_layer.loss(masks), reference.loss(masks), rtol=1e-5)


@pytest.mark.parametrize("family, overrides, drops", CASES, ids=IDS)
def test_masked_routing_is_the_pruned_layer(family, overrides, drops):
    """The block step's masks, applied through the router, give the pruned block's output."""
    from moei2.stages import masked_routing

    model = build_scored_model(family, **overrides)
    adapter = get_adapter(model)
    x = torch.randn(3, 10, HIDDEN, generator=torch.Generator().manual_seed(2))
    for view, drop in zip(adapter.moe_layers(), drops):
        mask = np.isin(np.arange(EXPERTS), drop)
        pruned = pruned_view(adapter, view, drop).moe_module
        with torch.no_grad():
            with masked_routing(view, mask):
                masked = view.moe_module(x)
            expected = pruned(x)
            unmasked = view.moe_module(x)
        torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
        if np.isin(routed(view, x.reshape(-1, HIDDEN))[1].numpy(), drop).any():
            assert not torch.allclose(unmasked, expected)


def check_compressed_save_load(model, tmp_path):
    """``model`` compressed with pruning (25 %) and low rank, saved and loaded, gives the in-memory
    logits; returns (the MoE views of the compressed model, of the loaded one)."""
    config = small_config(prune_ratio=0.25, rank_keep_ratio=0.6)
    compressed, _ = moei2.compress(model, CharTokenizer(), calibration_texts(), config, progress=False)
    views = get_adapter(compressed).moe_layers()
    assert sum(EXPERTS - v.num_experts for v in views) == round(0.25 * EXPERTS * len(views))
    assert all(v.is_lowrank for v in views)
    ids = input_ids(2, 9)
    with torch.no_grad():
        before = compressed(ids).logits
    moei2.save(compressed, tmp_path / "ckpt")
    loaded = moei2.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    return views, get_adapter(loaded).moe_layers()


@pytest.mark.parametrize("family", SCORED_FAMILIES)
def test_compressed_save_load_gives_the_in_memory_logits(family, tmp_path):
    views, loaded = check_compressed_save_load(build_scored_model(family, layers=3), tmp_path)
    for a, b in zip(loaded, views):
        bias_a, bias_b = a.rule.choice_bias, b.rule.choice_bias
        assert (bias_a is None) == (bias_b is None)
        if bias_a is not None:
            np.testing.assert_array_equal(bias_a, bias_b)


def check_streamed_run_equals_the_in_memory_run(build, tmp_path):
    """``build(layers=4)`` compressed from its checkpoint directory, streamed, and in memory: the
    same experts dropped and the same logits."""
    source = tmp_path / "hf"
    build(layers=4).save_pretrained(str(source), max_shard_size="20KB")
    config = small_config(kt_block=2)
    reference, ref_report = moei2.compress(build(layers=4), CharTokenizer(), calibration_texts(), config,
                                           progress=False)
    _, report = moei2.compress(source, CharTokenizer(), calibration_texts(), config, output=tmp_path / "out",
                               progress=False)
    for l, info in ref_report["layers"].items():
        assert report["layers"][l]["dropped"] == info["dropped"]
    ids = input_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(moei2.load(tmp_path / "out")(ids).logits, reference(ids).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", SCORED_FAMILIES)
def test_streamed_run_equals_the_in_memory_run(family, tmp_path):
    check_streamed_run_equals_the_in_memory_run(lambda **kw: build_scored_model(family, **kw), tmp_path)


def test_group_limited_pruning_is_refused_before_calibration():
    model = build_scored_model("deepseek_v3", n_group=2, topk_group=1)
    texts = calibration_texts()
    with pytest.raises(ValueError, match=r"layer\(s\) \[1, 2\] use group-limited routing"):
        moei2.compress(model, CharTokenizer(), texts, small_config(), progress=False)
    with pytest.raises(ValueError, match="keep the same number"):
        prune_experts(model, {1: [0, 1]})


@pytest.mark.parametrize("family, field, value, message", [
    ("deepseek_v3", "n_group", 3, "must divide the 8 experts"),
    ("deepseek_v3", "n_routed_experts", 10, "config n_routed_experts=10 but the router has 8 rows"),
    ("deepseek_v3", "num_experts_per_tok", 9, r"num_experts_per_tok=9 must be in \[1, 8\]"),
    ("minimax_m2", "num_local_experts", 6, "config num_local_experts=6"),
    ("ernie4_5_moe", "moe_k", 0, "moe_k=0"),
    ("lfm2_moe", "num_experts", 4, "config num_experts=4"),
    ("phimoe", "num_experts_per_tok", 3, "num_experts_per_tok=3, but sparsemixer routing always takes 2"),
])
def test_config_contradicting_weights_is_refused(family, field, value, message):
    model = build_scored_model(family)
    setattr(model.config, field, value)
    if field == "n_group":  # the router reads its own copy
        for layer in model.model.layers[1:]:
            layer.mlp.gate.num_group = value
    with pytest.raises(ValueError, match=message):
        get_adapter(model)


def check_pruned_block_is_the_block_with_dropped_logits(model, monkeypatch, output=lambda out: out):
    """transformers' own block is the reference: the unpruned last MoE block of ``model`` whose
    router logits of the dropped experts are -inf (through torch's linear) gives the pruned block's
    output (``output`` picks it from what the block returns)."""
    adapter = get_adapter(model)
    x = torch.randn(1, 64, HIDDEN, generator=torch.Generator().manual_seed(7))
    drop = [0, 3, 4, 6]
    view = adapter.view(adapter.moe_layer_indices[-1])
    mask = torch.from_numpy(np.isin(np.arange(EXPERTS), drop))
    linear = torch.nn.functional.linear

    def masked_linear(input, weight, bias=None):
        out = linear(input, weight, bias)
        return out.masked_fill(mask, float("-inf")) if weight is view.router.weight else out

    monkeypatch.setattr(torch.nn.functional, "linear", masked_linear)
    with torch.no_grad():
        expected = output(view.moe_module(x))
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    with torch.no_grad():
        whole = output(view.moe_module(x))
        pruned = output(pruned_view(adapter, view, drop).moe_module(x))
    assert not torch.allclose(whole, expected)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-6)


def test_pruned_phimoe_block_equals_the_block_with_dropped_logits_at_minus_infinity(monkeypatch):
    """A dropped expert's -inf logit lies outside every sparsemixer window and is never picked."""
    check_pruned_block_is_the_block_with_dropped_logits(build_scored_model("phimoe"), monkeypatch)
