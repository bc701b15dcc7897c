"""Budget mode's allocator: how many experts each MoE layer drops and the rank of every survivor.

The problem (docs/method.md, "Budget mode"): each layer l offers, for every drop count d in
0..D_l, its survivors (the experts not among the first d of ``drop_order``) either dense, or
low-rank with a rank r_j in 1..R_cap per survivor. An option's cost is ``prune_loss[d]`` plus,
when low-rank, ``sum_j truncation[j, r_j - 1]``; its parameters are ``survivors * dense_params``,
or ``sum_j r_j * rank_params``, plus ``survivors * bias_params`` either way. The allocator minimises the summed cost over the layers with the
parameters at most ``target``.

How, exactly:
1. Within a layer, for a fixed d, the best ranks for every total rank R come from merging the
   survivors' marginal gains (cost of rank r minus cost of rank r + 1) in decreasing order. That is
   optimal when each expert's cost is convex in its rank, which a truncation tail sum is (its steps
   are the discarded eigenvalues, in decreasing order); non-convex costs are refused.
2. Across layers, a multiple-choice knapsack solved by dynamic programming on a grid of parameter
   units: the greatest common divisor of the parameter sizes when the budget spans at most
   ``max_grid`` of them (then the result is the exact optimum), else a coarser unit, with each
   option's parameters rounded up to it (the result stays within the budget).
3. After a coarse grid, each layer in turn takes its best option within its parameters plus what
   is unspent (the others fixed), until none changes. What is then left is filled one rank step at a time, the step of largest gain first,
   while a step fits: the budget is then met within one rank step of one expert (unless every
   layer is dense or every low-rank survivor is at R_cap).

Pure NumPy; the pipeline computes the costs (:mod:`moei2.stages.budget`).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["LayerCosts", "LayerPlan", "allocate", "rank_curve", "survivor_ranks"]


@dataclass
class LayerCosts:
    """One MoE layer's costs. ``prune_loss`` [D + 1]: cost of dropping the first d experts of
    ``drop_order`` (``prune_loss[0]`` is normally 0). ``drop_order`` [>= D]: experts in the order
    they are dropped. ``truncation`` [E, R_cap]: cost of expert j at rank r (column r - 1),
    non-increasing and convex in r. ``dense_params``, ``rank_params``: parameters of one dense
    expert's matrices and of one rank step of one expert; ``bias_params``: what every survivor keeps
    as it is, dense or low-rank (its biases, where the family has them)."""

    prune_loss: np.ndarray
    drop_order: np.ndarray
    truncation: np.ndarray
    dense_params: int
    rank_params: int
    bias_params: int = 0

    def __post_init__(self):
        self.prune_loss = np.asarray(self.prune_loss, dtype=np.float64).ravel()
        self.drop_order = np.asarray(self.drop_order, dtype=np.int64).ravel()
        self.truncation = np.asarray(self.truncation, dtype=np.float64)
        if self.truncation.ndim != 2 or self.truncation.size == 0:
            raise ValueError(f"truncation must be a non-empty [experts, max rank] array, got shape {self.truncation.shape}")
        E = self.truncation.shape[0]
        if self.prune_loss.size < 1 or self.drop_order.size < self.prune_loss.size - 1:
            raise ValueError("prune_loss needs one entry per drop count from 0, and drop_order one expert per drop")
        if self.prune_loss.size > E:
            raise ValueError(f"prune_loss: a layer of {E} experts cannot drop {self.prune_loss.size - 1} of them")
        order = self.drop_order[: self.max_drop]
        if order.size and (order.min() < 0 or order.max() >= E or np.unique(order).size != order.size):
            raise ValueError(f"drop_order must hold distinct expert indices in [0, {E})")
        for name in ("prune_loss", "truncation"):
            a = getattr(self, name)
            if not np.isfinite(a).all() or (a < 0).any():
                raise ValueError(f"{name} must be finite and non-negative")
        steps = -np.diff(self.truncation, axis=1)
        scale = np.abs(self.truncation).max() * 1e-9
        if (steps < -scale).any() or (np.diff(steps, axis=1) > scale).any():
            raise ValueError("truncation must be non-increasing and convex in the rank (steps non-increasing)")
        for name, least, what in (("dense_params", 1, "positive"), ("rank_params", 1, "positive"),
                                  ("bias_params", 0, "non-negative")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"{name} must be a {what} integer, got {value!r}")
            setattr(self, name, int(value))

    @property
    def num_experts(self) -> int:
        return int(self.truncation.shape[0])

    @property
    def max_rank(self) -> int:
        return int(self.truncation.shape[1])

    @property
    def max_drop(self) -> int:
        return int(self.prune_loss.size - 1)

    def survivors(self, d: int) -> np.ndarray:
        return np.setdiff1d(np.arange(self.num_experts), self.drop_order[:d])

    def min_params(self) -> int:
        """The fewest parameters the layer can keep: every allowed expert dropped, rank 1."""
        return (self.num_experts - self.max_drop) * (min(self.rank_params, self.dense_params) + self.bias_params)


@dataclass
class LayerPlan:
    """The option chosen for one layer: ``dropped`` experts, and ``ranks`` of the survivors
    (``{expert: rank}``) or None when they stay dense; its parameters and cost."""

    dropped: list
    ranks: Optional[dict]
    params: int
    cost: float

    def to_dict(self) -> dict:
        return {"dropped": [int(j) for j in self.dropped], "mode": "dense" if self.ranks is None else "low-rank",
                "ranks": None if self.ranks is None else {str(j): int(r) for j, r in self.ranks.items()},
                "params": int(self.params), "cost": float(self.cost)}


def rank_curve(truncation: np.ndarray, experts: Sequence[int]):
    """Best ranks of ``experts`` for every total rank: ``(costs, steps)``, with ``costs[m]`` the
    least summed cost at total rank ``len(experts) + m`` and ``steps`` the experts whose rank each
    successive unit raises (the marginal gains merged in decreasing order, ties to the lower expert)."""
    experts = np.asarray(experts, dtype=np.int64)
    t = truncation[experts]
    gains = -np.diff(t, axis=1)                      # [n, R_cap - 1], non-increasing along each row
    who = np.repeat(experts, gains.shape[1])
    order = np.lexsort((np.tile(np.arange(gains.shape[1]), len(experts)), who, -gains.ravel()))
    costs = t[:, 0].sum() - np.concatenate([[0.0], np.cumsum(gains.ravel()[order])])
    return np.maximum(costs, 0.0), who[order]


def survivor_ranks(costs: LayerCosts, survivors: Sequence[int], total_rank: int) -> dict:
    """The best ranks of ``survivors`` with ``total_rank`` in all (clamped to what they can hold)."""
    survivors = [int(j) for j in survivors]
    _, steps = rank_curve(costs.truncation, survivors)
    extra = int(min(max(total_rank - len(survivors), 0), steps.size))
    ranks = {j: 1 for j in survivors}
    for j in steps[:extra]:
        ranks[int(j)] += 1
    return ranks


def _options(costs: LayerCosts):
    """Every option of a layer as arrays (params, cost, drop count, total rank or -1 for dense)."""
    params, cost, drops, totals = [], [], [], []
    for d in range(costs.max_drop + 1):
        survivors = costs.survivors(d)
        n = len(survivors)
        params.append([n * (costs.dense_params + costs.bias_params)])
        cost.append([costs.prune_loss[d]])
        drops.append([d])
        totals.append([-1])
        curve, _ = rank_curve(costs.truncation, survivors)
        total = n + np.arange(curve.size)
        params.append(total * costs.rank_params + n * costs.bias_params)
        cost.append(costs.prune_loss[d] + curve)
        drops.append(np.full(curve.size, d))
        totals.append(total)
    return (np.concatenate(params).astype(np.int64), np.concatenate(cost),
            np.concatenate(drops).astype(np.int64), np.concatenate(totals).astype(np.int64))


def _unit(layers: Sequence[LayerCosts], target: int, max_grid: int) -> int:
    unit = 0
    for c in layers:
        unit = math.gcd(unit, math.gcd(c.dense_params, c.rank_params, c.bias_params))
    if target // unit + 1 > max_grid:
        unit = -(-target // (max_grid - 1))
    return unit


def allocate(layers: Sequence[LayerCosts], target: int, *, max_grid: int = 2048) -> list:
    """The options of least summed cost whose parameters total at most ``target``: one
    :class:`LayerPlan` per layer. Raises ValueError when even the smallest options exceed it."""
    layers = list(layers)
    if not layers:
        raise ValueError("layers: nothing to allocate")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
        raise ValueError(f"target must be a non-negative integer number of parameters, got {target!r}")
    if isinstance(max_grid, bool) or not isinstance(max_grid, int) or max_grid < 2:
        raise ValueError(f"max_grid must be an integer >= 2, got {max_grid!r}")
    target = int(target)
    least = sum(c.min_params() for c in layers)
    if least > target:
        raise ValueError(f"the budget leaves {target:,} parameters, fewer than the {least:,} the layers keep with "
                         "every allowed expert dropped and rank 1")
    unit = _unit(layers, target, max_grid)
    G = target // unit
    curves, choices, options = [], [], []
    for c in layers:
        params, cost, drops, totals = _options(c)
        options.append((params, cost, drops, totals))
        units = -(-params // unit)
        fits = units <= G
        units, cost, index = units[fits], cost[fits], np.flatnonzero(fits)
        best = np.full(G + 1, np.inf)
        arg = np.full(G + 1, -1, dtype=np.int64)
        order = np.lexsort((cost, units))            # per unit count, the cheapest first
        first = np.ones(order.size, dtype=bool)
        first[1:] = units[order][1:] != units[order][:-1]
        pick = order[first]
        best[units[pick]], arg[units[pick]] = cost[pick], index[pick]
        # "at most g units": the running minimum, and the latest option that attains it
        running = np.minimum.accumulate(best)
        at = np.where((best == running) & np.isfinite(best), np.arange(G + 1), -1)
        at = np.maximum.accumulate(at)
        curves.append(running)
        choices.append((np.where(at >= 0, arg[np.maximum(at, 0)], -1), drops, totals))
    # Min-plus convolution layer by layer; back[l][g] is layer l's share of g units.
    total = curves[0]
    back = [np.arange(G + 1)]
    grid = np.arange(G + 1)
    for f in curves[1:]:
        new = np.empty(G + 1)
        share = np.empty(G + 1, dtype=np.int64)
        for start in range(0, G + 1, 256):
            g = grid[start:start + 256, None]
            prev = np.where(g - grid[None, :] >= 0, total[np.clip(g - grid[None, :], 0, G)], np.inf)
            sums = prev + f[None, :]
            share[start:start + 256] = np.argmin(sums, axis=1)
            new[start:start + 256] = sums[np.arange(sums.shape[0]), share[start:start + 256]]
        total = new
        back.append(share)
    if not np.isfinite(total[G]):
        raise ValueError("no combination of the layers' options fits the budget")
    plans, chosen = [None] * len(layers), [0] * len(layers)
    g = G
    for l in range(len(layers) - 1, -1, -1):
        h = int(back[l][g])
        option, drops, totals = choices[l]
        chosen[l] = int(option[h])
        plans[l] = _plan(layers[l], int(drops[chosen[l]]), int(totals[chosen[l]]))
        g -= h
    if unit > 1:
        _refine(layers, plans, options, chosen, target)
    return _fill(layers, plans, target)


def _refine(layers, plans, options, chosen: list, target: int) -> None:
    """After a coarse grid: each layer in turn takes its best option within its own parameters
    plus what is unspent, the others fixed, until no layer changes.

    Options are compared by their cost in the options table (``chosen[l]`` indexes layer l's
    current one), never against a plan's cost summed another way: at real widths the table's
    cumulative sums and a plan's per-expert sum differ in the last bits of large numbers, and an
    option that looks cheaper only by that rounding would be taken again and again. Compared
    within one table, every change lowers the table's total, so the loop ends."""
    changed = True
    while changed:
        changed = False
        for l, (params, cost, drops, totals) in enumerate(options):
            allowance = plans[l].params + target - sum(p.params for p in plans)
            fits = np.flatnonzero(params <= allowance)
            k = int(fits[np.lexsort((-params[fits], cost[fits]))[0]])
            if k != chosen[l] and cost[k] < cost[chosen[l]]:
                chosen[l] = k
                plans[l] = _plan(layers[l], int(drops[k]), int(totals[k]))
                changed = True


def _plan(costs: LayerCosts, d: int, total_rank: int) -> LayerPlan:
    dropped = [int(j) for j in costs.drop_order[:d]]
    survivors = costs.survivors(d)
    if total_rank < 0:
        return LayerPlan(dropped, None, len(survivors) * (costs.dense_params + costs.bias_params),
                         float(costs.prune_loss[d]))
    ranks = survivor_ranks(costs, survivors, total_rank)
    cost = costs.prune_loss[d] + sum(costs.truncation[j, r - 1] for j, r in ranks.items())
    return LayerPlan(dropped, ranks, sum(ranks.values()) * costs.rank_params + len(survivors) * costs.bias_params,
                     float(cost))


def _fill(layers, plans, target: int) -> list:
    """Spends what is left of the budget one rank step at a time, the largest gain first."""
    left = target - sum(p.params for p in plans)
    heap = []
    for l, (c, p) in enumerate(zip(layers, plans)):
        if p.ranks is not None:
            for j, r in p.ranks.items():
                if r < c.max_rank:
                    heapq.heappush(heap, (-(c.truncation[j, r - 1] - c.truncation[j, r]), l, j))
    while heap:
        gain, l, j = heapq.heappop(heap)
        c, p = layers[l], plans[l]
        if c.rank_params > left:
            continue
        r = p.ranks[j]
        p.ranks[j] = r + 1
        p.params += c.rank_params
        p.cost += gain
        left -= c.rank_params
        if r + 1 < c.max_rank:
            heapq.heappush(heap, (-(c.truncation[j, r] - c.truncation[j, r + 1]), l, j))
    return plans
