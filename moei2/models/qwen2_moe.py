"""Qwen1.5-MoE / Qwen2-MoE (``Qwen2MoeForCausalLM``).

Softmax over all experts, top-k, renormalised only if ``norm_topk_prob`` (False for
Qwen1.5-MoE-A2.7B), no scaling. One shared expert (``mlp.shared_expert``) whose output is
multiplied by ``sigmoid(mlp.shared_expert_gate(x))`` and added. Layers listed in
``mlp_only_layers`` or off the ``decoder_sparse_step`` grid are dense.
"""
from .base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    module_path = "transformers.models.qwen2_moe.modeling_qwen2_moe"
    block_class_name = "Qwen2MoeSparseMoeBlock"
    shared_expert_attr = "shared_expert"
    shared_expert_gate_attr = "shared_expert_gate"
