"""Mixtral (``MixtralForCausalLM``).

Softmax over all experts (in float32), top-k, always renormalised, no scaling, no shared experts;
every layer is an MoE layer. The router's jitter noise acts only in training mode.
"""
from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    architecture = "MixtralForCausalLM"
    module_path = "transformers.models.mixtral.modeling_mixtral"
    block_class_name = "MixtralSparseMoeBlock"
    expert_width_key = "intermediate_size"
    renormalize_topk = True  # MixtralTopKRouter divides the top-k probabilities by their sum unconditionally
    expert_count_keys = ("num_local_experts",)
