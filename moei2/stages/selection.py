"""One layer's search cache and its K candidate masks (layer-wise genetic search or a baseline)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

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

    def report(self, chosen: int) -> dict:
        """The report's entries of the layer once candidate ``chosen`` is taken: the search and
        the experts dropped and kept."""
        dropped = [int(j) for j in np.flatnonzero(self.masks[chosen])]
        return {"search": {"candidates": self.masks, "candidate_losses": self.losses, "history": self.history,
                           "evaluations": self.evaluations, "chosen_candidate": chosen},
                "dropped": dropped, "kept": [j for j in range(len(self.masks[chosen])) if j not in dropped]}


@dataclass
class Selections:
    """The selection stage's result over a run: each searched MoE layer's :class:`Selection`,
    recorded in the run state under :attr:`RESUME_KEY` as each layer finishes."""

    layers: dict = field(default_factory=dict)  # {layer: Selection}

    RESUME_KEY: ClassVar[str] = "candidates"

    @classmethod
    def resume(cls, state) -> "Selections":
        return cls({int(l): Selection.from_dict(v) for l, v in state.get(cls.RESUME_KEY, {}).items()})

    def add(self, state, layer: int, selection: Selection) -> None:
        self.layers[layer] = selection
        state.put(self.RESUME_KEY, {str(l): v.to_dict() for l, v in self.layers.items()})

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def __getitem__(self, layer: int) -> Selection:
        return self.layers[layer]


def search_layer(ctx, stats, view, r_max: int):
    """The search cache (:class:`moei2.search.Layer`) of one MoE layer from its statistics.

    On the CPU the C core computes the candidate outputs from the weights (``from_moe``). On a
    device, and for families whose experts are not the shared layout (biases, another gated
    activation: gpt-oss), the candidate expert outputs are computed in torch with the family's own
    expert forward, in the layer's dtype, and only the router logits (router bias included) and
    each token's C x C factor of their Gram cross to the C core (:func:`candidate_output_factors`).
    """
    from .. import search

    common = dict(rule=view.rule, r_max=r_max, batch_sizes=ctx.batch_sizes)
    if not ctx.torch_kernels and view.adapter.standard_experts:
        return search.Layer.from_moe(
            to_numpy(stats.X), to_numpy(view.router_weight), to_numpy(view.gate_up_proj),
            to_numpy(view.down_proj), act=view.act, **common)
    X = stats.X
    return search.Layer.from_candidate_outputs(router_logits_float64(view, X), candidate_output_factors(view, X),
                                               **common)


# Rows of X widened to float64 at a time for the router logits: 64 MiB of a 2048-wide X.
_LOGIT_ROWS = 4096


def router_logits_float64(view, X: torch.Tensor) -> np.ndarray:
    """[N, E] float64 router logits (router bias included) on X's device, as from_moe computes
    them (the routing order decides which masks differ), widened a block of rows at a time instead
    of a float64 copy of the whole layer input."""
    out = np.empty((X.shape[0], view.num_experts), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, X.shape[0], _LOGIT_ROWS):
            block = view.router_logits(X[start:start + _LOGIT_ROWS])
            out[start:start + block.shape[0]] = block.cpu().numpy()
    return out


# Tokens whose candidate outputs are held on the device at once by candidate_output_factors:
# 4096 x 19 x 2048 float32 is 0.6 GiB for Qwen widths.
_FACTOR_TOKENS = 4096


def candidate_output_factors(view, X: torch.Tensor):
    """candidate_outputs(candidates [n, C], first_token) -> [n, C, C] float64 for
    :meth:`moei2.search.Layer.from_candidate_outputs`: per token, a factor L of the Gram
    G = O O^T of its candidate outputs O [C, H] (L L^T = G), computed on X's device.

    The search cache keeps only the triangular factor of each token's Gram, so L carries all it
    needs (its Gram is G, and the routed output's norm w^T G w) in C^2 numbers instead of C H:
    about 3 KB a token instead of 156 KB at Qwen widths, and the C core's factor step reads L.
    G is formed in float64 from the float32 outputs (products exact, as in the C core's Gram
    route); L is its Cholesky factor, or V sqrt(max(lambda, 0)) from its eigendecomposition
    where the Cholesky fails (rank-deficient O)."""
    outputs = _candidate_outputs_torch(view, X)

    def compute(cand: np.ndarray, first: int) -> np.ndarray:
        n = cand.shape[0]
        factors = []
        with torch.no_grad():
            for start in range(0, n, _FACTOR_TOKENS):
                o = outputs(cand[start:start + _FACTOR_TOKENS], first + start).double()
                gram = o @ o.transpose(1, 2)
                del o
                if not bool(torch.isfinite(gram).all()):
                    raise ValueError("candidate outputs contains NaN or Inf")
                L, info = torch.linalg.cholesky_ex(gram)
                failed = info != 0
                if bool(failed.any()):
                    values, vectors = torch.linalg.eigh(gram[failed])
                    L[failed] = vectors * values.clamp_min(0.0).sqrt()[:, None, :]
                factors.append(L.cpu().numpy())
        return np.concatenate(factors) if len(factors) > 1 else factors[0]

    return compute


def candidate_outputs(view, X: torch.Tensor):
    """candidate_outputs(candidates [n, C], first_token) -> [n, C, H] float32 for
    :meth:`moei2.search.Layer.from_candidate_outputs`: each expert on the tokens that hold it among
    their candidates, in torch on X's device."""
    outputs = _candidate_outputs_torch(view, X)
    return lambda cand, first: outputs(cand, first).cpu().numpy()


def _candidate_outputs_torch(view, X: torch.Tensor):
    """As :func:`candidate_outputs`, the [n, C, H] float32 tensor left on X's device."""
    experts = view.experts_module
    standard = view.adapter.standard_experts
    if standard:
        gate_up, down, act = experts.gate_up_proj.detach(), experts.down_proj.detach(), experts.act_fn
    dtype = next(experts.parameters()).dtype
    inter = view.intermediate_size
    num_experts = view.num_experts
    device = X.device

    def compute(cand: np.ndarray, first: int) -> torch.Tensor:
        n, C = cand.shape
        with torch.no_grad():
            x = X[first:first + n].to(dtype)
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
                if not standard:
                    out[pos] = view.expert_output(j, x[pos // C]).float()
                    continue
                h = x[pos // C] @ gate_up[j].T
                out[pos] = ((act(h[:, :inter]) * h[:, inter:]) @ down[j].T).float()
            return out.reshape(n, C, -1)

    return compute


def reap_saliency(stats, view) -> np.ndarray:
    """REAP's saliency of every expert of one layer (arXiv 2510.13999; CerebrasResearch/reap,
    ``observer.py``): ``S_j = mean over the tokens x routed to j of p_j(x) ||f_j(x)||_2``, with
    ``p = softmax(router logits)`` over all the layer's experts (not renormalised over the top-k:
    REAP's default) and ``f_j(x)`` expert j's output without routing weight. "Routed to j": j is
    among the model's own top-k choices for x (``stats.top_k_index``). An expert no token reaches
    scores 0. Returns float64 [E]."""
    from ..calibrate import _tokens_by_expert

    E = int(view.num_experts)
    probs = torch.softmax(stats.router_logits.double(), dim=-1)
    tokens, bounds = _tokens_by_expert(stats.top_k_index, E)
    weight = next(view.experts_module.parameters())
    saliency = np.zeros(E, dtype=np.float64)
    with torch.no_grad():
        for j in range(E):
            rows = tokens[bounds[j]:bounds[j + 1]]
            if rows.numel() == 0:
                continue
            x = stats.X[rows.to(stats.X.device)].to(device=weight.device, dtype=weight.dtype)
            out = torch.nn.functional.linear(view.intermediate(j, x), view.expert(j)[2])
            norms = torch.linalg.vector_norm(out.double(), dim=-1).cpu()
            saliency[j] = float((probs[rows, j] * norms).mean())
    return saliency


def select(config, layer, stats, r: int, layer_index: int, view=None) -> Selection:
    """Candidate masks by the configured selection rule: K best of the genetic search (the
    method), or one mask of a baseline (greedy, routing frequency, REAP saliency, random).
    ``view``: the layer, needed by REAP (it runs the experts)."""
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
        elif config.selection == "reap":
            if view is None:
                raise ValueError("selection 'reap' needs the layer (view) to run its experts")
            mask[np.argsort(reap_saliency(stats, view), kind="stable")[:r]] = True
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
