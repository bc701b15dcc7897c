"""The C core behind moei2.search and moei2.lowrank: the C-owned search cache, the factor step's
two routes, candidate outputs in C, thread-count independence, and the reliability defects
(huge sizes, float messages, late or missing checks, BLAS thread count under concurrency)."""
import re
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest

import moei2
from moei2 import _core
from moei2 import _reference as ref
from moei2 import lowrank, search

# Child processes run outside the checkout, so that they import the installed moei2, not the
# source tree (which has no compiled extension in a fresh clone).
OUTSIDE = tempfile.gettempdir()


def random_layer(seed, N=40, E=8, d=6, scale=1.5):
    rng = np.random.default_rng(seed)
    return scale * rng.normal(size=(N, E)), rng.normal(size=(E, N, d))


def moe_weights(seed, E=6, H=10, inter=7, N=33):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, H)).astype(np.float32)
    router = rng.normal(size=(E, H)).astype(np.float32)
    gu = (0.3 * rng.normal(size=(E, 2 * inter, H))).astype(np.float32)
    down = (0.3 * rng.normal(size=(E, H, inter))).astype(np.float32)
    return X, router, gu, down


def new_cache(logits, k=2, r_max=3, renormalize=False, batch_ends=None):
    ends = np.array([logits.shape[0]] if batch_ends is None else batch_ends, dtype=np.int64)
    return _core.SearchCache(logits, top_k=k, r_max=r_max, renormalize=renormalize, scaling_factor=1.0,
                             batch_ends=ends)


def gathered(outputs, cand, first):
    return outputs[cand, np.arange(first, first + cand.shape[0])[:, None]]


# ---- the C-owned cache ---------------------------------------------------------------------------

def test_cache_is_built_in_token_order_and_refuses_searches_until_complete():
    logits, outputs = random_layer(1)
    cache = new_cache(logits)
    assert (cache.num_tokens, cache.num_experts, cache.top_k, cache.r_max, cache.num_candidates) == (40, 8, 2, 3, 5)
    assert cache.factored == 0 and cache.memory_bytes > 0
    masks = np.zeros((1, 1), dtype=np.uint64)
    with pytest.raises(ValueError, match="incomplete: 0 of 40"):
        cache.loss(masks, 1)
    cand = cache.candidates(0, 10)
    assert cand.dtype == np.int64 and cand.shape == (10, 5)
    with pytest.raises(ValueError, match="first must be 0"):
        cache.factor_outputs(gathered(outputs, cand, 0), 5, 1)
    assert cache.factor_outputs(np.ascontiguousarray(gathered(outputs, cand, 0)), 0, 1) == 10
    rest = cache.candidates(10, 30)
    with pytest.raises(ValueError, match="width 3 differs"):
        cache.factor_outputs(np.ascontiguousarray(gathered(outputs, rest, 10)[:, :, :3]), 10, 1)
    with pytest.raises(ValueError, match="shape"):
        cache.factor_outputs(np.zeros((31, 5, 6)), 10, 1)
    cache.factor_outputs(np.ascontiguousarray(gathered(outputs, rest, 10)), 10, 1)
    with pytest.raises(ValueError, match="already factored"):
        cache.factor_outputs(np.zeros((1, 5, 6)), 40, 1)
    layer = search.Layer(cache)
    dense = search.Layer.from_dense(logits, outputs, 2, False, r_max=3)
    m = np.zeros((3, 8), dtype=bool)
    m[0, [1, 2]] = m[1, 5] = m[2, [0, 3, 7]] = True
    np.testing.assert_array_equal(layer.loss(m), dense.loss(m))


def test_cache_arguments_are_checked_with_their_names():
    logits, _ = random_layer(2)
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        _core.SearchCache(logits, top_k=2, r_max=3, renormalize=1, scaling_factor=1.0, batch_ends=np.array([40]))
    with pytest.raises(ValueError, match="scaling_factor must be finite"):
        _core.SearchCache(logits, top_k=2, r_max=3, renormalize=True, scaling_factor=float("nan"),
                          batch_ends=np.array([40]))
    with pytest.raises(ValueError, match="scaling_factor must be positive, got -1"):
        _core.SearchCache(logits, top_k=2, r_max=3, renormalize=True, scaling_factor=-1.0, batch_ends=np.array([40]))
    with pytest.raises(ValueError, match="r_max must be in"):
        new_cache(logits, r_max=7)
    with pytest.raises(ValueError, match="batch_ends"):
        new_cache(logits, batch_ends=[20, 10, 40])
    with pytest.raises(TypeError, match="router_logits must have dtype"):
        new_cache(logits.astype(np.float32))
    with pytest.raises(ValueError, match="num_threads must be in"):
        new_cache(logits).factor_outputs(np.zeros((1, 5, 6)), 0, 0)


# ---- the factor step ---------------------------------------------------------------------------

@pytest.mark.parametrize("renormalize", [True, False])
def test_ill_conditioned_tokens_take_the_qr_route_and_stay_exact(renormalize):
    """Experts whose outputs coincide or nearly do make the Gram singular or ill-conditioned; those
    tokens must be factored by QR and the loss must still match the float64 oracle."""
    rng = np.random.default_rng(3)
    N, E, d = 30, 8, 12
    logits = 1.5 * rng.normal(size=(N, E))
    outputs = rng.normal(size=(E, N, d))
    outputs[3] = outputs[1]                                        # identical experts
    outputs[5] = outputs[2] + 1e-7 * rng.normal(size=(N, d))       # nearly identical
    layer = search.Layer.from_dense(logits, outputs, 2, renormalize, r_max=5)
    assert layer._cache.qr_tokens > 0
    masks = np.zeros((6, E), dtype=bool)
    for i, drop in enumerate([[1], [3], [1, 3], [2, 5], [0, 4, 6], [1, 2, 5]]):
        masks[i, drop] = True
    want = [ref.layer_loss_reference(logits, outputs, 2, renormalize, 1.0, [N], m) for m in masks]
    np.testing.assert_allclose(layer.loss(masks), want, rtol=1e-10, atol=1e-14)


def test_factor_is_bitwise_the_same_at_any_thread_count():
    logits, outputs = random_layer(4, N=200, E=12, d=40)
    losses = []
    masks = np.zeros((20, 12), dtype=bool)
    rng = np.random.default_rng(0)
    for m in masks:
        m[rng.choice(12, size=3, replace=False)] = True
    for threads in (1, 2, 3):
        cache = new_cache(logits, k=2, r_max=4)
        cand = cache.candidates(0, 200)
        cache.factor_outputs(np.ascontiguousarray(gathered(outputs, cand, 0)), 0, threads)
        losses.append(search.Layer(cache).loss(masks))
    np.testing.assert_array_equal(losses[0], losses[1])
    np.testing.assert_array_equal(losses[0], losses[2])


def test_factor_float32_and_float64_outputs_agree_bitwise_and_match_the_oracle():
    """The Gram kernel at the search's width (19 candidates: a partial row of 4 x 4 tiles) over
    several column passes and a partial last vector (d = 301): float32 outputs are widened on the
    way into the same kernel as float64 ones, so the losses agree bitwise, at any thread count,
    and match the float64 oracle."""
    rng = np.random.default_rng(8)
    N, E, d, k, r = 50, 24, 301, 4, 15
    logits = 1.5 * rng.normal(size=(N, E))
    outputs = rng.normal(size=(E, N, d)).astype(np.float32).astype(np.float64)
    masks = np.zeros((12, E), dtype=bool)
    for m in masks:
        m[rng.choice(E, size=6, replace=False)] = True
    losses = []
    for dtype, threads in ((np.float64, 1), (np.float32, 1), (np.float32, 2), (np.float64, 3)):
        cache = new_cache(logits, k=k, r_max=r)
        cand = cache.candidates(0, N)
        cache.factor_outputs(np.ascontiguousarray(gathered(outputs, cand, 0), dtype=dtype), 0, threads)
        assert cache.qr_tokens == 0
        losses.append(search.Layer(cache).loss(masks))
    for other in losses[1:]:
        np.testing.assert_array_equal(losses[0], other)
    want = [ref.layer_loss_reference(logits, outputs, k, False, 1.0, [N], m) for m in masks]
    np.testing.assert_allclose(losses[0], want, rtol=1e-10)


def test_genetic_same_masks_at_one_and_two_threads():
    X, router, gu, down = moe_weights(6, E=16, H=24, inter=8, N=120)
    layer = search.Layer.from_moe(X, router, gu, down, top_k=2, renormalize=True, r_max=6)
    layer.num_threads = 1
    a = layer.genetic(6, k_best=3, seed=5, population=30, generations=10)
    layer.num_threads = 2
    b = layer.genetic(6, k_best=3, seed=5, population=30, generations=10)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.losses, b.losses)


# ---- candidate outputs in C ----------------------------------------------------------------------

def test_candidate_outputs_match_the_numpy_oracle_at_any_thread_count():
    X, router, gu, down = moe_weights(7)
    rng = np.random.default_rng(1)
    cand = rng.integers(0, 6, size=(33, 4)).astype(np.int64)
    dense = ref.expert_outputs_reference(X, gu, down)                  # [E, N, H]
    want = dense[cand, np.arange(33)[:, None]]
    got1 = _core.candidate_outputs(X, cand, gu, down, 1)
    got2 = _core.candidate_outputs(X, cand, gu, down, 3)
    assert got1.dtype == np.float32 and got1.shape == (33, 4, 10)
    np.testing.assert_array_equal(got1, got2)
    np.testing.assert_allclose(got1, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expert ids in"):
        _core.candidate_outputs(X, cand + 6, gu, down, 1)
    with pytest.raises(TypeError, match="X must have dtype"):
        _core.candidate_outputs(X.astype(np.float64), cand, gu, down, 1)
    with pytest.raises(ValueError, match="down_proj must have shape"):
        _core.candidate_outputs(X, cand, gu, down[:, :, :5].copy(), 1)


# ---- reliability ------------------------------------------------------------------------------------

def test_genetic_refuses_huge_sizes_before_any_work():
    rng = np.random.default_rng(0)
    layer = search.Layer.from_dense(rng.standard_normal((16, 128)), rng.standard_normal((128, 16, 4)), top_k=8,
                                    renormalize=True, r_max=32)
    with pytest.raises(ValueError, match="population must be in"):
        layer.genetic(32, population=2**61, generations=1)
    with pytest.raises(ValueError, match="generations must be in"):
        layer.genetic(32, generations=2**40)
    with pytest.raises(ValueError, match="k_best must be in"):
        layer.genetic(32, k_best=2**40)
    with pytest.raises(ValueError, match="k_best must be in"):
        layer.exhaustive(1, k_best=2**62)


def test_huge_population_in_c_is_a_memory_error_not_a_crash():
    code = textwrap.dedent("""
        import numpy as np
        from moei2 import search
        rng = np.random.default_rng(0)
        L = search.Layer.from_dense(rng.standard_normal((16, 128)), rng.standard_normal((128, 16, 4)),
                                    top_k=8, renormalize=True, r_max=32)
        for population in (2**40, 2**39 + 7):
            try:
                L._cache.genetic(r=32, k_best=1, population=population, generations=1, elite_count=1,
                                 mutation_rate=0.3, seed=0, num_threads=1)
            except MemoryError as exc:
                print("MemoryError", exc)
            else:
                raise SystemExit("no error")
        try:
            L._cache.genetic(r=32, k_best=1, population=2**61, generations=1, elite_count=1,
                             mutation_rate=0.3, seed=0, num_threads=1)
        except ValueError as exc:
            print("ValueError", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=OUTSIDE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("MemoryError") == 2 and "population must be in" in proc.stdout


def test_float_values_appear_in_messages():
    imp = np.ones(3)
    rows = np.full(3, 8, dtype=np.int64)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 1\.5"):
        _core.allocate_ranks(imp, rows, rows, None, 1.5, 0.15, 1e-8)
    with pytest.raises(ValueError, match=r"alpha must be finite and >= 0, got -0\.25"):
        _core.allocate_ranks(imp, rows, rows, 2.0, None, -0.25, 1e-8)
    with pytest.raises(ValueError, match=r"avg_rank must be finite and > 0, got inf"):
        _core.allocate_ranks(imp, rows, rows, float("inf"), None, 0.15, 1e-8)
    # a Gram that passes the O(n^2) screens but has a negative eigenvalue
    gram = np.array([[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 1.0]])
    assert np.linalg.eigvalsh(gram)[0] < -0.5
    with pytest.raises(ValueError, match="not positive semidefinite") as info:
        lowrank.decompose(np.eye(3), gram, 1)
    message = str(info.value)
    assert "%g" not in message and re.search(r"eigenvalue -\d", message), message


def test_from_moe_refuses_bad_scaling_and_renormalize():
    X, router, gu, down = moe_weights(9)
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scaling_factor"):
            search.Layer.from_moe(X, router, gu, down, top_k=2, renormalize=True, r_max=2, scaling_factor=bad)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="renormalize must be a bool"):
            search.Layer.from_moe(X, router, gu, down, top_k=2, renormalize=bad, r_max=2)


def test_allocate_ranks_keep_ratio_one():
    shapes = (1408, 2048)
    imp = np.linspace(0.1, 1.0, 8)
    ranks = lowrank.allocate_ranks(imp, shapes, keep_ratio=1.0)
    cap = 1408 * 2048 // (1408 + 2048)
    assert ranks.sum() == 8 * cap and ranks.max() == cap
    np.testing.assert_array_equal(ranks, ref.allocate_ranks_reference(imp, shapes, keep_ratio=1.0))


def test_prune_counts_with_a_denormal_importance_meets_the_budget_even_under_dash_o():
    imp = [5e-324, 1.0, 2.0, 1e-310]
    counts = search.prune_counts(imp, 8, 2, ratio=0.25)
    assert counts.sum() == 8 and np.all(counts <= 6)
    code = ("from moei2 import search; c = search.prune_counts([5e-324, 1.0, 2.0, 1e-310], 8, 2, ratio=0.25); "
            "print(int(c.sum()), int(c.max()))")
    proc = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60, cwd=OUTSIDE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["8", str(int(counts.max()))]


def test_concurrent_decompose_many_restores_the_blas_thread_count():
    before = moei2.set_blas_threads(2)
    try:
        rng = np.random.default_rng(0)
        items = [(rng.normal(size=(24, 16)), None, 4) for _ in range(6)]
        errors = []

        def work():
            try:
                for _ in range(15):
                    lowrank.decompose_many(items, num_threads=2)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert moei2.blas_info()["num_threads"] == 2
    finally:
        moei2.set_blas_threads(before)


def test_search_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import moei2.search, moei2.lowrank, moei2._threads; "
            "print(moei2._threads.num_threads() >= 1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=OUTSIDE)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
