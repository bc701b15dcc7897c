"""Budget mode: each MoE layer's measured costs (pass 1) and the allocator's plan over them.

Costs are squared Frobenius norms of the error of the layer's routed output over all calibration
tokens (docs/method.md, "Budget mode"):
- dropping d experts: L(S_d)^2 from the search cache built over the tokens as one batch, with S_d
  the first d experts of a greedy order (each step drops the expert whose removal, with those
  already dropped, costs least): exact for that set;
- expert j at rank r: the whitened spectra of its three matrices on the unpruned layer's inputs.
  For the down projection the tail sum of the spectrum of W G W^T is the exact squared error of
  its output over the routed tokens, weighted here by the mean squared routing weight; for gate
  and up each discarded direction is carried to the expert's output to first order, through the
  root-mean-square channel scales and the down projection (a proxy, measured in
  benchmarks/budget_proxy.py). While an expert has fewer routed rows than a matrix has columns,
  the spectra come from the rows themselves (:func:`discarded_costs`), without forming its Gram.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..budget import LayerCosts, LayerPlan, allocate, survivor_ranks
from ..config import full_rank
from .common import to_numpy


def max_drop(config, num_experts: int, top_k: int) -> int:
    """The most experts budget mode may drop from a layer."""
    return max(0, min(num_experts - top_k, math.floor(config.budget_max_prune * num_experts)))


def dense_params(hidden_size: int, inter: int) -> int:
    return 3 * hidden_size * inter


def rank_params(hidden_size: int, inter: int) -> int:
    return 3 * (hidden_size + inter)


def bias_params(view) -> int:
    """The biases of one routed expert (gate, up and down), which it keeps dense or low-rank."""
    biases = view.expert_biases(0)
    return 0 if biases is None else sum(int(b.numel()) for b in biases)


def budget_target(config, shapes) -> int:
    """The routed-expert parameters budget mode may keep; ``shapes``: (experts, top_k, hidden
    size, expert width[, biases per expert]) of every MoE layer. Refused, naming the fields, when
    even every allowed expert dropped and rank 1 everywhere keep more."""
    total = least = 0
    for E, k, H, inter, *biases in shapes:
        fixed = biases[0] if biases else 0
        total += E * (dense_params(H, inter) + fixed)
        least += (E - max_drop(config, E, k)) * (min(rank_params(H, inter), dense_params(H, inter)) + fixed)
    target = math.floor((1.0 - config.budget) * total)
    if least > target:
        most = 1.0 - least / total
        raise ValueError(f"budget: {config.budget:g} removes more than this model can lose: with budget_max_prune="
                         f"{config.budget_max_prune:g} of each layer's experts dropped (at most num_experts - "
                         f"top_k) and rank 1 everywhere, {100 * most:.2f}% of the routed-expert parameters go; "
                         "lower budget or raise budget_max_prune")
    return target


def layer_shape(view) -> tuple:
    """(experts, top_k, hidden size, expert width, biases per expert) of an MoE layer."""
    return (int(view.num_experts), int(view.top_k), int(view.hidden_size), int(view.intermediate_size),
            bias_params(view))


def layer_costs(ctx, stats, view) -> tuple[LayerCosts, list]:
    """One layer's costs for the allocator, and its expert importance (the loss of dropping each
    expert alone, as in pass 1 of the method)."""
    from .selection import search_layer

    E, k = int(view.num_experts), int(view.top_k)
    H, inter = int(view.hidden_size), int(view.intermediate_size)
    D = max_drop(ctx.config, E, k)
    tokens = int(stats.X.shape[0])
    layer = search_layer(dataclasses.replace(ctx, batch_sizes=[tokens]), stats, view, max(D, 1)) if E > k else None
    importance = layer.expert_importance().tolist() if layer is not None else [0.0] * E
    order, losses = greedy_order(layer, D) if D else ([], [0.0])
    costs = LayerCosts(prune_loss=np.square(losses), drop_order=order, truncation=truncation_costs(ctx, stats, view),
                       dense_params=dense_params(H, inter), rank_params=rank_params(H, inter),
                       bias_params=bias_params(view))
    return costs, importance


def greedy_order(layer, steps: int) -> tuple[list, list]:
    """Experts dropped one at a time, each the cheapest given those before, and the loss L after
    each step (the first entry, nothing dropped, is 0)."""
    E = layer.num_experts
    mask = np.zeros(E, dtype=bool)
    order, losses = [], [0.0]
    for _ in range(steps):
        left = np.flatnonzero(~mask)
        masks = np.repeat(mask[None, :], left.size, axis=0)
        masks[np.arange(left.size), left] = True
        scores = np.asarray(layer.loss(masks))
        best = int(np.argmin(scores))
        mask[left[best]] = True
        order.append(int(left[best]))
        losses.append(float(scores[best]))
    return order, losses


def routing_weight_squares(stats, view) -> np.ndarray:
    """Mean squared routing weight of each expert over the tokens the model routes to it."""
    probs = torch.softmax(stats.router_logits.double(), dim=-1)
    w = probs.gather(1, stats.top_k_index)
    if view.renormalize:
        w = w / w.sum(dim=1, keepdim=True)
    w = w * float(view.scaling_factor)
    E = int(view.num_experts)
    flat = stats.top_k_index.reshape(-1)
    sums = torch.zeros(E, dtype=torch.float64).index_add_(0, flat, w.reshape(-1).square())
    counts = torch.bincount(flat, minlength=E).double()
    return (sums / counts.clamp(min=1)).numpy()


def _tails(costs: np.ndarray, max_rank: int) -> np.ndarray:
    """Tail sums [sum over i > r of costs[i]] for r = 1..max_rank (``costs`` non-negative, by
    decreasing eigenvalue), each summed smallest first: "total minus kept" would cancel where the
    tail is a tiny part of the total."""
    suffix = np.append(np.cumsum(costs[::-1])[::-1], 0.0)
    return suffix[1:max_rank + 1]


def channel_scales(view, j: int, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Root mean square over ``rows`` (the MoE-input rows routed to expert j) of what multiplies a
    change of each gate and up pre-activation on its way to the down projection: the derivatives
    of the family's ``glu(gate, up)`` (``act'(gate) * up`` and ``act(gate)`` for a plain gated
    activation), by central differences, so that any activation, clamp or bias works. Summed
    ROW_CHUNK rows at a time."""
    weight = next(view.experts_module.parameters())
    gate, up, _ = view.expert(j)
    biases = view.expert_biases(j) or (None, None, None)
    glu = view.gated_activation()
    step = 1e-3  # in float64: a central difference in bfloat16 would be noise
    squares = [0.0, 0.0]
    with torch.no_grad():
        for start in range(0, rows.shape[0], ROW_CHUNK):
            chunk = rows[start:start + ROW_CHUNK].to(device=weight.device, dtype=weight.dtype)
            x = view.expert_input(j, chunk)
            h_gate, h_up = (torch.nn.functional.linear(x, w, b).double()
                            for w, b in ((gate, biases[0]), (up, biases[1])))
            d_gate = (glu(h_gate + step, h_up) - glu(h_gate - step, h_up)) / (2 * step)
            d_up = (glu(h_gate, h_up + step) - glu(h_gate, h_up - step)) / (2 * step)
            squares = [squares[0] + d_gate.square().sum(dim=0), squares[1] + d_up.square().sum(dim=0)]
    return tuple((total / rows.shape[0]).sqrt().cpu().numpy() for total in squares)


def convex_minorant(costs: np.ndarray) -> np.ndarray:
    """The greatest convex function of the rank below ``costs`` (its lower convex hull)."""
    hull = []
    for r, c in enumerate(costs):
        while len(hull) >= 2:
            (r1, c1), (r2, c2) = hull[-2], hull[-1]
            if (c2 - c1) * (r - r1) >= (c - c1) * (r2 - r1):  # the middle point is not below the chord
                hull.pop()
            else:
                break
        hull.append((r, c))
    xs, ys = zip(*hull)
    return np.interp(np.arange(costs.size), xs, ys)


def discarded_costs(weight: np.ndarray, *, rows: np.ndarray | None = None, gram: np.ndarray | None = None,
                    through: np.ndarray | None = None) -> np.ndarray:
    """What each discarded direction of the whitened truncation of ``weight`` (m x n) costs, by
    decreasing eigenvalue l_i of W G W^T, min(m, n) of them: l_i, or l_i ||through @ u_i||^2 with
    u_i the i-th eigenvector (``through``: p x m). Tail sums of these are the errors of the rank-r
    truncations. G = X^T X is given as ``rows`` X (N x n) or as ``gram``.

    From rows when N < n: W G W^T = Y Y^T with Y = W X^T (m x N), formed in O(m n N) instead of
    O(m n^2). When also N < m, the non-zero eigenpairs come from the N x N matrix Y^T Y = V L V^T
    (u_i = Y v_i / sqrt(l_i), so l_i ||T u_i||^2 = ||T Y v_i||^2) and the other m - N are 0. From
    the Gram otherwise, on the smaller side: W G W^T = Q (R G R^T) Q^T for a tall W = Q R."""
    w = weight.astype(np.float64)
    m, n = w.shape
    k = min(m, n)
    if rows is not None and rows.shape[0] < n:
        y = w @ rows.T
        if y.shape[1] < m:
            return _descending_costs(y.T @ y, None if through is None else through @ y, scale=False, size=k)
        return _descending_costs(y @ y.T, through, scale=True, size=k)
    if gram is None:
        gram = rows.T @ rows
    if m > n:
        q, side = np.linalg.qr(w)
        through = None if through is None else through @ q
    else:
        side = w
    return _descending_costs(side @ gram @ side.T, through, scale=True, size=k)


def _descending_costs(symmetric: np.ndarray, through: np.ndarray | None, *, scale: bool, size: int) -> np.ndarray:
    """The eigenvalues of ``symmetric``, decreasing and clamped at 0, or with ``through`` each
    eigenvector's ||through @ v||^2 (times its eigenvalue when ``scale``); zero-padded to ``size``."""
    out = np.zeros(size)
    if through is None:
        values = np.linalg.eigvalsh(symmetric)[::-1]
        out[:values.size] = np.clip(values, 0.0, None)
        return out
    values, vectors = np.linalg.eigh(symmetric)
    values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]
    norms = np.square(through @ vectors).sum(axis=0)
    out[:values.size] = values * norms if scale else norms
    return out


def expert_truncation_parts(view, j: int, rows: torch.Tensor, max_rank: int) -> dict:
    """Expert j's squared output error at ranks 1..max_rank from each matrix, unweighted by
    routing, from ``rows`` (the MoE-input rows routed to j): ``down`` exact (tail of its whitened
    spectrum); ``gate`` and ``up`` a first-order proxy: each discarded direction carried through
    the channel scales (:func:`channel_scales`) and the down projection."""
    if rows.shape[0] == 0:
        return {name: np.zeros(max_rank) for name in ("gate", "up", "down")}
    gate, up, down = (to_numpy(w, np.float64) for w in view.expert(j))
    weight = next(view.experts_module.parameters())
    rows = rows.to(weight.device)
    # The inputs the factors' Grams are made of (calibrate._add_expert_grams); gate and up share theirs.
    inputs = _rows_or_gram(lambda chunk: view.expert_input(j, chunk), rows, int(view.hidden_size))
    hidden = _rows_or_gram(lambda chunk: view.intermediate(j, chunk.to(weight.dtype)), rows,
                           int(view.intermediate_size))
    scale_gate, scale_up = channel_scales(view, j, rows)
    return {"down": _tails(discarded_costs(down, **hidden), max_rank),
            "gate": _tails(discarded_costs(gate, through=down * scale_gate[None, :], **inputs), max_rank),
            "up": _tails(discarded_costs(up, through=down * scale_up[None, :], **inputs), max_rank)}


# Rows per pass where an expert's rows are many: bounds the float64 temporaries (8192 rows of
# Mixtral-8x7B's expert width, 14336, are 0.9 GB) however large the calibration set.
ROW_CHUNK = 8192


@torch.no_grad()
def _rows_or_gram(transform, rows: torch.Tensor, width: int) -> dict:
    """:func:`discarded_costs`'s input from ``transform`` (width columns) of ``rows``, in float64:
    the transformed rows while fewer than ``width`` (then no larger than a Gram), else their Gram,
    accumulated ROW_CHUNK rows at a time."""
    if rows.shape[0] < width:
        return {"rows": to_numpy(transform(rows).to(torch.float64), np.float64)}
    gram = torch.zeros((width, width), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], ROW_CHUNK):
        part = transform(rows[start:start + ROW_CHUNK]).to(torch.float64)
        gram.addmm_(part.T, part)
    return {"gram": to_numpy(gram, np.float64)}


def truncation_costs(ctx, stats, view) -> np.ndarray:
    """[E, R_cap] cost of each expert at each rank 1..R_cap (module docstring), each expert's made
    convex in the rank (the allocator's merge of marginal gains needs it; the gate/up proxy's
    steps need not decrease) by taking its convex minorant."""
    from ..calibrate import _tokens_by_expert

    E, H, inter = int(view.num_experts), int(view.hidden_size), int(view.intermediate_size)
    cap = full_rank(H, inter)
    tokens, bounds = _tokens_by_expert(stats.top_k_index, E)
    weights = routing_weight_squares(stats, view)
    costs = np.zeros((E, cap))
    for j in range(E):
        rows = stats.X[tokens[bounds[j]:bounds[j + 1]].to(stats.X.device)]
        parts = expert_truncation_parts(view, j, rows, cap)
        costs[j] = convex_minorant(weights[j] * (parts["down"] + parts["gate"] + parts["up"]))
    return costs


@dataclass
class BudgetPlan:
    """The allocator's choice for every MoE layer, and the costs it was made from."""

    budget: float
    target: int
    costs: dict      # {layer: LayerCosts}
    plans: dict      # {layer: LayerPlan}

    @classmethod
    def make(cls, config, costs: dict, target: int) -> "BudgetPlan":
        layers = sorted(costs)
        plans = allocate([costs[l] for l in layers], target)
        return cls(budget=config.budget, target=target, costs=costs, plans=dict(zip(layers, plans)))

    def counts(self) -> dict:
        return {l: len(p.dropped) for l, p in self.plans.items()}

    def ranks(self, layer: int, kept) -> list | None:
        """Ranks of the experts ``kept`` (original numbering) with the planned total rank, or None
        when the layer stays dense. The search may keep other experts than the plan's greedy order."""
        plan: LayerPlan = self.plans[layer]
        if plan.ranks is None:
            return None
        ranks = survivor_ranks(self.costs[layer], kept, sum(plan.ranks.values()))
        return [ranks[int(j)] for j in kept]

    def record(self) -> dict:
        return {"budget": self.budget, "target_params": self.target,
                "planned_params": sum(p.params for p in self.plans.values()),
                "planned_cost": sum(p.cost for p in self.plans.values()),
                "layers": {str(l): p.to_dict() for l, p in self.plans.items()}}


# The run state's name of a layer's costs (resume).
COSTS_KEY = "budget_costs_layer{}"


def save_costs(state, layer: int, costs: LayerCosts, importance) -> None:
    """Records a layer's costs and expert importance in the run state as it finishes."""
    state.save_arrays(COSTS_KEY.format(layer), _pack_costs(costs, importance))


def resumed_costs(state, layer: int) -> tuple[LayerCosts, list] | None:
    """A layer's costs and importance from a previous run, or None."""
    saved = state.load_arrays(COSTS_KEY.format(layer))
    return None if saved is None else _unpack_costs(saved)


def _pack_costs(costs: LayerCosts, importance) -> dict:
    """Arrays of a layer's costs for the run state (resume)."""
    return {"prune_loss": costs.prune_loss, "drop_order": costs.drop_order, "truncation": costs.truncation,
            "params": np.array([costs.dense_params, costs.rank_params, costs.bias_params]),
            "importance": np.asarray(importance)}


def _unpack_costs(arrays: dict) -> tuple[LayerCosts, list]:
    # A run saved before biases were counted has two entries; it had none to count (budget mode
    # failed on gpt-oss, the one family with expert biases).
    dense, step, *biases = (int(v) for v in arrays["params"])
    biases = biases[0] if biases else 0
    return (LayerCosts(prune_loss=arrays["prune_loss"], drop_order=arrays["drop_order"],
                       truncation=arrays["truncation"], dense_params=dense, rank_params=step, bias_params=biases),
            arrays["importance"].tolist())
