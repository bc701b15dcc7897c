"""Qwen3.5-MoE, text model (``Qwen3_5MoeForCausalLM``; the vision-language model's language part).

Softmax over all experts (in float32), top-k, always renormalised (the router has no
``norm_topk_prob``), no scaling. One shared expert gated by ``sigmoid(mlp.shared_expert_gate(x))``
as in Qwen2-MoE. Every decoder layer is an MoE layer; attention alternates gated delta-net and full
attention layers.
"""
from .base import MoEAdapter


class Qwen3_5MoeAdapter(MoEAdapter):
    family = "qwen3_5_moe_text"
    architecture = "Qwen3_5MoeForCausalLM"
    module_path = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe"
    block_class_name = "Qwen3_5MoeSparseMoeBlock"
    shared_expert_attr = "shared_expert"
    shared_expert_gate_attr = "shared_expert_gate"
    renormalize_topk = True
