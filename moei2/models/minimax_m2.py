"""MiniMax-M2 (``MiniMaxM2ForCausalLM``).

Routing rule: ``s = sigmoid(x @ W.T)`` per expert; the token takes the ``num_experts_per_tok``
experts of largest ``s + e_score_correction_bias`` (the bias is a buffer of the sparse block, not
of the router); weights are their unbiased ``s`` divided by their sum (always), no scaling. No
shared experts; every layer is an MoE layer.
"""
from .scored import ScoredRouterAdapter


class MiniMaxM2Adapter(ScoredRouterAdapter):
    family = "minimax_m2"
    architecture = "MiniMaxM2ForCausalLM"
    module_path = "transformers.models.minimax_m2.modeling_minimax_m2"
    block_class_name = "MiniMaxM2SparseMoeBlock"
    bias_path = "e_score_correction_bias"
    expert_count_keys = ("num_local_experts",)
    expert_width_key = "intermediate_size"

    def renormalize(self, block):
        return True
