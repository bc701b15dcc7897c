"""Granite-MoE (``GraniteMoeForCausalLM``).

The router takes the top-k of the raw logits, then the softmax over those k (in float32): the same
weights as softmax over all experts, top-k, renormalised. No scaling, no shared experts; every
layer is an MoE layer. The block is ``block_sparse_moe`` and its router ``router``. Checkpoints
store the experts fused (``input_linear`` [E, 2I, H], ``output_linear`` [E, H, I]) and the router
as ``router.layer``. Granite's residual, embedding and logit multipliers act outside the block.
"""
from .base import MoEAdapter


class GraniteMoeAdapter(MoEAdapter):
    family = "granitemoe"
    architecture = "GraniteMoeForCausalLM"
    module_path = "transformers.models.granitemoe.modeling_granitemoe"
    block_class_name = "GraniteMoeMoE"
    expert_width_key = "intermediate_size"
    moe_attr = "block_sparse_moe"
    router_attr = "router"
    renormalize_topk = True  # softmax over the top-k logits
    expert_count_keys = ("num_local_experts",)
    stored_names = {"experts.gate_up_proj": "input_linear.weight", "experts.down_proj": "output_linear.weight",
                    "router.weight": "router.layer.weight"}
