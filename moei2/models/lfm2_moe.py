"""LFM2-MoE (``Lfm2MoeForCausalLM``).

Routing rule: ``s = sigmoid(x @ W.T)`` per expert; with ``use_expert_bias`` the token takes the
``num_experts_per_tok`` experts of largest ``s + expert_bias`` (a buffer of the sparse block),
otherwise of largest ``s``; weights are their unbiased ``s``, divided by (their sum + 1e-6) if
``norm_topk_prob``, times ``routed_scaling_factor``. No shared experts. The sparse block is the
decoder layer's ``feed_forward``; the first ``num_dense_layers`` layers are dense, and the
layers mix convolution and attention (``layer_types``).
"""
from .scored import ScoredRouterAdapter


class Lfm2MoeAdapter(ScoredRouterAdapter):
    family = "lfm2_moe"
    architecture = "Lfm2MoeForCausalLM"
    module_path = "transformers.models.lfm2_moe.modeling_lfm2_moe"
    block_class_name = "Lfm2MoeSparseMoeBlock"
    bias_path = "expert_bias"
    norm_eps = 1e-6
    expert_count_keys = ("num_experts",)
    moe_attr = "feed_forward"

    def choice_bias(self, block):
        return super().choice_bias(block) if block.use_expert_bias else None

    def hidden_act(self):
        return "silu"  # Lfm2MoeExperts applies F.silu; the config names no activation
