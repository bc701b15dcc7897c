"""Inter-expert pruning: the routing rule under pruning, the exact per-layer loss L(S), expert
importance, per-layer prune counts and the subset searches (genetic, exhaustive, greedy).

Routing under pruning (one rule, used by the search, the block step and the saved model): the
router logits of dropped experts become -inf, the softmax runs over the survivors, each token
takes its top-k survivors (ties to the lower expert index), the k weights are divided by their
sum if the model renormalises, then multiplied by the scaling factor. Removing those experts'
rows from a Hugging Face router (Mixtral, Qwen2-MoE, DeepSeek-V2 greedy) routes identically.
Other families' rules (sigmoid scores, a score-correction bias for choosing, group-limited top-k)
are :class:`RoutingRule`s; the same rule is used by the search, the block step and the model.

L(S) = sum over calibration batches b of ||Y_b - Y_b,S||_F, with Y the routed part of the MoE
output (shared experts excluded: they do not depend on S), accumulated in float64.

A :class:`Layer` caches, per token, only its C = k + r_max best experts by choice key (the
only experts it can be re-routed to when at most r_max are dropped; every expert under a rule
whose order depends on the mask, docs/method.md) as the triangular QR factor
of their output vectors, so scoring a mask never touches the hidden size. The kernels are in
C (csrc/fitness.c, importance.c, genetic.c); moei2._reference holds the float64 oracle.

Why one file of over 600 lines: it is the Python face of the C search, and the routing rule, the
cache, the prune counts and the searches share one contract (the rule's candidate bound, the
mask layout, the seeded RNG) that reads best in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import _core

__all__ = ["route", "RoutingRule", "Layer", "SearchResult", "prune_counts", "water_fill"]


# ---- routing ---------------------------------------------------------------------------------

def route(router_logits, top_k: int, renormalize: bool, scaling_factor: float = 1.0, dropped=None):
    """Routes tokens with some experts removed, by the softmax rule above (a :class:`RoutingRule`
    with its defaults).

    router_logits: [N, E] finite logits. dropped: None, a bool mask [E] (True = dropped) or a
    sequence of expert indices. Returns ``(indices [N, k] int64, weights [N, k] float64)``, the
    experts in order of decreasing probability (ties to the lower index).
    """
    return RoutingRule(top_k, renormalize, scaling_factor).route(router_logits, dropped)


_WEIGHTS = ("softmax", "sigmoid", "unit", "sparsemixer")


@dataclass(frozen=True, eq=False)
class RoutingRule:
    """How a router turns a token's logits into its experts and their weights (docs/method.md,
    "Routing rules"); the C search and :meth:`route` apply the same rule.

    weights: "softmax" (over the surviving experts), "sigmoid" (of each logit; no other expert
    changes it), "unit" (every weight 1: the score scaled the expert's input instead, as in
    Llama 4) or "sparsemixer" (PhiMoE in eval mode: the k experts are picked one at a time, each
    the best survivor by logit not yet picked; a pick of logit m weighs 1 / sum of exp(z_j - m)
    over the survivors not picked before it whose relative gap (m - z_j) / max(|z_j|, m) is at
    most ``window``, NaN gaps inside; no bias, groups or renormalisation). The choice key is the
    logit for softmax without a bias, "unit" and "sparsemixer", else the weight score plus
    ``choice_bias[j]`` (a score-correction bias: used for choosing, never for weighting). With ``num_groups > top_groups`` the experts form equal groups of consecutive
    indices; a group scores the sum of its two best surviving keys (-inf below two survivors),
    the ``top_groups`` best groups are taken (ties to the lower group; more while they hold
    fewer than top_k survivors) and the token takes its top_k survivors of those groups by key,
    ties to the lower index. The k weights are divided by (their sum + norm_eps) if renormalize,
    then multiplied by scaling_factor.
    """

    top_k: int
    renormalize: bool
    scaling_factor: float = 1.0
    weights: str = "softmax"
    choice_bias: Optional[np.ndarray] = None
    num_groups: int = 1
    top_groups: int = 1
    norm_eps: float = 0.0
    window: float = 0.0

    def __post_init__(self):
        _check_int(self.top_k, "top_k", 1)
        if not isinstance(self.renormalize, (bool, np.bool_)):
            raise ValueError(f"renormalize must be a bool, got {self.renormalize!r}")
        for name in ("scaling_factor", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
                    or not math.isfinite(value) or value < 0 or (name == "scaling_factor" and value == 0):
                raise ValueError(f"{name} must be a finite number, positive for scaling_factor and >= 0 for "
                                 f"norm_eps, got {value!r}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "renormalize", bool(self.renormalize))
        if self.weights not in _WEIGHTS:
            raise ValueError(f"weights must be one of {_WEIGHTS}, got {self.weights!r}")
        if self.choice_bias is not None:
            bias = np.array(self.choice_bias, dtype=np.float64)
            if bias.ndim != 1 or not np.all(np.isfinite(bias)):
                raise ValueError("choice_bias must be a 1-D array of finite numbers (one per expert)")
            if self.weights == "unit":
                raise ValueError("choice_bias: a rule with unit weights chooses by logit and takes no bias")
            bias.setflags(write=False)
            object.__setattr__(self, "choice_bias", bias)
        _check_int(self.num_groups, "num_groups", 1)
        _check_int(self.top_groups, "top_groups", 1, int(self.num_groups))
        if self.grouped and self.weights != "sigmoid":
            raise ValueError("group-limited routing (num_groups > top_groups) is defined for sigmoid weights only")
        window = self.window
        if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, float, np.number)) \
                or not math.isfinite(window) or window < 0:
            raise ValueError(f"window must be a finite number >= 0, got {window!r}")
        object.__setattr__(self, "window", float(window))
        if self.weights == "sparsemixer":
            if self.choice_bias is not None or self.num_groups > 1 or self.renormalize:
                raise ValueError("sparsemixer weights take no choice_bias, groups or renormalisation")
        elif self.window:
            raise ValueError(f"window applies to sparsemixer weights only, not {self.weights!r}")

    @property
    def grouped(self) -> bool:
        return self.num_groups > self.top_groups

    @property
    def reranks(self) -> bool:
        """True when dropping experts can change the order of the survivors' keys or the groups a
        token uses; the search then keeps every expert as a candidate."""
        return (self.grouped or self.weights == "sparsemixer"
                or (self.weights == "softmax" and self.choice_bias is not None))

    def check(self, num_experts: int) -> None:
        """Raises ValueError unless the rule fits a layer of ``num_experts`` experts."""
        if self.top_k > num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds the {num_experts} experts")
        if self.choice_bias is not None and self.choice_bias.shape != (num_experts,):
            raise ValueError(f"choice_bias has {self.choice_bias.shape[0]} entries for {num_experts} experts")
        if self.num_groups > 1 and num_experts % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} does not divide the {num_experts} experts")

    def route(self, router_logits, dropped=None):
        """Routes tokens with some experts removed, as the layer that lost them routes.

        router_logits: [N, E] finite. dropped: None, a bool mask [E] or expert indices. Returns
        ``(indices [N, k] int64, weights [N, k] float64)``, the experts by decreasing choice key.
        """
        z = np.array(router_logits, dtype=np.float64)
        if z.ndim != 2:
            raise ValueError(f"router_logits must be 2-dimensional [tokens, experts], got shape {z.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError("router_logits contains NaN or Inf")
        N, E = z.shape
        self.check(E)
        drop = _dropped_mask(dropped, E)
        k = self.top_k
        if k > E - int(drop.sum()):
            raise ValueError(f"top_k={k} exceeds the {E - int(drop.sum())} experts left")
        if self.weights == "sparsemixer":
            return self._route_sparsemixer(z, drop)
        if self.weights == "softmax":
            masked = np.where(drop, -np.inf, z)
            e = np.exp(masked - masked.max(axis=1, keepdims=True))
            score = e / e.sum(axis=1, keepdims=True)
        elif self.weights == "sigmoid":
            with np.errstate(over="ignore"):
                score = 1.0 / (1.0 + np.exp(-z))
        else:
            score = np.ones_like(z)
        if self.weights == "unit" or (self.weights == "softmax" and self.choice_bias is None):
            key = z.copy()
        else:
            key = score + (0.0 if self.choice_bias is None else self.choice_bias)
        key[:, drop] = -np.inf
        if self.grouped:
            G = self.num_groups
            grouped = np.sort(key.reshape(N, G, -1), axis=2)[:, :, ::-1]
            alive = (~drop).reshape(G, -1).sum(axis=1)
            group_score = np.where(alive >= 2, grouped[:, :, 0] + grouped[:, :, 1], -np.inf)
            order = np.argsort(-group_score, axis=1, kind="stable")
            held = np.cumsum(alive[order], axis=1)
            # Groups taken: at least top_groups, and as many as it takes to hold k survivors.
            count = np.maximum(self.top_groups, (held < k).sum(axis=1) + 1)
            taken = np.zeros((N, G), dtype=bool)
            rank = np.arange(G)[None, :] < count[:, None]
            np.put_along_axis(taken, order, rank, axis=1)
            key[~np.repeat(taken, E // G, axis=1)] = -np.inf
        order = np.argsort(-key, axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(score, order, axis=1)
        if self.renormalize:
            w = w / (w.sum(axis=1, keepdims=True) + self.norm_eps)
        return order.astype(np.int64), w * self.scaling_factor

    def _route_sparsemixer(self, z: np.ndarray, drop: np.ndarray):
        N = z.shape[0]
        rows = np.arange(N)
        available = np.repeat(~drop[None, :], N, axis=0)
        order = np.zeros((N, self.top_k), dtype=np.int64)
        w = np.zeros((N, self.top_k))
        for i in range(self.top_k):
            pick = np.argmax(np.where(available, z, -np.inf), axis=1)  # ties to the lower index
            top = z[rows, pick][:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                outside = (top - z) / np.maximum(np.abs(z), top) > self.window
            w[:, i] = 1.0 / np.where(available & ~outside, np.exp(z - top), 0.0).sum(axis=1)
            order[:, i] = pick
            available[rows, pick] = False
        return order, w * self.scaling_factor


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
        self.rule: Optional[RoutingRule] = None  # set by the constructors below

    # -- construction --

    @staticmethod
    def _validate_routing(router_logits, top_k, r_max, renormalize, scaling_factor, rule=None):
        """The logits as float64 and the rule: ``rule``, or the plain softmax rule of top_k,
        renormalize and scaling_factor (which must then be None and given, respectively)."""
        logits = np.ascontiguousarray(_float_array(router_logits, "router_logits", 2), dtype=np.float64)
        N, E = logits.shape
        if N < 1 or E < 2:
            raise ValueError(f"router_logits must be [tokens >= 1, experts >= 2], got shape {logits.shape}")
        if rule is None:
            if top_k is None:
                raise ValueError("top_k must be an integer (or give rule=), got None")
            if renormalize is None:
                raise ValueError("renormalize must be a bool (or give rule=), got None")
            rule = RoutingRule(top_k, renormalize, 1.0 if scaling_factor is None else scaling_factor)
        elif not isinstance(rule, RoutingRule):
            raise ValueError(f"rule must be a moei2.search.RoutingRule, got {type(rule).__name__}")
        elif top_k is not None or renormalize is not None or scaling_factor is not None:
            raise ValueError("give either rule or top_k, renormalize and scaling_factor, not both")
        rule.check(E)
        _check_int(rule.top_k, "top_k", 1, E - 1)
        r_max = E - rule.top_k if r_max is None else _check_int(r_max, "r_max", 1, E - rule.top_k)
        return logits, N, E, rule, r_max

    @staticmethod
    def _new_cache(logits, rule, r_max, batch_sizes):
        bias = None if rule.choice_bias is None else np.ascontiguousarray(rule.choice_bias, dtype=np.float64)
        return _core.SearchCache(logits, top_k=rule.top_k, r_max=r_max, renormalize=rule.renormalize,
                                 scaling_factor=rule.scaling_factor, batch_ends=_batch_ends(batch_sizes, logits.shape[0]),
                                 weights=rule.weights, choice_bias=bias, norm_eps=rule.norm_eps,
                                 num_groups=rule.num_groups, top_groups=rule.top_groups, window=rule.window)

    @classmethod
    def _wrap(cls, cache, rule):
        layer = cls(cache)
        layer.rule = rule
        return layer

    @classmethod
    def _build(cls, logits, N, rule, r_max, batch_sizes, candidate_outputs):
        """candidate_outputs(candidates [n, C], first_token) -> [n, C, d] outputs of a chunk."""
        cache = cls._new_cache(logits, rule, r_max, batch_sizes)
        threads = _num_threads()
        C = cache.num_candidates
        start, chunk = 0, 1
        while start < N:
            out = candidate_outputs(cache.candidates(start, min(chunk, N - start)), start)
            out = _float_array(out, "candidate outputs", 3)
            n = cache.factor_outputs(np.ascontiguousarray(out), start, threads)
            if start == 0:
                chunk = max(1, _CHUNK_BYTES // max(1, out.itemsize * C * out.shape[2]))
            start += n
        return cls._wrap(cache, rule)

    @classmethod
    def from_candidate_outputs(cls, router_logits, candidate_outputs, *, top_k: Optional[int] = None,
                               renormalize: Optional[bool] = None, scaling_factor: Optional[float] = None,
                               r_max: Optional[int] = None, batch_sizes: Optional[Sequence[int]] = None,
                               rule: Optional["RoutingRule"] = None) -> "Layer":
        """Builds the cache from candidate outputs computed by the caller (torch, on any device).

        router_logits: [N, E]. candidate_outputs(candidates, first_token) -> [n, C, d] float32 or
        float64: for the chunk of tokens ``first_token .. first_token + n - 1``, the output of
        expert ``candidates[t, c]`` (int64 [n, C], C = top_k + r_max) on token ``first_token + t``,
        without routing weight. It is called on consecutive chunks in token order; a chunk may
        return fewer rows than asked, the next call then starts after the rows it returned.
        rule: a :class:`RoutingRule` instead of top_k, renormalize and scaling_factor (candidates
        are then ranked by its choice key; C = E for a rule that reranks).
        """
        logits, N, E, rule, r_max = cls._validate_routing(router_logits, top_k, r_max, renormalize, scaling_factor, rule)
        if not callable(candidate_outputs):
            raise ValueError(f"candidate_outputs must be a callable, got {type(candidate_outputs).__name__}")
        return cls._build(logits, N, rule, r_max, batch_sizes, candidate_outputs)

    @classmethod
    def from_dense(cls, router_logits, expert_outputs, top_k: Optional[int] = None, renormalize: Optional[bool] = None,
                   scaling_factor: Optional[float] = None, batch_sizes: Optional[Sequence[int]] = None,
                   r_max: Optional[int] = None, *, rule: Optional["RoutingRule"] = None) -> "Layer":
        """Builds the cache from every expert's output on every token.

        router_logits: [N, E]. expert_outputs: [E, N, d] float32/float64, expert j's output on
        token n (without routing weight). r_max: the most experts any mask may drop (default
        E - top_k). batch_sizes: token counts of the calibration batches (default one batch).
        """
        logits, N, E, rule, r_max = cls._validate_routing(router_logits, top_k, r_max, renormalize, scaling_factor, rule)
        outputs = _float_array(expert_outputs, "expert_outputs", 3)
        if outputs.shape[:2] != (E, N):
            raise ValueError(f"expert_outputs must have shape ({E}, {N}, d) to match router_logits, got {outputs.shape}")

        def gather(cand, first):
            tokens = np.arange(first, first + cand.shape[0])[:, None]
            return outputs[cand, tokens]

        return cls._build(logits, N, rule, r_max, batch_sizes, gather)

    @classmethod
    def from_moe(cls, X, router_weight, gate_up_proj, down_proj, *, top_k: Optional[int] = None,
                 renormalize: Optional[bool] = None, scaling_factor: Optional[float] = None, r_max: int,
                 batch_sizes: Optional[Sequence[int]] = None, act: str = "silu",
                 rule: Optional["RoutingRule"] = None) -> "Layer":
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
        logits, N, E, rule, r_max = cls._validate_routing(logits, top_k, r_max, renormalize, scaling_factor, rule)
        # Everything below runs on moei2's own threads with OpenBLAS pinned to one thread (see
        # moei2._threads): no BLAS pool is entered between the kernels.
        cache = cls._new_cache(logits, rule, r_max, batch_sizes)
        f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in (X, gate_up_proj, down_proj)]
        most = max(1, _CHUNK_BYTES // (4 * cache.num_candidates * H))
        chunks = -(-N // most)
        threads = _num_threads()
        for c in range(chunks):
            start, end = c * N // chunks, (c + 1) * N // chunks
            cache.factor_moe(*f32, start, end - start, threads)
        return cls._wrap(cache, rule)

    # -- properties --

    @property
    def num_tokens(self) -> int:
        return int(self.batch_ends[-1])

    @property
    def num_candidates(self) -> int:
        """C: top_k + r_max, or every expert under a rule that reranks."""
        return int(self._cache.num_candidates)

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
    equally; each layer is capped at E_l - top_k_l and the shares are water-filled
    (:func:`water_fill`), so the budget is met exactly. Returns int64 [L].
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
    return water_fill(weights, caps, budget)


def water_fill(weights: np.ndarray, caps: np.ndarray, budget: int) -> np.ndarray:
    """Splits ``budget`` integer units in proportion to ``weights`` (non-negative) under integer
    ``caps`` (sum at least ``budget``): a part whose share exceeds its cap is fixed at the cap and
    what is left is re-shared among the others by the same weights (parts of weight 0 share
    equally when no other is left); the shares are floored and the units left go one each to the
    largest fractional parts, ties to the lower index. Returns int64 parts summing to ``budget``.

    Rank allocation (:func:`moei2.lowrank.allocate_ranks`, in C) splits differently, and on
    purpose: it clamps each expert's share to [1, cap] without re-sharing, and moves single units
    by the largest remaining share deficit, as the method's rank formula reads."""
    L = weights.size
    counts = np.zeros(L, dtype=np.int64)
    active = np.ones(L, dtype=bool)
    remaining = budget
    while True:
        w = np.where(active, weights, 0.0)
        if remaining == 0 or not active.any():
            break
        if w.sum() == 0:  # only zero-weight parts left: share what remains equally
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
        # Rounding can only leave units when every active part hit its cap, which the loop
        # above rules out; this guards against it anyway.
        for l in sorted(range(L), key=lambda i: (-weights[i], i)):
            if left == 0:
                break
            add = min(left, int(caps[l] - counts[l]))
            counts[l] += add
            left -= add
    if int(counts.sum()) != budget or np.any(counts > caps) or np.any(counts < 0):
        raise RuntimeError(f"water_fill could not meet the budget {budget} (got {counts.tolist()}); "
                           "please report this with the layer importances")
    return counts


def _per_layer(value, name: str, L: int) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim == 0:
        a = np.full(L, a)
    if a.shape != (L,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer or a sequence of {L} integers, got {value!r}")
    return a.astype(np.int64)
