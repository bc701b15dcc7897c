"""Hunyuan-A13B (``HunYuanMoEV1ForCausalLM``).

The router (``mlp.gate.wg``, a linear layer kept in float32) gives logits; softmax over all experts,
top-k, always renormalised, no scaling. A shared MLP (``mlp.shared_mlp``) is added without a gate.
Every layer is an MoE layer. ``moe_topk`` may differ per layer (each router reads its own);
``num_experts`` must be one count for all layers.
"""
from .base import MoEAdapter


class HunYuanMoEV1Adapter(MoEAdapter):
    family = "hunyuan_v1_moe"
    architecture = "HunYuanMoEV1ForCausalLM"
    module_path = "transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe"
    block_class_name = "HunYuanMoEV1Moe"
    expert_width_key = "intermediate_size"
    router_linear_attr = "wg"
    shared_expert_attr = "shared_mlp"
    renormalize_topk = True
    top_k_key = "moe_topk"

    @classmethod
    def check_supported(cls, config):
        if not isinstance(config.num_experts, int):
            raise ValueError(f"hunyuan_v1_moe: num_experts={config.num_experts!r} differs per layer; the experts "
                             "module reads one count for every layer, so moei2 supports only an integer")
