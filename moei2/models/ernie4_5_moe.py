"""ERNIE 4.5 MoE (``Ernie4_5_MoeForCausalLM``).

Routing rule: ``p = softmax(x @ W.T)`` over the layer's experts (float32); the token takes the
``moe_k`` experts of largest ``p + e_score_correction_bias`` (``gate.moe_statics``, a [1, E]
parameter); weights are their unbiased ``p`` divided by ``max(sum, moe_norm_min)``. No scaling;
``moe_num_shared_experts`` shared experts form one ungated MLP. Layers off the
``moe_layer_interval`` grid or outside ``moe_layer_start_index..moe_layer_end_index`` are dense.

Dropping experts divides the survivors' ``p`` by their remaining mass, which can reorder
``p + bias`` between survivors: the search keeps every expert as a candidate (docs/method.md).
The clamp at ``moe_norm_min`` (1e-12) never acts: the k largest probabilities of E experts sum to
at least k / E.
"""
from .scored import ScoredRouterAdapter


class Ernie45MoeAdapter(ScoredRouterAdapter):
    family = "ernie4_5_moe"
    architecture = "Ernie4_5_MoeForCausalLM"
    module_path = "transformers.models.ernie4_5_moe.modeling_ernie4_5_moe"
    block_class_name = "Ernie4_5_MoeSparseMoeBlock"
    shared_expert_attr = "shared_experts"
    weights = "softmax"
    bias_path = "gate.moe_statics.e_score_correction_bias"
    expert_count_keys = ("moe_num_experts",)
    top_k_key = "moe_k"

    def renormalize(self, block):
        return True
