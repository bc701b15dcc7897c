"""Llama 4 text model (``Llama4ForCausalLM``, ``model_type`` ``llama4_text``).

Routing rule: logits ``z = x @ W.T``; the token takes its ``num_experts_per_tok`` (1 in the
released models) experts of largest logit, and ``s_j = sigmoid(z_j)`` scales the expert's INPUT:
the routed output is ``sum_j expert_j(s_j x)`` over the chosen experts, with weight 1
(RoutingRule ``weights="unit"``; an expert not chosen gets ``sigmoid(-inf) = 0`` times x, and
its output, without biases, is 0). A shared MLP (``feed_forward.shared_expert``) is added
without a gate. Layers outside ``moe_layers`` are dense (``Llama4TextMLP``).

The block differs from the shared layout: the router returns ``(scores [T, E], logits [T, E])``
(``scores`` the sigmoid of the chosen logits, 0 elsewhere), the experts module takes the inputs
already scaled, stacked for every expert (``[E * T, H]``) and returns them unsummed, and the fused
tensors are transposed: ``gate_up_proj`` [E, H, 2I] (gate columns, then up), ``down_proj``
[E, I, H]. The adapter declares these differences: :meth:`Llama4Adapter.expert_input` scales a
token by its score for expert j (so the search's candidate outputs, the Grams and the low-rank
factors see the inputs the experts see), and the low-rank experts keep the stacked call.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..modules import LowRankExperts
from .base import MoEAdapter


class StackedLowRankExperts(LowRankExperts):
    """Low-rank experts called as ``Llama4TextExperts`` is: ``forward(hidden_states [E * T, H])``,
    row block j the (already scaled) input of expert j, returns the [E * T, H] outputs unsummed."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        stacked = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        return torch.cat([expert(rows, self.act_fn) for expert, rows in zip(self.lowrank, stacked)])


class Llama4Adapter(MoEAdapter):
    family = "llama4_text"
    architecture = "Llama4ForCausalLM"
    module_path = "transformers.models.llama4.modeling_llama4"
    block_class_name = "Llama4TextMoe"
    moe_attr = "feed_forward"
    router_attr = "router"
    shared_expert_attr = "shared_expert"
    renormalize_topk = False
    expert_count_keys = ("num_local_experts",)
    expert_width_key = "intermediate_size"
    standard_experts = False
    router_gives_choice = False

    def routing_rule(self, block):
        from ..search import RoutingRule

        return RoutingRule(int(self.router_of(block).top_k), False, weights="unit")

    # ---- the router's (scores, logits) and the unsummed expert outputs ----

    def router_choice(self, output, top_k: int):
        scores, logits = output[0], output[1]
        return logits, torch.topk(logits, top_k, dim=-1).indices

    def routed_output(self, output, num_tokens: int):
        return output.reshape(-1, num_tokens, output.shape[-1]).sum(dim=0)

    def masked_router_output(self, output, drop: torch.Tensor, rule):
        """What the router computes from logits whose dropped experts are -inf."""
        logits = output[1].masked_fill(drop.to(output[1].device), float("-inf"))
        top, index = torch.topk(logits, rule.top_k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, index, top)
        return (torch.sigmoid(scores.float()).to(scores.dtype), logits) + tuple(output[2:])

    # ---- the experts: inputs scaled by the router score, transposed fused tensors ----

    def expert_input(self, view, j: int, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(z_j) x`` as the block forms it (the sigmoid in float32, cast back)."""
        logits = F.linear(x, view.router.weight.detach().to(x.dtype))
        return x * torch.sigmoid(logits[:, j:j + 1].float()).to(x.dtype)

    def dense_expert(self, experts, j):
        inter = int(experts.expert_dim)
        gate_up = experts.gate_up_proj.detach()[j]
        return gate_up[:, :inter].T, gate_up[:, inter:].T, experts.down_proj.detach()[j].T

    def dense_intermediate(self, experts, j, x):
        gate, up = (x @ experts.gate_up_proj[j]).chunk(2, dim=-1)
        return up * experts.act_fn(gate)

    def dense_expert_output(self, experts, j, x):
        return self.dense_intermediate(experts, j, x) @ experts.down_proj[j]

    def lowrank_experts_module(self, dense, hidden_size, intermediate_size, ranks, *, dtype, device):
        return StackedLowRankExperts(hidden_size, intermediate_size, ranks, dense.act_fn, dtype=dtype, device=device)
