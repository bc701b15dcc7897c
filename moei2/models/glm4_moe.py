"""GLM-4.5 / GLM-4.6 (``Glm4MoeForCausalLM``).

Routing rule: DeepSeek-V3's (see :mod:`moei2.models.deepseek_v3`): sigmoid scores, the
``e_score_correction_bias`` added for choosing only, group-limited when ``n_group >
topk_group`` (the released models use one group), weights divided by (their sum + 1e-20) if
``norm_topk_prob``, times ``routed_scaling_factor``. One ungated shared-expert MLP; the first
``first_k_dense_replace`` layers are dense.
"""
from .scored import ScoredRouterAdapter


class Glm4MoeAdapter(ScoredRouterAdapter):
    family = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    module_path = "transformers.models.glm4_moe.modeling_glm4_moe"
    block_class_name = "Glm4MoeMoE"
    shared_expert_attr = "shared_experts"
    norm_eps = 1e-20
