"""Survivor importance, rank allocation and truncation-aware (whitened) low-rank factors of one layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .common import to_numpy


@dataclass
class Decomposition:
    """One layer's low-rank experts: ranks per surviving expert, the importance they were allocated
    from, the truncation losses (gate, up, down) per expert, any fallbacks of the C core, and the
    factors ``{j: {"gate"|"up"|"down": (A, B)}}``."""

    ranks: list
    importance: list
    losses: list
    fallbacks: list
    factors: dict = field(repr=False, default_factory=dict)

    def record(self) -> dict:
        return {"ranks": [int(r) for r in self.ranks], "importance": list(self.importance),
                "losses": self.losses, "fallbacks": self.fallbacks}


def decompose_layer(ctx, stats, view, *, full_importance=None, kept=None, spectra=None) -> Decomposition:
    """Factors of MoE layer ``view`` (already pruned) from its statistics ``stats`` (with Grams when
    whitening). full_importance / kept: the layer's pass-1 importance and surviving experts, used
    when the importance is not recomputed on the pruned layer. spectra: a list that receives the
    plain and whitened singular values of expert 0's gate (report figure)."""
    from ..lowrank import allocate_ranks, decompose_many
    from .selection import search_layer

    config = ctx.config
    M = int(view.num_experts)
    if config.rank_rule == "uniform" or M <= view.top_k:
        imp = np.ones(M)  # ranks do not depend on it: skip the removal losses
    elif config.importance_on_pruned:
        imp = search_layer(ctx, stats, view, 1).expert_importance()
    else:
        imp = np.asarray(full_importance)[kept] if full_importance is not None else np.ones(M)
    inter, hidden = int(view.intermediate_size), int(view.hidden_size)
    # alpha = 0 makes every (I + eps)^alpha equal: the uniform-rank baseline.
    alpha = config.alpha if config.rank_rule == "importance" else 0.0
    ranks = allocate_ranks(np.asarray(imp, dtype=np.float64), [(inter, hidden)] * M, avg_rank=config.avg_rank,
                           keep_ratio=config.rank_keep_ratio, alpha=alpha, eps=config.eps)
    items = []
    for j in range(M):
        gate, up, down = (to_numpy(w, np.float32) for w in view.expert(j))
        if config.whiten:
            gram_in = np.ascontiguousarray(to_numpy(stats.gram_in[j], np.float64))
            gram_down = np.ascontiguousarray(to_numpy(stats.gram_down[j], np.float64))
        else:
            gram_in = gram_down = None
        r = int(ranks[j])
        items += [(gate, gram_in, r), (up, gram_in, r), (down, gram_down, r)]
    if spectra is not None and config.whiten:
        spectra.extend(_spectra(view.layer_index, items[0][0], items[0][1], "gate", 0))
    results = decompose_many(items, return_info=True)
    factors = {j: {name: results[3 * j + i][:2] for i, name in enumerate(("gate", "up", "down"))} for j in range(M)}
    losses = [[float(results[3 * j + i][2]["loss"]) for i in range(3)] for j in range(M)]
    fallbacks = [str(r[2]["fallback"]) for r in results if r[2].get("fallback")]
    return Decomposition(ranks=[int(r) for r in ranks], importance=np.asarray(imp).tolist(), losses=losses,
                         fallbacks=fallbacks, factors=factors)


def _spectra(layer: int, weight: np.ndarray, gram: np.ndarray, matrix: str, expert: int) -> list:
    """Singular values of one weight, plain and whitened by its input Gram (for the report)."""
    w = weight.astype(np.float64)
    plain = np.linalg.svd(w, compute_uv=False)
    whitened = np.sqrt(np.clip(np.linalg.eigvalsh(w @ gram @ w.T)[::-1], 0.0, None))
    return [{"layer": layer, "expert": expert, "matrix": matrix, "plain": plain.tolist(),
             "whitened": whitened[: len(plain)].tolist()}]
