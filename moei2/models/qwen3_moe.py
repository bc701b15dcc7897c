"""Qwen3-MoE (``Qwen3MoeForCausalLM``).

Softmax over all experts, top-k, renormalised if ``norm_topk_prob`` (True for the released
models), no scaling, no shared experts. Layers in ``mlp_only_layers`` or off the
``decoder_sparse_step`` grid are dense.
"""
from .base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    module_path = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    block_class_name = "Qwen3MoeSparseMoeBlock"
