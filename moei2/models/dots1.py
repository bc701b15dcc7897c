"""dots.llm1 (``Dots1ForCausalLM``).

Routing rule: DeepSeek-V3's (see :mod:`moei2.models.deepseek_v3`): sigmoid scores, the
``e_score_correction_bias`` added for choosing only, group-limited when ``n_group >
topk_group``, weights divided by (their sum + 1e-20) if ``norm_topk_prob``, times
``routed_scaling_factor``. One ungated shared-expert MLP; the first ``first_k_dense_replace``
layers are dense.
"""
from .scored import ScoredRouterAdapter


class Dots1Adapter(ScoredRouterAdapter):
    family = "dots1"
    architecture = "Dots1ForCausalLM"
    module_path = "transformers.models.dots1.modeling_dots1"
    block_class_name = "Dots1MoE"
    shared_expert_attr = "shared_experts"
    norm_eps = 1e-20
