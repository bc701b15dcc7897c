"""gpt-oss (``GptOssForCausalLM``).

Routing: ``logits = x @ router.weight.T + router.bias``; the top-k logits, then the softmax over
those k: softmax over all experts, top-k, renormalised, of the biased logits. The bias only shifts
the logits the search routes on, and is sliced with the router's rows. No scaling, no shared
experts; every layer is an MoE layer.

Experts are not the shared layout: ``gate_up_proj`` [E, H, 2I] (transposed, gate and up
interleaved: columns ``0::2`` and ``1::2``), ``down_proj`` [E, I, H], biases ``gate_up_proj_bias``
[E, 2I] and ``down_proj_bias`` [E, H], and a clamped SwiGLU
``(clamp(up, -L, L) + 1) * g * sigmoid(alpha g)`` with ``g = clamp(gate, max=L)``. Candidate outputs
for the search are therefore computed with this forward in torch (``standard_experts = False``),
and low-rank experts keep each expert's biases exact and use the same gated activation.
"""
import torch
from torch import nn

from ..modules import LowRankExperts
from .base import MoEAdapter


class ClampedSwiGLU(nn.Module):
    """gpt-oss's gated activation of ``(gate, up)``, as ``GptOssExperts._apply_gate`` computes it."""

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    architecture = "GptOssForCausalLM"
    module_path = "transformers.models.gpt_oss.modeling_gpt_oss"
    block_class_name = "GptOssMLP"
    router_attr = "router"
    renormalize_topk = True  # softmax over the top-k logits
    expert_count_keys = ("num_local_experts",)
    expert_width_key = "intermediate_size"
    standard_experts = False

    def dense_expert(self, experts, j):
        gate_up = experts.gate_up_proj.detach()[j]
        return gate_up[:, 0::2].T, gate_up[:, 1::2].T, experts.down_proj.detach()[j].T

    def dense_expert_biases(self, experts, j):
        bias = experts.gate_up_proj_bias.detach()[j]
        return bias[0::2], bias[1::2], experts.down_proj_bias.detach()[j]

    def dense_intermediate(self, experts, j, x):
        return experts._apply_gate(x @ experts.gate_up_proj[j] + experts.gate_up_proj_bias[j])

    def dense_expert_output(self, experts, j, x):
        return self.dense_intermediate(experts, j, x) @ experts.down_proj[j] + experts.down_proj_bias[j]

    def gated_activation(self, experts):
        if isinstance(experts, LowRankExperts):
            return super().gated_activation(experts)
        return ClampedSwiGLU(experts.alpha, experts.limit).glu

    def lowrank_experts_module(self, dense, hidden_size, intermediate_size, ranks, *, dtype, device):
        act = dense.act_fn if isinstance(dense, LowRankExperts) else ClampedSwiGLU(dense.alpha, dense.limit)
        return LowRankExperts(hidden_size, intermediate_size, ranks, act, dtype=dtype, device=device, biases=True)
