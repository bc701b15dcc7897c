"""Pass 1: expert importance (the loss of dropping each expert alone) and per-layer prune counts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np


@dataclass
class PruneAllocation:
    """Pass 1's result: every MoE layer's expert importance and prune count; in budget mode also
    the allocator's plan (:class:`moei2.stages.budget.BudgetPlan`).

    importance: ``{layer: [loss of dropping each expert alone]}``, empty when nothing is pruned.
    counts: ``{layer: experts to drop}``. The importance is recorded in the run state under
    :attr:`RESUME_KEY` as each layer finishes (budget mode records its costs instead,
    :func:`moei2.stages.budget.save_costs`)."""

    importance: dict
    counts: dict
    plan: Optional[object] = None

    RESUME_KEY: ClassVar[str] = "expert_importance"

    @classmethod
    def resumed_importance(cls, state) -> dict:
        """The importance of the layers a previous run finished, ``{layer: [float]}``."""
        return {int(l): v for l, v in state.get(cls.RESUME_KEY, {}).items()}

    @classmethod
    def save_importance(cls, state, importance: dict) -> None:
        state.put(cls.RESUME_KEY, {str(l): v for l, v in importance.items()})

    def layer_report(self, layer: int) -> dict:
        """The report's pass-1 entries of one layer (none when nothing is pruned)."""
        if layer not in self.importance:
            return {}
        importance = self.importance[layer]
        return {"importance": importance, "layer_importance": float(sum(importance)),
                "prune_count": self.counts[layer]}

    def report(self) -> dict:
        """The report's run-wide pass-1 section: budget mode's plan."""
        return {} if self.plan is None else {"budget": self.plan.record()}


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
