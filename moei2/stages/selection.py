"""One layer's search cache and its K candidate masks (layer-wise genetic search or a baseline)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .common import to_numpy


@dataclass
class Selection:
    """Candidate masks of one layer (True = dropped), best first, with their search losses."""

    masks: list
    losses: list
    history: dict = field(default_factory=lambda: {"best": [], "mean": []})
    evaluations: int = 0

    def to_dict(self) -> dict:
        return {"masks": self.masks, "losses": self.losses, "history": self.history, "evaluations": self.evaluations}

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        return cls(masks=d["masks"], losses=d["losses"], history=d["history"], evaluations=d["evaluations"])

    @classmethod
    def keep_all(cls, num_experts: int) -> "Selection":
        return cls(masks=[[False] * num_experts], losses=[0.0])

    @property
    def best(self) -> int:
        return int(np.argmin(self.losses))


def search_layer(ctx, stats, view, r_max: int):
    """The search cache (:class:`moei2.search.Layer`) of one MoE layer from its statistics.

    On the CPU the C core computes the candidate outputs from the weights (``from_moe``). On a
    device the candidate expert outputs are computed there in torch, in the layer's dtype, and
    only the router logits and chunks of candidate outputs cross to the C core.
    """
    from .. import search

    common = dict(rule=view.rule, r_max=r_max, batch_sizes=ctx.batch_sizes)
    if not ctx.torch_candidates:
        return search.Layer.from_moe(
            to_numpy(stats.X), to_numpy(view.router_weight), to_numpy(view.gate_up_proj),
            to_numpy(view.down_proj), act=view.act, **common)
    X = stats.X
    with torch.no_grad():
        # Float64 logits, as from_moe computes them: the routing order decides which masks differ.
        logits = (X.double() @ view.router_weight.to(device=X.device, dtype=torch.float64).T).cpu().numpy()
    return search.Layer.from_candidate_outputs(logits, candidate_outputs(view, X), **common)


def candidate_outputs(view, X: torch.Tensor):
    """candidate_outputs(candidates [n, C], first_token) -> [n, C, H] float32 for
    :meth:`moei2.search.Layer.from_candidate_outputs`: each expert on the tokens that hold it among
    their candidates, in torch on X's device."""
    experts = view.experts_module
    gate_up, down, act = experts.gate_up_proj.detach(), experts.down_proj.detach(), experts.act_fn
    inter = view.intermediate_size
    num_experts = view.num_experts
    device = X.device

    def compute(cand: np.ndarray, first: int) -> np.ndarray:
        n, C = cand.shape
        with torch.no_grad():
            x = X[first:first + n].to(gate_up.dtype)
            flat = torch.from_numpy(np.ascontiguousarray(cand)).to(device).reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=num_experts).tolist()
            out = torch.empty((n * C, x.shape[1]), dtype=torch.float32, device=device)
            start = 0
            for j, count in enumerate(counts):
                if count == 0:
                    continue
                pos = order[start:start + count]
                start += count
                h = x[pos // C] @ gate_up[j].T
                out[pos] = ((act(h[:, :inter]) * h[:, inter:]) @ down[j].T).float()
            return out.reshape(n, C, -1).cpu().numpy()

    return compute


def select(config, layer, stats, r: int, layer_index: int) -> Selection:
    """Candidate masks by the configured selection rule: K best of the genetic search (the
    method), or one mask of a baseline (greedy, routing frequency, random)."""
    E = layer.num_experts
    if config.selection == "genetic":
        result = layer.genetic(r, k_best=config.kt_candidates, seed=config.seed + layer_index,
                               population=config.population, generations=config.generations,
                               elite_fraction=config.elite_fraction, mutation_rate=config.mutation_rate)
        return Selection(masks=np.asarray(result.masks).tolist(), losses=np.asarray(result.losses).tolist(),
                         history=_history_dict(result), evaluations=int(getattr(result, "evaluations", 0)))
    if config.selection == "greedy":
        mask = np.asarray(layer.greedy(r).masks)[0]
    else:
        mask = np.zeros(E, dtype=bool)
        if config.selection == "frequency":
            logits = to_numpy(stats.router_logits)
            top = np.argsort(-logits, axis=1, kind="stable")[:, : layer.top_k]
            frequency = np.bincount(top.ravel(), minlength=E)
            mask[np.argsort(frequency, kind="stable")[:r]] = True
        else:  # random
            rng = np.random.default_rng(config.seed + layer_index)
            mask[rng.choice(E, size=r, replace=False)] = True
    loss = float(np.asarray(layer.loss(mask[None, :])).ravel()[0])
    return Selection(masks=[mask.tolist()], losses=[loss], evaluations=1)


def _history_dict(result) -> dict:
    history = getattr(result, "history", None)
    if history is None:
        return {"best": [], "mean": []}
    if isinstance(history, dict):
        return {k: np.asarray(v).tolist() for k, v in history.items()}
    return {"best": np.asarray(history.best).tolist(), "mean": np.asarray(history.mean).tolist()}
