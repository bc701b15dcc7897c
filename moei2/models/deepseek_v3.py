"""DeepSeek-V3 / R1 and Kimi-K2 (``DeepseekV3ForCausalLM``); also DeepSeek-V3.2 (``deepseek_v32``),
whose expert layer is V3's.

Routing rule: ``s = sigmoid(x @ W.T)`` per expert (float32); the choice key is
``s + e_score_correction_bias``. With ``n_group > topk_group`` the experts form ``n_group``
equal groups, each scored by the sum of its two best keys, and only the ``topk_group`` best
groups are eligible; the token takes its ``num_experts_per_tok`` best eligible experts by key.
Weights are the unbiased ``s`` of those experts, divided by (their sum + 1e-20) if
``norm_topk_prob``, times ``routed_scaling_factor``. ``n_shared_experts`` shared experts form one
MLP added without a gate; the first ``first_k_dense_replace`` layers are dense.
"""
from .scored import ScoredRouterAdapter


class DeepseekV3Adapter(ScoredRouterAdapter):
    family = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    module_path = "transformers.models.deepseek_v3.modeling_deepseek_v3"
    block_class_name = "DeepseekV3MoE"
    shared_expert_attr = "shared_experts"
    norm_eps = 1e-20


class DeepseekV32Adapter(DeepseekV3Adapter):
    """DeepSeek-V3.2 (``DeepseekV32ForCausalLM``): V3's expert layer and routing rule; its sparse
    attention (the lightning indexer) is plain torch and runs on a CPU."""

    family = "deepseek_v32"
    architecture = "DeepseekV32ForCausalLM"
    module_path = "transformers.models.deepseek_v32.modeling_deepseek_v32"
    block_class_name = "DeepseekV32MoE"
