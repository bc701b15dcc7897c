"""Torch modules that replace the routed experts of a Hugging Face MoE layer.

Transformers 5 stores a layer's routed experts as two fused 3-D parameters, which cannot hold a
different rank for every expert. :class:`LowRankExperts` keeps each expert's gate, up and down
matrices as separate factor pairs ``W ≈ A @ B`` and is called exactly like the experts module it
replaces: ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
Experts with biases and another gated activation (gpt-oss) keep their biases exact and pass the
activation as an ``act_fn`` with a ``glu(gate, up)`` method.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

MATRICES = ("gate", "up", "down")


class LowRankExpert(nn.Module):
    """One expert as factor pairs: ``down_A(down_B(act(gate_A(gate_B x)) * up_A(up_B x)))``.

    Shapes (H hidden size, I expert width): ``gate_A``/``up_A`` [I, r], ``gate_B``/``up_B`` [r, H],
    ``down_A`` [H, r], ``down_B`` [r, I]; each of the three matrices has its own rank r. With
    ``biases=True`` (experts with biases, as gpt-oss's) ``gate_bias``, ``up_bias`` [I] and
    ``down_bias`` [H] are added after each projection; the factors approximate the weights alone.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, ranks: Sequence[int], *, dtype=None, device=None,
                 biases: bool = False):
        super().__init__()
        rank_gate, rank_up, rank_down = (int(r) for r in ranks)
        kw = {"dtype": dtype, "device": device}
        self.gate_A = nn.Parameter(torch.empty(intermediate_size, rank_gate, **kw))
        self.gate_B = nn.Parameter(torch.empty(rank_gate, hidden_size, **kw))
        self.up_A = nn.Parameter(torch.empty(intermediate_size, rank_up, **kw))
        self.up_B = nn.Parameter(torch.empty(rank_up, hidden_size, **kw))
        self.down_A = nn.Parameter(torch.empty(hidden_size, rank_down, **kw))
        self.down_B = nn.Parameter(torch.empty(rank_down, intermediate_size, **kw))
        if biases:
            self.gate_bias = nn.Parameter(torch.zeros(intermediate_size, **kw))
            self.up_bias = nn.Parameter(torch.zeros(intermediate_size, **kw))
            self.down_bias = nn.Parameter(torch.zeros(hidden_size, **kw))
        else:
            self.gate_bias = self.up_bias = self.down_bias = None

    @property
    def ranks(self) -> tuple[int, int, int]:
        return (self.gate_B.shape[0], self.up_B.shape[0], self.down_B.shape[0])

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of ``name`` in ``gate``, ``up``, ``down``."""
        return getattr(self, f"{name}_A"), getattr(self, f"{name}_B")

    def weight(self, name: str) -> torch.Tensor:
        """The dense matrix ``A @ B`` of ``name`` (gate and up [I, H], down [H, I])."""
        a, b = self.factors(name)
        return a @ b

    def intermediate(self, x: torch.Tensor, act_fn) -> torch.Tensor:
        """The down projection's input ``act(gate x) * (up x)``; an ``act_fn`` with a ``glu`` method
        (a gated activation such as gpt-oss's) computes it from ``(gate x, up x)`` instead."""
        gate = F.linear(F.linear(x, self.gate_B), self.gate_A, self.gate_bias)
        up = F.linear(F.linear(x, self.up_B), self.up_A, self.up_bias)
        glu = getattr(act_fn, "glu", None)
        return glu(gate, up) if glu is not None else act_fn(gate) * up

    def forward(self, x: torch.Tensor, act_fn) -> torch.Tensor:
        return F.linear(F.linear(self.intermediate(x, act_fn), self.down_B), self.down_A, self.down_bias)


class LowRankExperts(nn.Module):
    """All routed experts of one layer in low-rank form.

    ``forward(hidden_states, top_k_index, top_k_weights)`` has the signature and the semantics of the
    transformers 5 experts modules (``Qwen2MoeExperts``, ``MixtralExperts``, ...): every token is sent
    to the experts in its row of ``top_k_index``, each expert's output is scaled by the matching
    routing weight, and the contributions are summed in the dtype of ``hidden_states``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, ranks: Sequence[Sequence[int]], act_fn: nn.Module,
                 *, dtype=None, device=None, biases: bool = False):
        super().__init__()
        if len(ranks) == 0:
            raise ValueError("ranks: a layer needs at least one expert")
        self.hidden_dim = int(hidden_size)
        self.intermediate_dim = int(intermediate_size)
        self.lowrank = nn.ModuleList(
            LowRankExpert(hidden_size, intermediate_size, r, dtype=dtype, device=device, biases=biases) for r in ranks)
        self.act_fn = act_fn

    @property
    def num_experts(self) -> int:
        return len(self.lowrank)

    @property
    def ranks(self) -> list[tuple[int, int, int]]:
        return [expert.ranks for expert in self.lowrank]

    def __len__(self) -> int:
        return len(self.lowrank)

    def __getitem__(self, index: int) -> LowRankExpert:
        return self.lowrank[index]

    def keep(self, keep: Sequence[int]) -> None:
        """Keeps only the experts at positions ``keep`` (in that order)."""
        self.lowrank = nn.ModuleList(self.lowrank[int(j)] for j in keep)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        num_top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        # Group the (token, slot) pairs by expert once, instead of one mask per expert.
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // num_top_k
        weights = top_k_weights.reshape(-1)[order]
        start = 0
        for expert_index, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start:start + count]
            out = self.lowrank[expert_index](hidden_states[rows], self.act_fn)
            out = out * weights[start:start + count, None]
            # A token holds an expert once, so ``rows`` has no repeats: one add per element, written
            # with index_put_ rather than index_add_, whose device kernel adds atomically and is
            # refused by torch.use_deterministic_algorithms(True).
            final.index_put_((rows,), final[rows] + out.to(final.dtype))
            start += count
        return final

    def extra_repr(self) -> str:
        ranks = self.ranks
        mean = sum(sum(r) for r in ranks) / (3 * len(ranks))
        return f"experts={len(ranks)}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, mean_rank={mean:.1f}"
