"""OLMoE (``OlmoeForCausalLM``).

Softmax over all experts, top-k, renormalised if ``norm_topk_prob`` (False for OLMoE-1B-7B),
no scaling, no shared experts; every layer is an MoE layer.
"""
from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    architecture = "OlmoeForCausalLM"
    module_path = "transformers.models.olmoe.modeling_olmoe"
    block_class_name = "OlmoeSparseMoeBlock"
    expert_width_key = "intermediate_size"
