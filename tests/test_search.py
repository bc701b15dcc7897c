"""moei2.search: routing under pruning, the cached loss against the float64 oracle and against
real Hugging Face MoE blocks with experts deleted, importance, searches, prune counts."""
import copy
import itertools

import numpy as np
import pytest

from moei2 import _reference as ref
from moei2 import search


def random_layer(seed, N=40, E=8, d=6, scale=1.5):
    rng = np.random.default_rng(seed)
    return scale * rng.normal(size=(N, E)), rng.normal(size=(E, N, d))


def all_masks(E, r_values):
    out = []
    for r in r_values:
        for combo in itertools.combinations(range(E), r):
            m = np.zeros(E, dtype=bool)
            m[list(combo)] = True
            out.append(m)
    return np.array(out)


# ---- routing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("renormalize,scaling", [(True, 1.0), (False, 1.0), (False, 2.5)])
def test_route_matches_reference(renormalize, scaling):
    logits, _ = random_layer(0)
    for dropped in (None, [1, 3], np.eye(8, dtype=bool)[5]):
        idx, w = search.route(logits, 3, renormalize, scaling, dropped)
        idx_ref, w_ref = ref.route_reference(logits, 3, renormalize, scaling, dropped)
        np.testing.assert_array_equal(idx, idx_ref)
        np.testing.assert_allclose(w, w_ref, rtol=1e-14)
        if dropped is not None:
            assert not np.isin(idx, np.flatnonzero(search._dropped_mask(dropped, 8))).any()


def test_route_rejects_bad_input():
    logits, _ = random_layer(0)
    with pytest.raises(ValueError, match="router_logits"):
        search.route(logits[0], 2, True)
    bad = logits.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        search.route(bad, 2, True)
    with pytest.raises(ValueError, match="top_k"):
        search.route(logits, 7, True, dropped=[0, 1])
    with pytest.raises(ValueError, match="dropped"):
        search.route(logits, 2, True, dropped=[8])


# ---- the cached loss --------------------------------------------------------------------------

@pytest.mark.parametrize("renormalize,scaling", [(True, 1.0), (False, 1.0), (False, 2.5), (True, 0.5)])
def test_loss_equals_direct_recomputation(renormalize, scaling):
    logits, outputs = random_layer(1)
    batches = [7, 20, 13]
    layer = search.Layer.from_dense(logits, outputs, 2, renormalize, scaling, batch_sizes=batches, r_max=4)
    masks = all_masks(8, range(5))
    got = layer.loss(masks)
    want = np.array([ref.layer_loss_reference(logits, outputs, 2, renormalize, scaling, batches, m) for m in masks])
    assert got.dtype == np.float64 and got.shape == (len(masks),)
    assert got[0] == 0.0
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)
    # a single 1-D mask gives one loss
    np.testing.assert_allclose(layer.loss(masks[9]), want[9:10], rtol=1e-10)


@pytest.mark.parametrize("renormalize,scaling", [(True, 1.0), (False, 1.0), (False, 2.5)])
def test_loss_equals_direct_recomputation_wide_layer(renormalize, scaling):
    # Enough candidates (C = 22) and drops that a token's new top-k reaches past the 8th and the
    # 16th candidate, and that the dropped experts often hold most of a token's probability.
    logits, outputs = random_layer(5, N=48, E=40, d=30, scale=2.0)
    batches = [17, 31]
    layer = search.Layer.from_dense(logits, outputs, 6, renormalize, scaling, batch_sizes=batches, r_max=16)
    rng = np.random.default_rng(6)
    masks = np.zeros((60, 40), dtype=bool)
    for i, m in enumerate(masks):
        m[rng.choice(40, size=1 + i % 16, replace=False)] = True
    masks[-1] = False
    masks[-1, np.argsort(-logits.sum(axis=0))[:16]] = True  # the most used experts
    # Keep a token's favourite but drop its next 15: its new top-k is candidates 0 and 16..20.
    for i, n in enumerate(np.argsort(-logits.max(axis=1))[:8]):
        masks[i] = False
        masks[i, np.argsort(-logits[n])[1:16]] = True
    want = np.array([ref.layer_loss_reference(logits, outputs, 6, renormalize, scaling, batches, m) for m in masks])
    np.testing.assert_allclose(layer.loss(masks), want, rtol=1e-10, atol=0)


def test_loss_float32_outputs_and_default_r_max():
    logits, outputs = random_layer(2, E=6)
    layer = search.Layer.from_dense(logits, outputs.astype(np.float32), 2, False)
    assert layer.r_max == 4
    masks = all_masks(6, range(5))
    want = [ref.layer_loss_reference(logits, outputs.astype(np.float32), 2, False, 1.0, [40], m) for m in masks]
    np.testing.assert_allclose(layer.loss(masks), want, rtol=1e-10)


def test_expert_importance_is_single_removal_loss():
    logits, outputs = random_layer(3)
    for renormalize in (True, False):
        layer = search.Layer.from_dense(logits, outputs, 2, renormalize, batch_sizes=[10, 30], r_max=1)
        want = [ref.layer_loss_reference(logits, outputs, 2, renormalize, 1.0, [10, 30], np.eye(8, dtype=bool)[j])
                for j in range(8)]
        np.testing.assert_allclose(layer.expert_importance(), want, rtol=1e-10)


def test_memory_is_bounded_by_candidates():
    logits, outputs = random_layer(4, N=50, E=16, d=64)
    small = search.Layer.from_dense(logits, outputs, 2, True, r_max=2)
    large = search.Layer.from_dense(logits, outputs, 2, True, r_max=14)
    # C(C+1)/2 doubles per token for the factor: 10 vs 136, independent of d = 64
    assert small.memory_bytes < large.memory_bytes
    assert small.memory_bytes < 50 * (10 + 4 + 4 + 8 + 2) * 8 + 100


# ---- against real Hugging Face MoE blocks -----------------------------------------------------

@pytest.fixture
def torch_one_thread():
    # Tiny blocks: extra intra-op threads only contend for the CPU.
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hf_block(kind, E, k, H, inter, norm=False, scaling=1.0):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        config = MixtralConfig(hidden_size=H, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=k,
                               num_attention_heads=2, num_key_value_heads=2)
        field = "num_local_experts"
    elif kind == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        config = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=inter, num_experts=E, num_experts_per_tok=k,
                                shared_expert_intermediate_size=2 * inter, norm_topk_prob=norm,
                                num_attention_heads=2, num_key_value_heads=2)
        field = "num_experts"
    else:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as Block

        config = DeepseekV2Config(hidden_size=H, moe_intermediate_size=inter, n_routed_experts=E,
                                  num_experts_per_tok=k, n_shared_experts=1, routed_scaling_factor=scaling,
                                  topk_method="greedy", n_group=1, topk_group=1, num_attention_heads=2,
                                  num_key_value_heads=2)
        field = "n_routed_experts"
    torch.manual_seed(0)
    block = Block(config).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.4)
    return block, config, field, Block


def _pruned(block, config, field, Block, dropped):
    import torch

    keep = [j for j in range(getattr(config, field)) if j not in set(dropped)]
    cfg = copy.deepcopy(config)
    setattr(cfg, field, len(keep))
    pruned = Block(cfg).double().eval()
    state = block.state_dict()
    for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
        state[name] = state[name][torch.tensor(keep)]
    pruned.load_state_dict(state)
    return pruned


@pytest.mark.parametrize("kind,norm,scaling,k", [("mixtral", True, 1.0, 2), ("qwen2_moe", False, 1.0, 2),
                                                 ("qwen2_moe", True, 1.0, 3), ("deepseek_v2", False, 2.5, 3)])
def test_loss_matches_hf_block_with_experts_deleted(kind, norm, scaling, k, torch_one_thread):
    import torch

    E, H, inter = 8, 16, 12
    block, config, field, Block = _hf_block(kind, E, k, H, inter, norm, scaling)
    x = torch.randn(3, 10, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = block(x)
    layer = search.Layer.from_moe(
        x.reshape(-1, H).numpy(), block.gate.weight.detach().numpy(), block.experts.gate_up_proj.detach().numpy(),
        block.experts.down_proj.detach().numpy(), top_k=k, renormalize=norm, scaling_factor=scaling, r_max=3,
        batch_sizes=[10, 10, 10])
    rng = np.random.default_rng(0)
    for r in (1, 2, 3):
        for _ in range(3):
            dropped = sorted(rng.choice(E, size=r, replace=False).tolist())
            with torch.no_grad():
                ys = _pruned(block, config, field, Block, dropped)(x)
            # Shared experts are identical in both blocks, so the full outputs differ by the
            # routed part only: batch b is x[b]'s 10 tokens.
            want = sum(torch.linalg.vector_norm(y[b] - ys[b]).item() for b in range(3))
            mask = np.zeros(E, dtype=bool)
            mask[dropped] = True
            # HF routers take the softmax in float32, hence the tolerance.
            np.testing.assert_allclose(layer.loss(mask)[0], want, rtol=2e-5)


def test_from_moe_matches_dense_outputs_and_chunks(monkeypatch):
    rng = np.random.default_rng(5)
    E, H, inter, N = 6, 10, 7, 33
    X = rng.normal(size=(N, H)).astype(np.float32)
    router = rng.normal(size=(E, H)).astype(np.float32)
    gu = (0.3 * rng.normal(size=(E, 2 * inter, H))).astype(np.float32)
    down = (0.3 * rng.normal(size=(E, H, inter))).astype(np.float32)
    kwargs = dict(top_k=2, renormalize=False, r_max=3, batch_sizes=[13, 20])
    layer = search.Layer.from_moe(X, router, gu, down, **kwargs)
    logits = X.astype(np.float64) @ router.astype(np.float64).T
    outputs = ref.expert_outputs_reference(X, gu, down)
    dense = search.Layer.from_dense(logits, outputs, 2, False, batch_sizes=[13, 20], r_max=3)
    masks = all_masks(E, range(4))
    np.testing.assert_allclose(layer.loss(masks), dense.loss(masks), rtol=1e-5)
    monkeypatch.setattr(search, "_CHUNK_BYTES", 1)  # one token per chunk
    chunked = search.Layer.from_moe(X, router, gu, down, **kwargs)
    # float32 BLAS rounding depends on how many rows a product has, nothing else may differ
    np.testing.assert_allclose(chunked.loss(masks), layer.loss(masks), rtol=1e-6)


# ---- searches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("E,k,r", [(8, 2, 2), (8, 2, 4), (16, 4, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_genetic_finds_exhaustive_optimum(E, k, r, seed):
    logits, outputs = random_layer(100 + seed, N=48, E=E, d=5)
    layer = search.Layer.from_dense(logits, outputs, k, bool(seed % 2), batch_sizes=[16, 32], r_max=r)
    ex = layer.exhaustive(r, k_best=5)
    ga = layer.genetic(r, k_best=5, seed=seed)
    assert ga.losses[0] == ex.losses[0]
    np.testing.assert_array_equal(ga.masks[0], ex.masks[0])
    assert ga.masks.shape == (5, E) and ga.masks.dtype == bool
    assert (ga.masks.sum(axis=1) == r).all()
    assert len({m.tobytes() for m in ga.masks}) == 5
    assert np.all(np.diff(ga.losses) >= 0)
    np.testing.assert_array_equal(layer.loss(ga.masks), ga.losses)
    assert len(ga.history["best"]) == len(ga.history["mean"]) >= 1
    assert np.all(np.diff(ga.history["best"]) <= 0)
    # the brute-force ranking in itertools order agrees with the exhaustive kernel
    brute = sorted(ref.exhaustive_reference(lambda m: layer.loss(m)[0], E, r))[:5]
    np.testing.assert_array_equal(ex.losses, [b[0] for b in brute])
    assert [tuple(np.flatnonzero(m)) for m in ex.masks] == [b[1] for b in brute]


def test_genetic_is_reproducible_at_any_thread_count():
    logits, outputs = random_layer(7, N=60, E=20, d=4)
    layer = search.Layer.from_dense(logits, outputs, 2, False, r_max=5)
    layer.num_threads = 1
    a = layer.genetic(5, k_best=4, seed=11, population=40, generations=15)
    layer.num_threads = 4
    b = layer.genetic(5, k_best=4, seed=11, population=40, generations=15)
    c = layer.genetic(5, k_best=4, seed=12, population=40, generations=15)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.history == b.history and a.evaluations == b.evaluations
    assert len(a.history["best"]) == 15
    assert a.history != c.history


def test_small_space_is_scored_whole():
    logits, outputs = random_layer(8)
    layer = search.Layer.from_dense(logits, outputs, 2, True, r_max=2)
    ga = layer.genetic(2, k_best=3, seed=0)
    assert ga.evaluations == 28 and len(ga.history["best"]) == 1
    np.testing.assert_array_equal(ga.losses, layer.exhaustive(2, 3).losses)


def test_greedy():
    logits, outputs = random_layer(9)
    layer = search.Layer.from_dense(logits, outputs, 2, False, r_max=3)
    g = layer.greedy(3)
    assert g.masks.shape == (1, 8) and g.masks.sum() == 3
    assert g.evaluations == 8 + 7 + 6
    np.testing.assert_array_equal(layer.loss(g.masks), g.losses)
    assert g.masks[0, np.argmin(layer.expert_importance())]
    assert g.losses[0] >= layer.exhaustive(3).losses[0]


def test_search_rejects_bad_input():
    logits, outputs = random_layer(10)
    layer = search.Layer.from_dense(logits, outputs, 2, True, r_max=3)
    with pytest.raises(ValueError, match="masks.*bool"):
        layer.loss(np.zeros((1, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="masks.*shape"):
        layer.loss(np.zeros((1, 7), dtype=bool))
    with pytest.raises(ValueError, match="at most 3"):
        layer.loss(np.ones(8, dtype=bool))
    with pytest.raises(ValueError, match="r must be"):
        layer.genetic(4)
    with pytest.raises(ValueError, match="r must be"):
        layer.exhaustive(-1)
    with pytest.raises(ValueError, match="elite_fraction"):
        layer.genetic(2, elite_fraction=0.0)
    with pytest.raises(ValueError, match="mutation_rate"):
        layer.genetic(2, mutation_rate=1.5)
    with pytest.raises(ValueError, match="max_masks"):
        layer.exhaustive(3, max_masks=10)
    with pytest.raises(ValueError, match="r_max"):
        search.Layer.from_dense(logits, outputs, 2, True, r_max=7)
    with pytest.raises(ValueError, match="top_k"):
        search.Layer.from_dense(logits, outputs, 8, True)
    with pytest.raises(ValueError, match="expert_outputs"):
        search.Layer.from_dense(logits, outputs[:, :5], 2, True)
    with pytest.raises(ValueError, match="expert_outputs.*dtype"):
        search.Layer.from_dense(logits, outputs.astype(np.int32), 2, True)
    bad = logits.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="router_logits.*NaN"):
        search.Layer.from_dense(bad, outputs, 2, True)
    with pytest.raises(ValueError, match="batch_sizes"):
        search.Layer.from_dense(logits, outputs, 2, True, batch_sizes=[10, 10])
    X = np.zeros((4, 5))
    with pytest.raises(ValueError, match="router_weight"):
        search.Layer.from_moe(X, np.zeros((6, 4)), np.zeros((6, 8, 5)), np.zeros((6, 5, 4)), top_k=2,
                              renormalize=True, r_max=2)
    with pytest.raises(ValueError, match="down_proj"):
        search.Layer.from_moe(X, np.zeros((6, 5)), np.zeros((6, 8, 5)), np.zeros((6, 5, 3)), top_k=2,
                              renormalize=True, r_max=2)


# ---- prune counts -----------------------------------------------------------------------------

def test_prune_counts_inverse_importance():
    imp = np.array([1.0, 2.0, 4.0, 8.0])
    counts = search.prune_counts(imp, num_experts=16, top_k=2, ratio=0.25)
    # budget round(0.25 * 16 * 4) = 16; shares 16 * (8, 4, 2, 1) / 15 = 8.53, 4.27, 2.13, 1.07
    np.testing.assert_array_equal(counts, [9, 4, 2, 1])
    assert counts.dtype == np.int64


def test_prune_counts_caps_redistribute_exactly():
    imp = np.array([0.01, 1.0, 1.0, 1.0])
    counts = search.prune_counts(imp, num_experts=8, top_k=2, total=12)
    # layer 0 would take almost everything but is capped at 8 - 2 = 6; the other 6 are shared
    np.testing.assert_array_equal(counts, [6, 2, 2, 2])
    counts = search.prune_counts([1.0, 1.0, 1.0], num_experts=[8, 4, 8], top_k=[2, 2, 6], total=10, rule="uniform")
    assert counts.sum() == 10 and np.all(counts <= [6, 2, 2])
    np.testing.assert_array_equal(counts, [6, 2, 2])
    rng = np.random.default_rng(0)
    for _ in range(50):
        imp = rng.uniform(0.1, 10, size=6)
        total = int(rng.integers(0, 6 * 6 + 1))
        c = search.prune_counts(imp, 8, 2, total=total)
        assert c.sum() == total and np.all((0 <= c) & (c <= 6))


def test_prune_counts_uniform_and_ties():
    np.testing.assert_array_equal(search.prune_counts([3.0, 1.0, 2.0], 8, 2, total=5, rule="uniform"), [2, 2, 1])


def test_prune_counts_errors():
    with pytest.raises(ValueError, match="budget"):
        search.prune_counts([1.0, 1.0], 8, 2, total=13)
    with pytest.raises(ValueError, match="rule"):
        search.prune_counts([1.0, 1.0], 8, 2, rule="random")
    with pytest.raises(ValueError, match="layer_importance"):
        search.prune_counts([1.0, np.nan], 8, 2)
    with pytest.raises(ValueError, match="num_experts"):
        search.prune_counts([1.0, 1.0], [8, 8, 8], 2)
    with pytest.raises(ValueError, match="ratio"):
        search.prune_counts([1.0, 1.0], 8, 2, ratio=1.5)


def test_finiteness_check_in_blocks_finds_every_position():
    a = np.arange(50, dtype=np.float32).reshape(5, 10)
    assert search._all_finite(a, block=7)
    for pos in (0, 6, 7, 49):
        for bad in (np.nan, np.inf):
            b = a.copy()
            b.flat[pos] = bad
            assert not search._all_finite(b, block=7)
            assert not search._all_finite(b[:, ::2] if pos % 2 == 0 else b, block=7)
