"""Tiny randomly initialised models of every supported family, built from their config classes.

Shapes are small enough that a forward pass takes milliseconds, yet keep what matters: several
experts (E=8, top-k 2), a dense first layer for DeepSeek-V2 (first_k_dense_replace=1, 2 shared
experts, routed_scaling_factor), a gated shared expert for Qwen2-MoE, renormalised routing for
Mixtral and Qwen3-MoE, un-renormalised for OLMoE and Qwen2-MoE. Families routing by softmax then
top-k added since: Qwen3-Next and Qwen3.5-MoE (gated shared expert, linear and full attention
layers), Granite-MoE (top-k of the logits then softmax), Hunyuan (ungated shared MLP), gpt-oss
(router bias, expert biases, clamped SwiGLU with a limit low enough to clamp).
"""
from __future__ import annotations

import torch

FAMILIES = ("qwen2_moe", "deepseek_v2", "mixtral", "olmoe", "qwen3_moe",
            # softmax-then-top-k families
            "qwen3_next", "qwen3_5_moe_text", "granitemoe", "hunyuan_v1_moe", "gpt_oss")
VOCAB = 101
HIDDEN = 32
EXPERTS = 8
TOP_K = 2


def build_config(family: str, *, layers: int = 3, tie: bool = False, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts_per_tok=TOP_K)
    if family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_experts=EXPERTS, norm_topk_prob=False)
    elif family == "deepseek_v2":
        common["num_key_value_heads"] = 4
        cfg = tf.DeepseekV2Config(**common, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=EXPERTS,
                                  n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None,
                                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=1.5,
                                  topk_method="greedy")
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=16, num_local_experts=EXPERTS)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=16, num_experts=EXPERTS, norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, num_experts=EXPERTS,
                                norm_topk_prob=True)
    # ---- softmax-then-top-k families
    elif family in ("qwen3_next", "qwen3_5_moe_text"):
        hybrid = dict(head_dim=8, linear_conv_kernel_dim=2, linear_key_head_dim=8, linear_value_head_dim=8,
                      linear_num_key_heads=2, linear_num_value_heads=4,
                      layer_types=[("linear_attention", "full_attention")[i % 2] for i in range(layers)],
                      moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=EXPERTS)
        if family == "qwen3_next":
            cfg = tf.Qwen3NextConfig(**common, **hybrid, intermediate_size=48, norm_topk_prob=True)
        else:
            cfg = tf.Qwen3_5MoeTextConfig(**common, **hybrid)
    elif family == "granitemoe":
        cfg = tf.GraniteMoeConfig(**common, intermediate_size=16, num_local_experts=EXPERTS)
    elif family == "hunyuan_v1_moe":
        cfg = tf.HunYuanMoEV1Config(**common, intermediate_size=16, num_experts=EXPERTS, head_dim=8)
    elif family == "gpt_oss":
        # swiglu_limit low enough that the clamps act on these activations
        cfg = tf.GptOssConfig(**common, intermediate_size=16, num_local_experts=EXPERTS, head_dim=8, sliding_window=8,
                              swiglu_limit=0.6)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_model(family: str, *, seed: int = 0, layers: int = 3, tie: bool = False, dtype=torch.float32, **overrides):
    """A tiny model in eval mode; router weights are scaled up so routing is decisive, not near-uniform."""
    import transformers as tf

    from moei2.models import FAMILIES as ADAPTERS

    cfg = build_config(family, layers=layers, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = getattr(tf, ADAPTERS[family].architecture)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.router.weight", "mlp.gate.wg.weight",
                              "mlp.router.weight")):
                p.normal_(0.0, 0.5)
            elif name.endswith("mlp.router.bias"):
                p.normal_(0.0, 0.1)
            elif "experts" in name or "shared_expert" in name or "shared_mlp" in name:
                p.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def input_ids(num_sequences: int = 4, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (num_sequences, seq_len), generator=g)
