"""moei2.lowrank against the float64 NumPy oracles of moei2._reference."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import moei2
from moei2 import _reference as ref
from moei2.lowrank import allocate_ranks, decompose, decompose_many

SOLVER_MRRR, SOLVER_DC, SOLVER_QR_ITERATION = 1, 2, 4


def activations(rng, rows, n, outliers=2, scale=50.0):
    """Token activations with a few outlier channels, as in real LLM hidden states."""
    x = rng.standard_normal((rows, n))
    x[:, rng.choice(n, size=min(outliers, n), replace=False)] *= scale
    return x


def weight(rng, m, n, dtype=np.float64):
    # A decaying spectrum plus noise, so that truncation matters.
    k = min(m, n)
    w = (rng.standard_normal((m, k)) * (0.7 ** np.arange(k) + 0.05)) @ rng.standard_normal((k, n)) / np.sqrt(n)
    return w.astype(dtype)


def loss_close(loss, oracle, energy, rtol=1e-5):
    """|loss - oracle| <= rtol * oracle, with an absolute floor of 1e-7 * energy: when the exact
    loss is 0 both sides are rounding noise of order sqrt(k * eps) * energy."""
    return abs(loss - oracle) <= rtol * oracle + 1e-7 * energy


SHAPES = [(12, 30), (30, 12), (20, 20), (1, 7), (7, 1), (64, 40), (33, 65)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_decompose_matches_oracle(shape, dtype):
    rng = np.random.default_rng(sum(shape) + (dtype == np.float32))
    m, n = shape
    w = weight(rng, m, n, dtype)
    x = activations(rng, 3 * n + 5, n)
    gram = x.T @ x
    for rank in sorted({1, max(1, min(m, n) // 3), min(m, n)}):
        a, b, info = decompose(w, gram, rank, return_info=True)
        assert a.dtype == dtype and b.dtype == dtype
        assert a.shape == (m, rank) and b.shape == (rank, n)
        _, _, loss_eigh = ref.decompose_reference(w, gram, rank, method="eigh")
        _, _, loss_white = ref.decompose_reference(w, gram, rank, method="whitened")
        assert loss_close(info["loss"], loss_eigh, info["energy"])
        assert loss_close(info["loss"], loss_white, info["energy"])
        # The loss of the returned factors, measured directly from X (not from the Gram).
        achieved = np.linalg.norm((w.astype(np.float64) - a.astype(np.float64) @ b.astype(np.float64)) @ x.T)
        tol = 1e-9 if dtype == np.float64 else 2e-4
        assert achieved <= loss_eigh * (1 + tol) + tol * info["energy"]
        assert info["route"] == ("left-gram" if m <= n else "qr")
        assert info["whitened"] and not info["gram_is_zero"] and info["fallback"] == ""
        assert_allclose(info["energy"], np.linalg.norm(w.astype(np.float64) @ x.T), rtol=1e-9)
        # A has orthonormal columns and B = A^T W.
        atol = 1e-12 if dtype == np.float64 else 1e-5
        assert_allclose(a.T.astype(np.float64) @ a, np.eye(rank), atol=atol * 10)
        assert_allclose(b, a.T @ w, rtol=1e-5, atol=atol * 10 * np.abs(w).max())


@pytest.mark.parametrize("shape", [(10, 25), (25, 10), (16, 16)])
def test_subspace_matches_oracle_when_spectrum_separated(shape):
    rng = np.random.default_rng(7)
    m, n = shape
    w = weight(rng, m, n)
    x = activations(rng, 100, n)
    gram = x.T @ x
    rank = 4
    a, b, _ = decompose(w, gram, rank, return_info=True)
    a_ref, b_ref, _ = ref.decompose_reference(w, gram, rank)
    # Compare the projections (eigenvector signs are arbitrary).
    assert_allclose(a @ b, a_ref @ b_ref, atol=1e-9 * np.abs(w).max())


def test_rank_deficient_gram():
    rng = np.random.default_rng(1)
    m, n = 24, 40
    w = weight(rng, m, n)
    x = activations(rng, 5, n)  # 5 tokens: Gram of rank 5
    gram = x.T @ x
    for dtype in (np.float32, np.float64):
        for rank in (2, 5, 9, 24):
            a, b, info = decompose(w.astype(dtype), gram, rank, return_info=True)
            assert np.isfinite(a).all() and np.isfinite(b).all()
            _, _, oracle = ref.decompose_reference(w, gram, rank, method="whitened")
            assert loss_close(info["loss"], oracle, info["energy"])
            if rank >= 5:  # rank >= rank(G): the weighted error vanishes
                assert info["loss"] <= 1e-6 * info["energy"]
                achieved = np.linalg.norm((w - a.astype(np.float64) @ b.astype(np.float64)) @ x.T)
                assert achieved <= (1e-9 if dtype == np.float64 else 1e-4) * info["energy"]


def test_tall_rank_deficient_gram_qr_route():
    rng = np.random.default_rng(2)
    m, n = 50, 20
    w = weight(rng, m, n)
    x = activations(rng, 6, n)
    gram = x.T @ x
    a, b, info = decompose(w, gram, 3, return_info=True)
    assert info["route"] == "qr"
    _, _, oracle = ref.decompose_reference(w, gram, 3)
    assert loss_close(info["loss"], oracle, info["energy"])


@pytest.mark.parametrize("shape", [(8, 13), (13, 8)])
def test_zero_gram_gives_plain_truncation_and_zero_loss(shape):
    rng = np.random.default_rng(3)
    w = weight(rng, *shape)
    a, b, info = decompose(w, np.zeros((shape[1], shape[1])), 3, return_info=True)
    assert info["gram_is_zero"] and not info["whitened"]
    assert info["loss"] == 0.0 and info["energy"] == 0.0
    a0, b0 = decompose(w, None, 3)
    assert_array_equal(a @ b, a0 @ b0)


def test_zero_weight():
    for shape in [(6, 9), (9, 6)]:
        w = np.zeros(shape)
        x = activations(np.random.default_rng(4), 20, shape[1])
        a, b, info = decompose(w, x.T @ x, 2, return_info=True)
        assert np.isfinite(a).all() and np.isfinite(b).all()
        assert info["loss"] == 0.0
        assert_array_equal(b, 0.0)


def test_gram_with_zero_rows_and_columns():
    # Channels never seen by the expert: exact zeros in G.
    rng = np.random.default_rng(5)
    n = 18
    x = activations(rng, 40, n)
    x[:, [0, 4, 9]] = 0.0
    w = weight(rng, 10, n)
    _, _, info = decompose(w, x.T @ x, 4, return_info=True)
    _, _, oracle = ref.decompose_reference(w, x.T @ x, 4, method="whitened")
    assert loss_close(info["loss"], oracle, info["energy"])


@pytest.mark.parametrize("shape", [(15, 26), (26, 15), (11, 11)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_none_equals_truncated_svd(shape, dtype):
    rng = np.random.default_rng(6)
    w = weight(rng, *shape, dtype=dtype)
    rank = 5
    a, b, info = decompose(w, None, rank, return_info=True)
    assert not info["whitened"] and not info["gram_is_zero"]
    u, s, vt = np.linalg.svd(w.astype(np.float64))
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    tol = 1e-10 if dtype == np.float64 else 1e-5
    assert_allclose(a.astype(np.float64) @ b.astype(np.float64), best, atol=tol * s[0])
    assert_allclose(info["loss"], np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-6)
    assert_allclose(info["energy"], np.linalg.norm(w.astype(np.float64)), rtol=1e-6)


def test_float32_gram_is_converted():
    rng = np.random.default_rng(8)
    w = weight(rng, 9, 14)
    x = activations(rng, 50, 14)
    g32 = (x.T @ x).astype(np.float32)
    a1, b1, i1 = decompose(w, g32, 3, return_info=True)
    a2, b2, i2 = decompose(w, g32.astype(np.float64), 3, return_info=True)
    assert_array_equal(a1, a2)
    assert i1["loss"] == i2["loss"]


def test_non_contiguous_and_read_only_inputs_are_fine():
    rng = np.random.default_rng(9)
    w = np.asfortranarray(weight(rng, 12, 20))
    x = activations(rng, 50, 20)
    gram = x.T @ x
    gram.setflags(write=False)
    a, b = decompose(w, gram, 4)
    a2, b2 = decompose(np.ascontiguousarray(w), np.array(gram), 4)
    assert_array_equal(a, a2)
    assert_array_equal(b, b2)


def test_out_arrays_are_filled_in_place():
    rng = np.random.default_rng(10)
    w = weight(rng, 8, 12, np.float32)
    out = (np.empty((8, 3), np.float32), np.empty((3, 12), np.float32))
    a, b = decompose(w, None, 3, out=out)
    assert a is out[0] and b is out[1]


def test_fallback_chain_is_used_and_reported():
    rng = np.random.default_rng(11)
    for shape in [(10, 16), (16, 10)]:
        w = weight(rng, *shape)
        x = activations(rng, 40, shape[1])
        gram = x.T @ x
        _, _, base = decompose(w, gram, 3, return_info=True)
        assert base["solver"] == "dsytrd+dstemr" and base["fallback"] == ""
        _, _, dc = decompose(w, gram, 3, return_info=True, _skip_solvers=SOLVER_MRRR)
        assert dc["solver"] == "dsyevd" and "dsytrd+dstemr skipped" in dc["fallback"] and "used dsyevd" in dc["fallback"]
        _, _, qr = decompose(w, gram, 3, return_info=True, _skip_solvers=SOLVER_MRRR | SOLVER_DC)
        assert qr["solver"] == "dsyev" and "used dsyev" in qr["fallback"]
        for info in (dc, qr):
            assert_allclose(info["loss"], base["loss"], rtol=1e-8)
        with pytest.raises(RuntimeError, match="every symmetric eigensolver failed"):
            decompose(w, gram, 3, _skip_solvers=SOLVER_MRRR | SOLVER_DC | SOLVER_QR_ITERATION)


def make_items(rng):
    items = []
    for i, (m, n) in enumerate([(20, 30), (30, 20), (25, 25), (5, 40), (40, 5), (16, 24)]):
        dtype = np.float32 if i % 2 else np.float64
        x = activations(rng, 60, n)
        gram = x.T @ x if i != 4 else None
        items.append((weight(rng, m, n, dtype), gram, 1 + i % min(m, n)))
    return items


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_decompose_many_is_bitwise_identical_to_decompose(num_threads):
    rng = np.random.default_rng(12)
    items = make_items(rng)
    batch = decompose_many(items, return_info=True, num_threads=num_threads)
    assert len(batch) == len(items)
    for (w, g, r), (a, b, info) in zip(items, batch):
        a1, b1, info1 = decompose(w, g, r, return_info=True)
        assert_array_equal(a, a1)
        assert_array_equal(b, b1)
        assert info == info1


def test_decompose_many_identity_with_multithreaded_blas():
    # decompose on the caller's thread may use several BLAS threads; the batch uses one each.
    rng = np.random.default_rng(13)
    items = [(weight(rng, 300, 200), None, 40), (weight(rng, 200, 300), None, 40)]
    x = activations(rng, 400, 300)
    items.append((weight(rng, 150, 300), x.T @ x, 30))
    before = moei2.set_blas_threads(2)
    try:
        singles = [decompose(w, g, r) for w, g, r in items]
    finally:
        moei2.set_blas_threads(before)
    for (a, b), (a1, b1) in zip(decompose_many(items, num_threads=2), singles):
        assert_array_equal(a, a1)
        assert_array_equal(b, b1)
    assert moei2.blas_info()["num_threads"] == before


def test_decompose_many_accepts_dicts_generators_and_empty():
    rng = np.random.default_rng(14)
    w = weight(rng, 6, 9)
    out = decompose_many(({"W": w, "gram": None, "rank": 2} for _ in range(3)), num_threads=2)
    assert len(out) == 3 and all(a.shape == (6, 2) for a, _ in out)
    assert decompose_many([]) == []
    (a, b), = decompose_many([{"weight": w, "rank": 3}])
    assert a.shape == (6, 3)


def test_decompose_many_fallback_recorded():
    rng = np.random.default_rng(15)
    items = make_items(rng)[:3]
    out = decompose_many(items, return_info=True, _skip_solvers=SOLVER_MRRR)
    assert all(info["solver"] == "dsyevd" and info["fallback"] for _, _, info in out)


# ---- allocate_ranks ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_allocate_ranks_matches_oracle(seed):
    rng = np.random.default_rng(100 + seed)
    count = int(rng.integers(2, 40))
    importance = rng.gamma(0.5, 2.0, size=count) * 10.0 ** rng.uniform(-3, 3)
    importance[rng.random(count) < 0.2] = 0.0
    shapes = [(int(rng.integers(4, 200)), int(rng.integers(4, 200))) for _ in range(count)]
    caps = np.array([m * n // (m + n) for m, n in shapes])
    for alpha in (0.0, 0.15, 1.0, 3.0):
        for avg in (1.0, 0.3 * caps.mean(), 0.9 * caps.mean()):
            ranks = allocate_ranks(importance, shapes, avg_rank=avg, alpha=alpha)
            assert ranks.dtype == np.int64
            assert_array_equal(ranks, ref.allocate_ranks_reference(importance, shapes, avg_rank=avg, alpha=alpha))
            assert ranks.sum() == int(np.floor(avg * count + 0.5))
            assert (ranks >= 1).all() and (ranks <= caps).all()
        for keep in (0.2, 0.7):
            # With mixed shapes sum(m n) / sum(m + n) can exceed the average cap: then both refuse.
            try:
                expected = ref.allocate_ranks_reference(importance, shapes, keep_ratio=keep, alpha=alpha)
            except ValueError:
                with pytest.raises(ValueError, match="exceeds"):
                    allocate_ranks(importance, shapes, keep_ratio=keep, alpha=alpha)
                continue
            assert_array_equal(allocate_ranks(importance, shapes, keep_ratio=keep, alpha=alpha), expected)


def test_allocate_ranks_proportionality_and_budget():
    importance = np.array([1.0, 10.0, 100.0, 1000.0])
    ranks = allocate_ranks(importance, (1408, 2048), avg_rank=400, alpha=0.15)
    assert ranks.sum() == 1600
    assert (np.diff(ranks) > 0).all()  # more important experts get more rank
    w = (importance + 1e-8) ** 0.15
    assert (np.abs(ranks - w / w.sum() * 1600) < 1.0 + 1e-9).all()
    # alpha = 0: uniform
    assert_array_equal(allocate_ranks(importance, (1408, 2048), avg_rank=400, alpha=0.0), [400] * 4)


def test_allocate_ranks_keep_ratio_keeps_that_fraction():
    shapes = [(1408, 2048)] * 8
    ranks = allocate_ranks(np.arange(1.0, 9.0), shapes, keep_ratio=0.4)
    kept = sum(r * (m + n) for r, (m, n) in zip(ranks, shapes))
    assert abs(kept / sum(m * n for m, n in shapes) - 0.4) < 1e-3


def test_allocate_ranks_clamps_to_cap_and_redistributes():
    # One expert would get far more than its cap; the excess goes to the others.
    importance = np.array([1e6, 1.0, 1.0])
    shapes = [(4, 4), (100, 100), (100, 100)]  # caps 2, 50, 50
    ranks = allocate_ranks(importance, shapes, avg_rank=20, alpha=1.0)
    assert ranks[0] == 2 and ranks.sum() == 60
    assert_array_equal(ranks, ref.allocate_ranks_reference(importance, shapes, avg_rank=20, alpha=1.0))
    # Clamping up to 1 overshoots: units are taken back from the experts above 1.
    importance = np.array([1.0] + [1e-12] * 4)
    ranks = allocate_ranks(importance, [(50, 50)] * 5, avg_rank=2, alpha=1.0, eps=0.0)
    assert ranks.sum() == 10 and (ranks >= 1).all()
    assert_array_equal(ranks, ref.allocate_ranks_reference(importance, [(50, 50)] * 5, avg_rank=2, alpha=1.0, eps=0.0))


# ---- bad input -----------------------------------------------------------------------------


def test_decompose_bad_input():
    rng = np.random.default_rng(16)
    w = weight(rng, 6, 8)
    g = np.eye(8)
    cases = [
        ((w.astype(np.int32), g, 2), TypeError, "W must have dtype"),
        ((w.astype(np.float16), g, 2), TypeError, "W must have dtype"),
        ((w[0], g, 2), ValueError, "W must be 2-dimensional"),
        ((w[None], g, 2), ValueError, "W must be 2-dimensional"),
        ((np.zeros((0, 8)), None, 1), ValueError, "W must not be empty"),
        ((w, np.eye(7), 2), ValueError, r"gram must have shape \(8, 8\)"),
        ((w, np.eye(8)[:, :7], 2), ValueError, "gram must have shape"),
        ((w, np.eye(8).astype(np.int64), 2), TypeError, "gram must have dtype"),
        ((w, g, 0), ValueError, "rank must be in"),
        ((w, g, 7), ValueError, "rank must be in"),
        ((w, g, -1), ValueError, "rank must be in"),
        ((w, g, 2.0), TypeError, "rank must be an integer"),
        ((w, g, True), TypeError, "rank must be an integer"),
        ((w, g, None), TypeError, "rank is required"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            decompose(*args)
    bad = w.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        decompose(bad, g, 2)
    bad_g = g.copy()
    bad_g[3, 3] = np.inf
    with pytest.raises(ValueError, match="gram contains NaN or Inf"):
        decompose(w, bad_g, 2)
    asym = g.copy()
    asym[0, 1] = 0.5
    with pytest.raises(ValueError, match="gram is not a Gram matrix.*not symmetric"):
        decompose(w, asym, 2)
    neg = -np.eye(8)
    with pytest.raises(ValueError, match="gram is not a Gram matrix.*negative diagonal"):
        decompose(w, neg, 2)
    big = np.eye(8)
    big[0, 1] = big[1, 0] = 2.0
    with pytest.raises(ValueError, match=r"gram is not a Gram matrix.*\|G_ij\|"):
        decompose(w, big, 2)
    # Passes the O(n^2) checks but is indefinite: caught from the spectrum.
    indefinite = np.array([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]])
    with pytest.raises(ValueError, match="not positive semidefinite"):
        decompose(np.eye(3), indefinite, 1)


def test_decompose_bad_out_arrays():
    w = np.ones((4, 6), np.float32)
    good_b = np.empty((2, 6), np.float32)
    read_only = np.empty((4, 2), np.float32)
    read_only.setflags(write=False)
    cases = [
        ((read_only, good_b), ValueError, r"out\[0\] \(A\) must be writeable"),
        ((np.empty((2, 4), np.float32).T, good_b), ValueError, r"out\[0\] \(A\) must be C-contiguous"),
        ((np.empty((4, 2), np.float64), good_b), TypeError, r"out\[0\] \(A\) must have the dtype of W"),
        ((np.empty((4, 3), np.float32), good_b), ValueError, r"out\[0\] \(A\) must have shape \(4, 2\)"),
        ((np.empty((4, 2), np.float32), np.empty((6, 2), np.float32)), ValueError, r"out\[1\] \(B\) must have shape"),
        ((np.empty((4, 2), np.float32), [[0.0] * 6] * 2), TypeError, r"out\[1\] \(B\) must be a numpy.ndarray"),
    ]
    for out, exc, match in cases:
        with pytest.raises(exc, match=match):
            decompose(w, None, 2, out=out)
    with pytest.raises(TypeError, match="out must be a pair"):
        decompose(w, None, 2, out=np.empty((4, 2), np.float32))
    big = np.zeros(20, np.float32)
    overlapping = (big[:8].reshape(4, 2), big[4:16].reshape(2, 6))
    with pytest.raises(ValueError, match="must not share memory"):
        decompose(w, None, 2, out=overlapping)
    with pytest.raises(ValueError, match="must not share memory"):
        decompose(big[:12].reshape(2, 6), None, 2, out=(np.empty((2, 2), np.float32), big[6:18].reshape(2, 6)))


def test_decompose_many_bad_input():
    w = np.ones((4, 6))
    with pytest.raises(TypeError, match=r"items\[1\] must be a \(W, gram, rank\) tuple"):
        decompose_many([(w, None, 2), (w, None)])
    with pytest.raises(ValueError, match=r"items\[1\]: rank must be in"):
        decompose_many([(w, None, 2), (w, None, 5)])
    with pytest.raises(ValueError, match=r"items\[0\]: gram must have shape"):
        decompose_many([(w, np.eye(4), 2)])
    with pytest.raises(TypeError, match=r"items\[0\]: W must have dtype"):
        decompose_many([(w.astype(int), None, 2)])
    with pytest.raises(ValueError, match=r"items\[0\] has unknown keys"):
        decompose_many([{"W": w, "rank": 2, "grm": None}])
    with pytest.raises(TypeError, match="items must be an iterable"):
        decompose_many(w)
    with pytest.raises(ValueError, match="num_threads must be in"):
        decompose_many([(w, None, 2)], num_threads=0)
    with pytest.raises(TypeError, match="num_threads must be an integer"):
        decompose_many([(w, None, 2)], num_threads=2.0)


def test_allocate_ranks_bad_input():
    imp = np.array([1.0, 2.0])
    shapes = [(10, 10), (10, 10)]
    cases = [
        (dict(avg_rank=2, keep_ratio=0.5), ValueError, "exactly one of avg_rank and keep_ratio"),
        (dict(), ValueError, "exactly one of avg_rank and keep_ratio"),
        (dict(avg_rank=0.0), ValueError, "avg_rank must be finite and > 0"),
        (dict(avg_rank=True), TypeError, "avg_rank must be a real number"),
        (dict(keep_ratio=1.5), ValueError, "keep_ratio must be in"),
        (dict(keep_ratio=0.0), ValueError, "keep_ratio must be in"),
        (dict(avg_rank=0.2), ValueError, "below the 2 experts"),
        (dict(avg_rank=6), ValueError, "exceeds 10"),
        (dict(avg_rank=2, alpha=-1.0), ValueError, "alpha must be finite and >= 0"),
        (dict(avg_rank=2, eps=float("nan")), ValueError, "eps must be finite and >= 0"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            allocate_ranks(imp, shapes, **kwargs)
    with pytest.raises(ValueError, match="importance must be >= 0"):
        allocate_ranks(np.array([1.0, -1.0]), shapes, avg_rank=2)
    with pytest.raises(ValueError, match="importance contains NaN"):
        allocate_ranks(np.array([1.0, np.nan]), shapes, avg_rank=2)
    with pytest.raises(ValueError, match="importance must be 1-dimensional"):
        allocate_ranks(np.ones((2, 1)), shapes, avg_rank=2)
    with pytest.raises(ValueError, match="importance must not be empty"):
        allocate_ranks(np.array([]), [], avg_rank=2)
    with pytest.raises(TypeError, match="importance must hold real numbers"):
        allocate_ranks(np.array(["a", "b"]), shapes, avg_rank=2)
    with pytest.raises(ValueError, match="one \\(m, n\\) per expert"):
        allocate_ranks(imp, [(10, 10)] * 3, avg_rank=2)
    with pytest.raises(TypeError, match="shapes must hold integers"):
        allocate_ranks(imp, [(10.0, 10.0)] * 2, avg_rank=2)
    with pytest.raises(ValueError, match="shapes must be positive"):
        allocate_ranks(imp, [(10, 0)] * 2, avg_rank=2)
    with pytest.raises(ValueError, match="shapes must be a sequence"):
        allocate_ranks(imp, [10, 10, 10], avg_rank=2)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (20, 20)])
def test_report_spectrum_of_either_side(shape):
    """The report's whitened spectrum, taken on the smaller side of a tall weight, is the top
    min(m, n) of the eigenvalues of W G W^T; the plain one is the singular values."""
    from moei2.stages.decomposition import _spectra

    rng = np.random.default_rng(3)
    m, n = shape
    w = weight(rng, m, n)
    x = activations(rng, 200, n)
    gram = x.T @ x
    (item,) = _spectra(2, w.astype(np.float32), gram, "gate", 0)
    w64 = w.astype(np.float32).astype(np.float64)
    want = np.sqrt(np.clip(np.linalg.eigvalsh(w64 @ gram @ w64.T)[::-1], 0.0, None))[: min(m, n)]
    assert (item["layer"], item["expert"], item["matrix"]) == (2, 0, "gate")
    assert_allclose(item["whitened"], want, rtol=1e-9, atol=1e-9 * want[0])
    assert_allclose(item["plain"], np.linalg.svd(w64, compute_uv=False), rtol=1e-12)
