"""Pass 1: expert importance (the loss of dropping each expert alone) and per-layer prune counts."""
from __future__ import annotations

import numpy as np


def score_layer(ctx, stats, view) -> list:
    """Importance of every expert of one layer: the search cache's loss of dropping it alone."""
    from .selection import search_layer

    return search_layer(ctx, stats, view, 1).expert_importance().tolist()


def prune_counts(config, experts: dict, num_experts: dict, top_k: dict) -> dict:
    """Per-layer prune counts from the layers' importance (the configured rule and budget)."""
    from .. import search

    layers = sorted(experts)
    counts = search.prune_counts(
        np.array([sum(experts[l]) for l in layers]), num_experts=[num_experts[l] for l in layers],
        top_k=[top_k[l] for l in layers], ratio=config.prune_ratio, total=config.prune_total,
        rule=config.prune_rule)
    return {l: int(c) for l, c in zip(layers, counts)}
