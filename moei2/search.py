"""Inter-expert pruning: the routing rule under pruning, the exact per-layer loss L(S), expert
importance, per-layer prune counts and the subset searches (genetic, exhaustive, greedy).

Routing under pruning (one rule, used by the search, the block step and the saved model): the
router logits of dropped experts become -inf, the softmax runs over the survivors, each token
takes its top-k survivors (ties to the lower expert index), the k weights are divided by their
sum if the model renormalises, then multiplied by the scaling factor. Removing those experts'
rows from a Hugging Face router (Mixtral, Qwen2-MoE, DeepSeek-V2 greedy) routes identically.

L(S) = sum over calibration batches b of ||Y_b - Y_b,S||_F, with Y the routed part of the MoE
output (shared experts excluded: they do not depend on S), accumulated in float64.

A :class:`Layer` caches, per token, only its C = k + r_max best experts by router score (the
only experts it can be re-routed to when at most r_max are dropped) as the triangular QR factor
of their output vectors, so scoring a mask never touches the hidden size. The kernels are in
C (csrc/fitness.c, importance.c, genetic.c); moei2._reference holds the float64 oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import _core

__all__ = ["route", "Layer", "SearchResult", "prune_counts"]


# ---- routing ---------------------------------------------------------------------------------

def route(router_logits, top_k: int, renormalize: bool, scaling_factor: float = 1.0, dropped=None):
    """Routes tokens with some experts removed.

    router_logits: [N, E] finite logits. dropped: None, a bool mask [E] (True = dropped) or a
    sequence of expert indices. Returns ``(indices [N, k] int64, weights [N, k] float64)``, the
    experts in order of decreasing probability (ties to the lower index).
    """
    z = np.asarray(router_logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"router_logits must be 2-dimensional [tokens, experts], got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("router_logits contains NaN or Inf")
    N, E = z.shape
    drop = _dropped_mask(dropped, E)
    top_k = int(top_k)
    if not 1 <= top_k <= E - int(drop.sum()):
        raise ValueError(f"top_k must be in [1, {E - int(drop.sum())}] (experts left), got {top_k}")
    z = z.copy()
    z[:, drop] = -np.inf
    order = np.argsort(-z, axis=1, kind="stable")[:, :top_k]
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    p = e / e.sum(axis=1, keepdims=True)
    w = np.take_along_axis(p, order, axis=1)
    if renormalize:
        w = w / w.sum(axis=1, keepdims=True)
    return order.astype(np.int64), w * float(scaling_factor)


def _dropped_mask(dropped, num_experts: int) -> np.ndarray:
    if dropped is None:
        return np.zeros(num_experts, dtype=bool)
    d = np.asarray(dropped)
    if d.dtype == bool:
        if d.shape != (num_experts,):
            raise ValueError(f"dropped as a mask must have shape ({num_experts},), got {d.shape}")
        return d.copy()
    if d.size and (not np.issubdtype(d.dtype, np.integer) or d.min() < 0 or d.max() >= num_experts):
        raise ValueError(f"dropped must hold expert indices in [0, {num_experts}), got {dropped!r}")
    mask = np.zeros(num_experts, dtype=bool)
    mask[d.astype(np.int64).ravel()] = True
    return mask


# ---- results -----------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """The best distinct masks a search found.

    masks: bool [K, E] (True = dropped), sorted by increasing loss (ties by the sorted dropped
    index lists). losses: float64 [K]. history: ``{"best": [...], "mean": [...]}`` per
    generation for the genetic search (per step for greedy, empty for exhaustive).
    evaluations: distinct masks scored.
    """

    masks: np.ndarray
    losses: np.ndarray
    history: dict = field(default_factory=lambda: {"best": [], "mean": []})
    evaluations: int = 0


# ---- the per-layer cache -----------------------------------------------------------------------

def _num_threads() -> int:
    from ._threads import num_threads

    return num_threads()


def _batch_ends(batch_sizes, num_tokens: int) -> np.ndarray:
    if batch_sizes is None:
        return np.array([num_tokens], dtype=np.int64)
    sizes = np.asarray(list(batch_sizes))
    if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(sizes.dtype, np.integer) or np.any(sizes < 1):
        raise ValueError(f"batch_sizes must be a non-empty list of positive token counts, got {batch_sizes!r}")
    if int(sizes.sum()) != num_tokens:
        raise ValueError(f"batch_sizes must sum to the number of tokens {num_tokens}, got {int(sizes.sum())}")
    return np.ascontiguousarray(np.cumsum(sizes), dtype=np.int64)


def _check_int(value, name: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _float_array(value, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {a.shape}")
    if not _all_finite(a):
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def _all_finite(a: np.ndarray, block: int = 1 << 22) -> bool:
    """np.isfinite(a).all() over blocks of a contiguous array: an expert weight tensor is gigabytes,
    and its whole boolean mask would be a quarter of that again."""
    flat = a.reshape(-1) if a.flags.c_contiguous else None
    if flat is None or flat.size <= block:
        return bool(np.isfinite(a).all())
    return all(np.isfinite(flat[s:s + block]).all() for s in range(0, flat.size, block))


# Candidate outputs are factored in chunks of at most this many bytes: the memory the cache
# construction holds beyond the cache and the inputs (from_moe's C kernel adds its panel scratch
# per thread, csrc/factor.c; a candidate_outputs callback, its own intermediates). At Qwen1.5-MoE
# widths (19 candidates of 2048 floats, 152 KiB a token) 384 MiB is 2586 tokens, a fifth of the
# float32 layer the pipeline holds meanwhile. from_moe splits the tokens into chunks of equal
# size: each chunk's expert GEMMs see only that chunk's tokens and pack the expert's weights
# again, so the fewer the chunks the less packing (2048 tokens were 862 + 862 + 324 at 128 MiB).
_CHUNK_BYTES = 384 << 20

# Bounds of the genetic search's sizes, checked before any work: far beyond a useful search
# (the paper uses 100 x 50), small enough that nothing computed from them overflows.
_MAX_POPULATION = 1 << 24
_MAX_GENERATIONS = 1 << 24
_MAX_K_BEST = 1 << 20


class Layer:
    """One MoE layer's search cache and the searches over its expert masks.

    Build it with :meth:`from_dense` (every expert's output on every token is given),
    :meth:`from_moe` (expert weights and the layer's input; only the outputs the search can
    reach are computed, in C) or :meth:`from_candidate_outputs` (outputs computed by the caller).
    Masks are bool arrays, True = dropped. The cache lives in C memory (``_core.SearchCache``).
    """

    def __init__(self, cache):
        if not isinstance(cache, _core.SearchCache):
            raise TypeError(f"Layer wraps a moei2._core.SearchCache, got {type(cache).__name__}")
        self._cache = cache
        self.num_experts = cache.num_experts
        self.top_k = cache.top_k
        self.r_max = cache.r_max
        self.renormalize = cache.renormalize
        self.scaling_factor = cache.scaling_factor
        self.batch_ends = cache.batch_ends
        self.num_threads = _num_threads()

    # -- construction --

    @staticmethod
    def _validate_routing(router_logits, top_k, r_max, renormalize, scaling_factor):
        logits = np.ascontiguousarray(_float_array(router_logits, "router_logits", 2), dtype=np.float64)
        N, E = logits.shape
        if N < 1 or E < 2:
            raise ValueError(f"router_logits must be [tokens >= 1, experts >= 2], got shape {logits.shape}")
        top_k = _check_int(top_k, "top_k", 1, E - 1)
        r_max = E - top_k if r_max is None else _check_int(r_max, "r_max", 1, E - top_k)
        if not isinstance(renormalize, (bool, np.bool_)):
            raise ValueError(f"renormalize must be a bool, got {renormalize!r}")
        if isinstance(scaling_factor, (bool, np.bool_)) or not isinstance(scaling_factor, (int, float, np.number)):
            raise ValueError(f"scaling_factor must be a positive finite number, got {scaling_factor!r}")
        scaling_factor = float(scaling_factor)
        if not (math.isfinite(scaling_factor) and scaling_factor > 0):
            raise ValueError(f"scaling_factor must be a positive finite number, got {scaling_factor}")
        return logits, N, E, top_k, r_max, bool(renormalize), scaling_factor

    @staticmethod
    def _new_cache(logits, top_k, r_max, renormalize, scaling_factor, batch_sizes):
        return _core.SearchCache(logits, top_k=top_k, r_max=r_max, renormalize=renormalize,
                                 scaling_factor=scaling_factor, batch_ends=_batch_ends(batch_sizes, logits.shape[0]))

    @classmethod
    def _build(cls, logits, N, E, top_k, r_max, renormalize, scaling_factor, batch_sizes, candidate_outputs):
        """candidate_outputs(candidates [n, C], first_token) -> [n, C, d] outputs of a chunk."""
        cache = cls._new_cache(logits, top_k, r_max, renormalize, scaling_factor, batch_sizes)
        threads = _num_threads()
        C = top_k + r_max
        start, chunk = 0, 1
        while start < N:
            out = candidate_outputs(cache.candidates(start, min(chunk, N - start)), start)
            out = _float_array(out, "candidate outputs", 3)
            n = cache.factor_outputs(np.ascontiguousarray(out), start, threads)
            if start == 0:
                chunk = max(1, _CHUNK_BYTES // max(1, out.itemsize * C * out.shape[2]))
            start += n
        return cls(cache)

    @classmethod
    def from_candidate_outputs(cls, router_logits, candidate_outputs, *, top_k: int, renormalize: bool,
                               scaling_factor: float = 1.0, r_max: Optional[int] = None,
                               batch_sizes: Optional[Sequence[int]] = None) -> "Layer":
        """Builds the cache from candidate outputs computed by the caller (torch, on any device).

        router_logits: [N, E]. candidate_outputs(candidates, first_token) -> [n, C, d] float32 or
        float64: for the chunk of tokens ``first_token .. first_token + n - 1``, the output of
        expert ``candidates[t, c]`` (int64 [n, C], C = top_k + r_max) on token ``first_token + t``,
        without routing weight. It is called on consecutive chunks in token order; a chunk may
        return fewer rows than asked, the next call then starts after the rows it returned.
        """
        logits, N, E, top_k, r_max, renormalize, scaling_factor = cls._validate_routing(
            router_logits, top_k, r_max, renormalize, scaling_factor)
        if not callable(candidate_outputs):
            raise ValueError(f"candidate_outputs must be a callable, got {type(candidate_outputs).__name__}")
        return cls._build(logits, N, E, top_k, r_max, renormalize, scaling_factor, batch_sizes, candidate_outputs)

    @classmethod
    def from_dense(cls, router_logits, expert_outputs, top_k: int, renormalize: bool, scaling_factor: float = 1.0,
                   batch_sizes: Optional[Sequence[int]] = None, r_max: Optional[int] = None) -> "Layer":
        """Builds the cache from every expert's output on every token.

        router_logits: [N, E]. expert_outputs: [E, N, d] float32/float64, expert j's output on
        token n (without routing weight). r_max: the most experts any mask may drop (default
        E - top_k). batch_sizes: token counts of the calibration batches (default one batch).
        """
        logits, N, E, top_k, r_max, renormalize, scaling_factor = cls._validate_routing(
            router_logits, top_k, r_max, renormalize, scaling_factor)
        outputs = _float_array(expert_outputs, "expert_outputs", 3)
        if outputs.shape[:2] != (E, N):
            raise ValueError(f"expert_outputs must have shape ({E}, {N}, d) to match router_logits, got {outputs.shape}")

        def gather(cand, first):
            tokens = np.arange(first, first + cand.shape[0])[:, None]
            return outputs[cand, tokens]

        return cls._build(logits, N, E, top_k, r_max, renormalize, scaling_factor, batch_sizes, gather)

    @classmethod
    def from_moe(cls, X, router_weight, gate_up_proj, down_proj, *, top_k: int, renormalize: bool,
                 scaling_factor: float = 1.0, r_max: int, batch_sizes: Optional[Sequence[int]] = None,
                 act: str = "silu") -> "Layer":
        """Builds the cache from an MoE layer's input and routed-expert weights.

        X: [N, H] the MoE block's input. router_weight: [E, H] (logits = X @ router_weight.T,
        computed in float64). gate_up_proj: [E, 2I, H] (gate rows first, then up, as in
        transformers' fused experts). down_proj: [E, H, I]. Each expert is evaluated only on the
        tokens that hold it among their top-(top_k + r_max), in chunks of bounded memory, by the C
        kernel in float32 (inputs are converted); the NumPy oracle of those outputs is
        :func:`moei2._reference.expert_outputs_reference`. Devices other than the CPU give their
        own outputs through :meth:`from_candidate_outputs`. Shared experts take no part: the
        loss is on the routed output.
        """
        X = _float_array(X, "X", 2)
        router_weight = _float_array(router_weight, "router_weight", 2)
        gate_up_proj = _float_array(gate_up_proj, "gate_up_proj", 3)
        down_proj = _float_array(down_proj, "down_proj", 3)
        N, H = X.shape
        E = router_weight.shape[0]
        if router_weight.shape[1] != H:
            raise ValueError(f"router_weight must have shape (E, {H}) to match X, got {router_weight.shape}")
        if gate_up_proj.shape[0] != E or gate_up_proj.shape[2] != H or gate_up_proj.shape[1] % 2:
            raise ValueError(f"gate_up_proj must have shape ({E}, 2I, {H}), got {gate_up_proj.shape}")
        inter = gate_up_proj.shape[1] // 2
        if down_proj.shape != (E, H, inter):
            raise ValueError(f"down_proj must have shape ({E}, {H}, {inter}), got {down_proj.shape}")
        if act != "silu":
            raise ValueError(f"act must be 'silu' (the kernel's activation), got {act!r}")
        logits = X.astype(np.float64) @ router_weight.astype(np.float64).T
        logits, N, E, top_k, r_max, renormalize, scaling_factor = cls._validate_routing(
            logits, top_k, r_max, renormalize, scaling_factor)
        # Everything below runs on moei2's own threads with OpenBLAS pinned to one thread (see
        # moei2._threads): no BLAS pool is entered between the kernels.
        cache = cls._new_cache(logits, top_k, r_max, renormalize, scaling_factor, batch_sizes)
        f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in (X, gate_up_proj, down_proj)]
        most = max(1, _CHUNK_BYTES // (4 * (top_k + r_max) * H))
        chunks = -(-N // most)
        threads = _num_threads()
        for c in range(chunks):
            start, end = c * N // chunks, (c + 1) * N // chunks
            cache.factor_moe(*f32, start, end - start, threads)
        return cls(cache)

    # -- properties --

    @property
    def num_tokens(self) -> int:
        return int(self.batch_ends[-1])

    @property
    def num_candidates(self) -> int:
        return self.top_k + self.r_max

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the cache arrays."""
        return int(self._cache.memory_bytes)

    # -- masks --

    def _pack(self, masks, name="masks", exact: Optional[int] = None):
        m = np.asarray(masks)
        if m.dtype != bool:
            raise ValueError(f"{name} must be a bool array (True = dropped), got dtype {m.dtype}")
        if m.ndim == 1:
            m = m[None, :]
        if m.ndim != 2 or m.shape[1] != self.num_experts:
            raise ValueError(f"{name} must have shape (M, {self.num_experts}) or ({self.num_experts},), got {np.shape(masks)}")
        counts = m.sum(axis=1)
        limit = min(self.r_max, self.num_experts - self.top_k)
        if exact is not None and np.any(counts != exact):
            raise ValueError(f"{name}: every mask must drop exactly {exact} experts")
        if np.any(counts > limit):
            raise ValueError(f"{name}: a mask drops {int(counts.max())} experts; this layer allows at most {limit} "
                             f"(r_max={self.r_max}, num_experts - top_k={self.num_experts - self.top_k})")
        return _pack_masks(m)

    def _unpack(self, bits) -> np.ndarray:
        return _unpack_masks(bits, self.num_experts)

    def _check_r(self, r) -> int:
        return _check_int(r, "r", 0, min(self.r_max, self.num_experts - self.top_k))

    # -- scoring and searches --

    def loss(self, masks) -> np.ndarray:
        """L(S) for each mask: bool [M, E] -> float64 [M] (a 1-D mask [E] gives shape [1])."""
        return self._cache.loss(self._pack(masks), self.num_threads)

    def expert_importance(self) -> np.ndarray:
        """I[j] = L({j}), the loss of removing expert j alone, for every expert: float64 [E]."""
        return self._cache.importance(self.num_threads)

    def exhaustive(self, r: int, k_best: int = 1, max_masks: int = 50_000_000) -> SearchResult:
        """Scores every r-subset (NAEE-style enumeration) and returns the k_best. Refuses spaces
        larger than max_masks."""
        r = self._check_r(r)
        k_best = _check_int(k_best, "k_best", 1, _MAX_K_BEST)
        total = math.comb(self.num_experts, r)
        if total > max_masks:
            raise ValueError(f"r={r} gives {total} masks of {self.num_experts} experts, more than max_masks={max_masks}")
        res = self._cache.exhaustive(r, k_best, self.num_threads)
        return SearchResult(self._unpack(res["masks"]), res["losses"], {"best": [], "mean": []}, int(res["evaluations"]))

    def greedy(self, r: int) -> SearchResult:
        """Removes r experts one at a time, each time the one whose removal (added to those already
        removed) costs least. history holds each step's best and mean loss."""
        r = self._check_r(r)
        res = self._cache.greedy(r, self.num_threads)
        best, mean, evaluations = res["history_best"], res["history_mean"], res["evaluations"]
        masks = self._unpack(res["mask"][None, :])
        losses = best[-1:] if r > 0 else self.loss(masks)
        return SearchResult(masks, np.asarray(losses, dtype=np.float64),
                            {"best": best.tolist(), "mean": mean.tolist()}, int(evaluations))

    def genetic(self, r: int, k_best: int = 1, seed: int = 0, population: int = 100, generations: int = 50,
                elite_fraction: float = 0.2, mutation_rate: float = 0.3) -> SearchResult:
        """The layer-wise genetic search (docs/method.md, stage 1b).

        Individuals are masks dropping exactly r experts. Generation 0 is `population` distinct
        random masks; each later generation keeps the best round(elite_fraction * population)
        (at least 1) as parents and fills the rest with distinct children: a random r-subset of
        the union of two parents, then each dropped slot swapped for a kept expert with
        probability mutation_rate (at least one swap). Losses are memoised. Stops early when
        every mask has been scored. Same seed, same result, whatever the thread count.
        """
        r = self._check_r(r)
        k_best = _check_int(k_best, "k_best", 1, _MAX_K_BEST)
        seed = _check_int(seed, "seed", 0, 2**64 - 1)
        population = _check_int(population, "population", 2, _MAX_POPULATION)
        generations = _check_int(generations, "generations", 1, _MAX_GENERATIONS)
        elite_fraction = float(elite_fraction)
        if not 0.0 < elite_fraction <= 1.0:
            raise ValueError(f"elite_fraction must be in (0, 1], got {elite_fraction}")
        mutation_rate = float(mutation_rate)
        if not 0.0 <= mutation_rate <= 1.0:
            raise ValueError(f"mutation_rate must be in [0, 1], got {mutation_rate}")
        elite = min(population, max(1, int(math.floor(elite_fraction * population + 0.5))))
        res = self._cache.genetic(r=r, k_best=k_best, population=population, generations=generations,
                                  elite_count=elite, mutation_rate=mutation_rate, seed=seed,
                                  num_threads=self.num_threads)
        return SearchResult(self._unpack(res["masks"]), res["losses"],
                            {"best": res["history_best"].tolist(), "mean": res["history_mean"].tolist()},
                            int(res["evaluations"]))


def _pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool [M, E] -> uint64 [M, ceil(E/64)], bit j of the mask = expert j."""
    M, E = masks.shape
    W = (E + 63) // 64
    packed = np.packbits(masks, axis=1, bitorder="little")
    buf = np.zeros((M, W * 8), dtype=np.uint8)
    buf[:, : packed.shape[1]] = packed
    return np.ascontiguousarray(buf.view("<u8").astype(np.uint64))


def _unpack_masks(bits: np.ndarray, num_experts: int) -> np.ndarray:
    bits = np.ascontiguousarray(bits, dtype="<u8")
    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :num_experts].astype(bool)


# ---- per-layer prune counts -------------------------------------------------------------------

def prune_counts(layer_importance, num_experts, top_k, ratio: float = 0.25, total: Optional[int] = None,
                 rule: str = "inverse") -> np.ndarray:
    """Splits a global expert-pruning budget across MoE layers.

    layer_importance: [L] positive layer importances I[l] (sum of the layer's expert importances).
    num_experts, top_k: scalars or per-layer sequences. The budget is ``total`` if given, else
    round(ratio * sum_l E_l) (= round(ratio * E * L) for equal layers). rule "inverse" shares it in
    proportion to 1/I[l] (a layer of importance 0 takes precedence over all others), "uniform"
    equally. Shares are floored, the remainder goes to the largest fractional parts (ties to
    the lower layer), and each layer is capped at E_l - top_k_l; what a cap cuts off is
    redistributed among the other layers by the same rule, so the budget is met exactly.
    Returns int64 [L].
    """
    imp = np.asarray(layer_importance, dtype=np.float64)
    if imp.ndim != 1 or imp.size == 0:
        raise ValueError(f"layer_importance must be a non-empty 1-D sequence, got shape {imp.shape}")
    if not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError("layer_importance must be finite and non-negative")
    L = imp.size
    E = _per_layer(num_experts, "num_experts", L)
    k = _per_layer(top_k, "top_k", L)
    if np.any(E < 1) or np.any(k < 1) or np.any(k > E):
        raise ValueError("need num_experts >= top_k >= 1 in every layer")
    caps = E - k
    if total is None:
        ratio = float(ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        budget = int(math.floor(ratio * int(E.sum()) + 0.5))
    else:
        budget = _check_int(total, "total", 0)
    if budget > int(caps.sum()):
        raise ValueError(f"the pruning budget {budget} exceeds what the layers allow ({int(caps.sum())} = "
                         f"sum of num_experts - top_k)")
    if rule == "inverse":
        # min / I rather than 1 / I: a denormal importance would make 1 / I overflow to inf and
        # the shares NaN; the ratio keeps every weight in (0, 1] with the same proportions.
        weights = (imp == 0).astype(np.float64) if np.any(imp == 0) else imp.min() / imp
    elif rule == "uniform":
        weights = np.ones(L)
    else:
        raise ValueError(f"rule must be 'inverse' or 'uniform', got {rule!r}")

    counts = np.zeros(L, dtype=np.int64)
    active = np.ones(L, dtype=bool)
    remaining = budget
    # Water-filling: a layer whose ideal share exceeds its cap is fixed at the cap and the
    # budget left is re-shared among the others.
    while True:
        w = np.where(active, weights, 0.0)
        if remaining == 0 or not active.any():
            break
        if w.sum() == 0:  # only zero-weight layers left: share what remains equally
            w = active.astype(np.float64)
        share = remaining * w / w.sum()
        over = active & (share >= caps)
        if not over.any():
            break
        counts[over] = caps[over]
        remaining -= int(caps[over].sum())
        active &= ~over
    if remaining and active.any():
        w = np.where(active, weights, 0.0)
        if w.sum() == 0:
            w = active.astype(np.float64)
        share = remaining * w / w.sum()
        base = np.minimum(np.floor(share).astype(np.int64), caps)
        counts[active] = base[active]
        left = remaining - int(base[active].sum())
        frac = np.where(active, share - base, -1.0)
        for l in sorted(range(L), key=lambda i: (-frac[i], i)):
            if left == 0:
                break
            if active[l] and counts[l] < caps[l]:
                counts[l] += 1
                left -= 1
        # Rounding can only leave units when every active layer hit its cap, which the loop
        # above rules out; this guards against it anyway.
        for l in sorted(range(L), key=lambda i: (-weights[i], i)):
            if left == 0:
                break
            add = min(left, int(caps[l] - counts[l]))
            counts[l] += add
            left -= add
    if int(counts.sum()) != budget or np.any(counts > caps) or np.any(counts < 0):
        raise RuntimeError(f"prune_counts could not meet the budget {budget} (got {counts.tolist()}); "
                           "please report this with the layer importances")
    return counts


def _per_layer(value, name: str, L: int) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim == 0:
        a = np.full(L, a)
    if a.shape != (L,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer or a sequence of {L} integers, got {value!r}")
    return a.astype(np.int64)
