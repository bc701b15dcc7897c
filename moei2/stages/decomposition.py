"""Survivor importance, rank allocation and truncation-aware (whitened) low-rank factors of one layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

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


@dataclass
class LowRankLayers:
    """The decomposition stage's result over a run: each decomposed layer's record
    (:meth:`Decomposition.record`) and the spectra the report draws. As each layer finishes, its
    factors are recorded in the run state as arrays (:attr:`FACTORS_KEY`), then its record and the
    spectra (:attr:`RESUME_KEY`, :attr:`SPECTRA_KEY`): a layer with a record and intact factors is
    not decomposed again."""

    records: dict = field(default_factory=dict)  # {layer: Decomposition.record()}
    spectra: list = field(default_factory=list)

    RESUME_KEY: ClassVar[str] = "ranks"
    SPECTRA_KEY: ClassVar[str] = "spectra"
    FACTORS_KEY: ClassVar[str] = "factors_layer{}"

    @classmethod
    def resume(cls, state) -> "LowRankLayers":
        return cls({int(l): r for l, r in state.get(cls.RESUME_KEY, {}).items()},
                   list(state.get(cls.SPECTRA_KEY, [])))

    def resumed_factors(self, state, layer: int, num_experts: int) -> Optional[dict]:
        """The factors of ``layer`` if a previous run finished it and its arrays are intact."""
        saved = state.load_arrays(self.FACTORS_KEY.format(layer))
        if layer not in self.records or saved is None:
            return None
        return _unpack_factors(saved, num_experts)

    def add(self, state, layer: int, decomposition: "Decomposition", spectra: Optional[list] = None) -> None:
        state.save_arrays(self.FACTORS_KEY.format(layer), _pack_factors(decomposition.factors))
        self.records[layer] = decomposition.record()
        self.spectra.extend(spectra or [])
        state.put(self.SPECTRA_KEY, self.spectra)
        state.put(self.RESUME_KEY, {str(l): r for l, r in self.records.items()})

    def layer_report(self, layer: int) -> dict:
        return {"lowrank": self.records[layer]} if layer in self.records else {}

    def report(self) -> dict:
        return {"spectra": self.spectra}


# Grams held at once while a layer is decomposed: experts are factored in groups whose Grams fit
# (at least one expert; a Mixtral-8x7B expert's alone are 1.7 GB).
GROUP_GRAM_BYTES = 512 << 20


def decompose_layer(ctx, stats, view, *, full_importance=None, kept=None, spectra=None, ranks=None) -> Decomposition:
    """Factors of MoE layer ``view`` (already pruned) from its statistics ``stats``.

    full_importance / kept: the layer's pass-1 importance and surviving experts, used when the
    importance is not recomputed on the pruned layer. spectra: a list that receives the plain and
    whitened singular values of expert 0's gate (report figure). When whitening, the Grams are
    ``stats.gram_in``/``stats.gram_down`` if the capture collected them, else computed a group of
    experts at a time from ``stats.X`` (:class:`moei2.calibrate.ExpertGrams`), so that one layer's
    Grams are never all in memory. ranks: the experts' ranks, chosen by the caller (budget mode),
    instead of allocated from importance.
    """
    from ..calibrate import ExpertGrams
    from ..lowrank import allocate_ranks, decompose_many
    from .selection import search_layer

    config = ctx.config
    M = int(view.num_experts)
    if ranks is not None or config.rank_rule == "uniform" or M <= view.top_k:
        imp = np.ones(M)  # ranks do not depend on it: skip the removal losses
    elif config.importance_on_pruned:
        imp = search_layer(ctx, stats, view, 1).expert_importance()
    else:
        imp = np.asarray(full_importance)[kept] if full_importance is not None else np.ones(M)
    inter, hidden = int(view.intermediate_size), int(view.hidden_size)
    # alpha = 0 makes every (I + eps)^alpha equal: the uniform-rank baseline.
    alpha = config.alpha if config.rank_rule == "importance" else 0.0
    if ranks is None:
        ranks = allocate_ranks(np.asarray(imp, dtype=np.float64), [(inter, hidden)] * M, avg_rank=config.avg_rank,
                               keep_ratio=config.rank_keep_ratio, alpha=alpha, eps=config.eps)
    elif len(ranks) != M:
        raise ValueError(f"ranks: {len(ranks)} given for the layer's {M} experts")
    if not config.whiten:
        grams = None
    elif stats.gram_in is not None:
        grams = lambda j: (stats.gram_in[j], stats.gram_down[j])  # noqa: E731
    else:
        grams = ExpertGrams(view, stats.X, stats.top_k_index, ctx.row_slices)
    if ctx.torch_kernels:
        factors, losses, fallbacks = _factors_torch(view, grams, ranks, spectra if config.whiten else None)
        return Decomposition(ranks=[int(r) for r in ranks], importance=np.asarray(imp).tolist(), losses=losses,
                             fallbacks=fallbacks, factors=factors)
    group = max(1, GROUP_GRAM_BYTES // (8 * (hidden * hidden + inter * inter)))
    factors, losses, fallbacks = {}, [], []
    for first in range(0, M, group):
        items = []
        for j in range(first, min(M, first + group)):
            gate, up, down = (to_numpy(w, np.float32) for w in view.expert(j))
            gram_in = gram_down = None
            if grams is not None:
                gram_in, gram_down = (np.ascontiguousarray(to_numpy(g, np.float64)) for g in grams(j))
            r = int(ranks[j])
            items += [(gate, gram_in, r), (up, gram_in, r), (down, gram_down, r)]
        if first == 0 and spectra is not None and config.whiten:
            spectra.extend(_spectra(view.layer_index, items[0][0], items[0][1], "gate", 0))
        results = decompose_many(items, return_info=True)
        del items
        for i, (A, B, info) in enumerate(results):
            j, name = first + i // 3, ("gate", "up", "down")[i % 3]
            factors.setdefault(j, {})[name] = (A, B)
            if i % 3 == 0:
                losses.append([])
            losses[-1].append(float(info["loss"]))
            if info.get("fallback"):
                fallbacks.append(str(info["fallback"]))
        del results
    return Decomposition(ranks=[int(r) for r in ranks], importance=np.asarray(imp).tolist(), losses=losses,
                         fallbacks=fallbacks, factors=factors)


def _factors_torch(view, grams, ranks, spectra) -> tuple[dict, list, list]:
    """The factors of every expert in torch on the layer's device (:func:`moei2.device_kernels.decompose_torch`),
    one expert's Grams at a time; only the factors cross to the host."""
    from ..device_kernels import decompose_torch

    factors, losses = {}, []
    for j in range(int(view.num_experts)):
        gate, up, down = view.expert(j)
        gram_in, gram_down = grams(j) if grams is not None else (None, None)
        if j == 0 and spectra is not None:
            spectra.extend(_spectra(view.layer_index, to_numpy(gate), to_numpy(gram_in, np.float64), "gate", 0))
        r = int(ranks[j])
        factors[j], losses_j = {}, []
        for name, weight, gram in (("gate", gate, gram_in), ("up", up, gram_in), ("down", down, gram_down)):
            A, B, info = decompose_torch(weight, gram, r)
            factors[j][name] = (to_numpy(A, np.float32), to_numpy(B, np.float32))
            losses_j.append(info["loss"])
        losses.append(losses_j)
        del gram_in, gram_down
    return factors, losses, []


def _spectra(layer: int, weight: np.ndarray, gram: np.ndarray, matrix: str, expert: int) -> list:
    """Singular values of one weight, plain and whitened by its input Gram (for the report)."""
    w = weight.astype(np.float64)
    plain = np.linalg.svd(w, compute_uv=False)
    # W G W^T and R G R^T (W = QR) share their non-zero eigenvalues: the smaller side keeps a tall
    # weight's eigenproblem min(m, n) wide (4096 instead of 14336 for a Mixtral-8x7B gate).
    side = np.linalg.qr(w, mode="r") if w.shape[0] > w.shape[1] else w
    whitened = np.sqrt(np.clip(np.linalg.eigvalsh(side @ gram @ side.T)[::-1], 0.0, None))
    return [{"layer": layer, "expert": expert, "matrix": matrix, "plain": plain.tolist(),
             "whitened": whitened[: len(plain)].tolist()}]


def _pack_factors(factors: dict) -> dict:
    out = {}
    for j, mats in factors.items():
        for name, (A, B) in mats.items():
            out[f"{j}.{name}.A"] = np.asarray(A)
            out[f"{j}.{name}.B"] = np.asarray(B)
    return out


def _unpack_factors(arrays: dict, num_experts: int) -> dict:
    return {j: {name: (arrays[f"{j}.{name}.A"], arrays[f"{j}.{name}.B"]) for name in ("gate", "up", "down")}
            for j in range(num_experts)}
