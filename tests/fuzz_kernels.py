"""Throws random shapes, dtypes and extreme values at every public kernel entry point.

Run as a script (tests/test_fuzz_kernels.py runs it in a subprocess): each call either returns or
raises an ordinary Python exception; a crash (a signal) fails the test, and the last call printed
to stderr names the culprit. Valid arguments are built first and then one of them is replaced by
a hostile value, so the calls reach past the first check.
"""
import sys

import numpy as np

import moei2
from moei2 import _core, lowrank, search

rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
ITERATIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 600

SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 1e308, -1e308, 5e-324, -0.0, 0.0, 1.0, -1.0]
SPECIAL_INTS = [-1, 0, 1, 2, 3, 2**31, 2**32 + 1, 2**61, 2**63 - 1, 2**63, 2**64, -(2**63)]
DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint64, np.bool_, np.complex128, np.float16]


def hostile_array(like=None):
    if like is not None and like.size > 10**6:  # already hostile: only build small arrays from it
        like = None
    choice = rng.integers(9)
    if choice == 0 and like is not None:  # right shape, wrong dtype
        return np.zeros(like.shape, dtype=DTYPES[rng.integers(len(DTYPES))])
    if choice == 1 and like is not None and like.ndim >= 1 and like.shape[-1] > 1:  # non-contiguous
        return np.repeat(like, 2, axis=-1)[..., ::2]
    if choice == 2 and like is not None and like.size:  # extreme values
        bad = np.array(like, copy=True)
        if bad.dtype.kind == "f":
            bad.flat[rng.integers(bad.size)] = SPECIAL_FLOATS[rng.integers(len(SPECIAL_FLOATS))]
        elif bad.dtype.kind in "iu":
            bad.flat[rng.integers(bad.size)] = np.iinfo(bad.dtype).max
        return bad
    if choice == 3 and like is not None:  # read-only
        ro = np.array(like, copy=True)
        ro.setflags(write=False)
        return ro
    if choice == 4:  # a huge shape without memory behind it
        return np.lib.stride_tricks.as_strided(np.zeros(1), shape=(2**31, 2**20), strides=(0, 0))
    if choice == 5:  # empty
        shape = [int(rng.integers(0, 3)) for _ in range(int(rng.integers(1, 4)))]
        shape[rng.integers(len(shape))] = 0
        return np.zeros(shape, dtype=np.float64)
    if choice == 6 and like is not None and like.ndim:  # one dimension off
        shape = list(like.shape)
        shape[rng.integers(len(shape))] += int(rng.choice([-1, 1, 5]))
        return np.zeros([max(0, s) for s in shape], dtype=like.dtype)
    if choice == 7:
        return [SPECIAL_FLOATS[rng.integers(len(SPECIAL_FLOATS))]]
    ndim = int(rng.integers(0, 4))
    return rng.normal(size=[int(rng.integers(0, 5)) for _ in range(ndim)]).astype(DTYPES[rng.integers(len(DTYPES))])


def hostile_scalar():
    kind = rng.integers(5)
    if kind == 0:
        return SPECIAL_INTS[rng.integers(len(SPECIAL_INTS))]
    if kind == 1:
        return SPECIAL_FLOATS[rng.integers(len(SPECIAL_FLOATS))]
    if kind == 2:
        return [None, True, False, "3", b"x", object()][rng.integers(6)]
    if kind == 3:
        return np.int64(SPECIAL_INTS[rng.integers(len(SPECIAL_INTS))] % 2**63)
    return hostile_array()


def mutate(args):
    """Replaces one argument (positional or keyword) by a hostile value."""
    args = dict(args)
    key = list(args)[rng.integers(len(args))]
    value = args[key]
    args[key] = hostile_array(value) if isinstance(value, np.ndarray) else hostile_scalar()
    return args


E, N, d, k, r_max, H, F = 8, 24, 6, 2, 3, 10, 4
logits = 1.5 * rng.normal(size=(N, E))
outputs = rng.normal(size=(E, N, d))
X = rng.normal(size=(N, H)).astype(np.float32)
router = rng.normal(size=(E, H)).astype(np.float32)
gu = (0.3 * rng.normal(size=(E, 2 * F, H))).astype(np.float32)
dn = (0.3 * rng.normal(size=(E, H, F))).astype(np.float32)


def complete_cache(renormalize=False):
    cache = _core.SearchCache(logits, top_k=k, r_max=r_max, renormalize=renormalize, scaling_factor=1.0,
                              batch_ends=np.array([10, N], dtype=np.int64))
    cand = cache.candidates(0, N)
    cache.factor_outputs(np.ascontiguousarray(outputs[cand, np.arange(N)[:, None]]), 0, 2)
    return cache


caches = [complete_cache(False), complete_cache(True)]
W_ = rng.normal(size=(7, 5))
G_ = (lambda x: x.T @ x)(rng.normal(size=(9, 5)))


def entries():
    cache = caches[rng.integers(2)]
    fresh = _core.SearchCache(logits, top_k=k, r_max=r_max, renormalize=False, scaling_factor=1.0,
                              batch_ends=np.array([N], dtype=np.int64))
    mask = np.zeros((3, 1), dtype=np.uint64)
    mask[0, 0] = 0b11
    return {
        "lowrank_decompose": (_core.lowrank_decompose,
                              dict(W=W_, gram=G_, rank=2, A=np.zeros((7, 2)), B=np.zeros((2, 5)))),
        "lowrank_decompose_many": (lambda items, num_threads: _core.lowrank_decompose_many(items, num_threads),
                                   dict(items=[(W_, G_, 2)], num_threads=2)),
        "allocate_ranks": (lambda **a: _core.allocate_ranks(*a.values()),
                           dict(importance=np.ones(3), rows=np.full(3, 8, dtype=np.int64),
                                cols=np.full(3, 9, dtype=np.int64), avg=2.0, keep=None, alpha=0.15, eps=1e-8)),
        "candidate_outputs": (_core.candidate_outputs,
                              dict(X=X, candidates=rng.integers(0, E, size=(N, 3)), gate_up_proj=gu, down_proj=dn,
                                   num_threads=2)),
        "SearchCache": (_core.SearchCache,
                        dict(router_logits=logits, top_k=k, r_max=r_max, renormalize=False, scaling_factor=1.0,
                             batch_ends=np.array([N], dtype=np.int64))),
        "candidates": (fresh.candidates, dict(first=0, count=N)),
        "factor_outputs": (fresh.factor_outputs,
                           dict(outputs=rng.normal(size=(N, k + r_max, d)), first=0, num_threads=2)),
        "factor_moe": (fresh.factor_moe, dict(X=X, gate_up_proj=gu, down_proj=dn, first=0, count=N, num_threads=2)),
        "loss": (cache.loss, dict(masks=mask, num_threads=2)),
        "importance": (cache.importance, dict(num_threads=2)),
        "greedy": (cache.greedy, dict(r=2, num_threads=2)),
        "exhaustive": (cache.exhaustive, dict(r=2, k_best=3, num_threads=2)),
        "genetic": (cache.genetic, dict(r=2, k_best=3, population=10, generations=3, elite_count=2,
                                        mutation_rate=0.3, seed=1, num_threads=2)),
        "route": (search.route, dict(router_logits=logits, top_k=2, renormalize=True, scaling_factor=1.0)),
        "from_dense": (search.Layer.from_dense,
                       dict(router_logits=logits, expert_outputs=outputs, top_k=2, renormalize=False, r_max=3)),
        "from_moe": (search.Layer.from_moe,
                     dict(X=X, router_weight=router, gate_up_proj=gu, down_proj=dn, top_k=2, renormalize=True,
                          r_max=3)),
        "from_candidate_outputs": (search.Layer.from_candidate_outputs,
                                   dict(router_logits=logits, top_k=2, renormalize=False, r_max=3,
                                        candidate_outputs=lambda c, f: outputs[c, np.arange(f, f + len(c))[:, None]])),
        "Layer.genetic": (search.Layer(cache).genetic, dict(r=2, k_best=2, population=8, generations=2)),
        "prune_counts": (search.prune_counts, dict(layer_importance=np.array([1.0, 2.0]), num_experts=8, top_k=2)),
        "decompose": (lowrank.decompose, dict(W=W_, gram=G_, rank=2)),
        "decompose_many": (lowrank.decompose_many, dict(items=[(W_, G_, 2)])),
        "lowrank.allocate_ranks": (lowrank.allocate_ranks, dict(importance=np.ones(3), shapes=(8, 9), avg_rank=2.0)),
        "set_blas_threads": (moei2.set_blas_threads, dict(num_threads=2)),
    }


blas_threads = moei2.blas_info()["num_threads"]
names = list(entries())
for i in range(ITERATIONS):
    table = entries()
    name = names[i % len(names)]
    fn, args = table[name]
    if i >= len(names):  # the first round runs every entry with valid arguments
        args = mutate(args)
        if rng.random() < 0.3:
            args = mutate(args)
    print(f"{i} {name} {sorted(args)}", file=sys.stderr, flush=True)
    try:
        fn(**args)
    except (ValueError, TypeError, MemoryError, OverflowError, RuntimeError, IndexError, ZeroDivisionError):
        pass
    if name == "set_blas_threads":
        moei2.set_blas_threads(blas_threads)
print("ok", ITERATIONS)
