"""Tiny randomly initialised models of every supported family, built from their config classes.

Shapes are small enough that a forward pass takes milliseconds, yet keep what matters: several
experts (E=8, top-k 2), a dense first layer for DeepSeek-V2 (first_k_dense_replace=1, 2 shared
experts, routed_scaling_factor), a gated shared expert for Qwen2-MoE, renormalised routing for
Mixtral and Qwen3-MoE, un-renormalised for OLMoE and Qwen2-MoE. Families routing by softmax then
top-k added since: Qwen3-Next and Qwen3.5-MoE (gated shared expert, linear and full attention
layers), Granite-MoE (top-k of the logits then softmax), Hunyuan (ungated shared MLP), gpt-oss
(router bias, expert biases, clamped SwiGLU with a limit low enough to clamp). Llama 4's text
model (LLAMA4: top-1, a dense first layer, chunked attention) has its own tests.
"""
from __future__ import annotations

import torch

FAMILIES = ("qwen2_moe", "deepseek_v2", "mixtral", "olmoe", "qwen3_moe",
            # softmax-then-top-k families
            "qwen3_next", "qwen3_5_moe_text", "granitemoe", "hunyuan_v1_moe", "gpt_oss")
# Llama 4's text model (its own block layout: tests/test_llama4.py)
LLAMA4 = "llama4_text"
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
    elif family == "llama4_text":
        # layer 0 dense; top-1 routing as released
        cfg = tf.Llama4TextConfig(**{**common, "num_experts_per_tok": 1}, head_dim=8, intermediate_size=16,
                                  intermediate_size_mlp=48, num_local_experts=EXPERTS,
                                  moe_layers=list(range(1, layers)), attention_chunk_size=8)
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
                              "mlp.router.weight", "feed_forward.router.weight")):
                p.normal_(0.0, 0.5)
            elif name.endswith("mlp.router.bias"):
                p.normal_(0.0, 0.1)
            elif "experts" in name or "shared_expert" in name or "shared_mlp" in name:
                p.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def input_ids(num_sequences: int = 4, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (num_sequences, seq_len), generator=g)


# ---- families routed by a score-correction bias, sigmoid scores, group-limited top-k or ----------
# ---- PhiMoE's sparsemixer (RoutingRules beyond softmax then top-k) ------------------------------

SCORED_FAMILIES = ("deepseek_v3", "deepseek_v32", "glm4_moe", "dots1", "minimax_m2", "ernie4_5_moe", "lfm2_moe",
                   "phimoe")


def build_scored_config(family: str, *, layers: int = 3, **overrides):
    """Tiny configs: a dense first layer where the family has one, shared experts where it has
    them, a scaling factor other than 1 and (DeepSeek-V3) two groups that are both taken, so a
    pruned layer switches to one group; PhiMoE's sparsemixer window (2 * router_jitter_noise) wide
    enough that a pick often weighs several near-ties."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts_per_tok=TOP_K)
    v3 = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=EXPERTS, n_shared_experts=1,
              first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, n_group=2, topk_group=2)
    mla = dict(kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    if family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, **v3, **mla)
    elif family == "deepseek_v32":
        cfg = tf.DeepseekV32Config(**{**common, "num_key_value_heads": 4}, **v3, **{**mla, "q_lora_rank": 16},
                                   index_n_heads=2, index_head_dim=8, index_topk=4)
    elif family == "glm4_moe":
        cfg = tf.Glm4MoeConfig(**common, **{**v3, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.5})
    elif family == "dots1":
        cfg = tf.Dots1Config(**common, **{**v3, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.0})
    elif family == "minimax_m2":
        cfg = tf.MiniMaxM2Config(**common, intermediate_size=16, num_local_experts=EXPERTS, head_dim=8)
    elif family == "ernie4_5_moe":
        cfg = tf.Ernie4_5_MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=EXPERTS,
                                    moe_k=TOP_K, moe_num_shared_experts=1, moe_layer_start_index=1)
    elif family == "lfm2_moe":
        cfg = tf.Lfm2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, num_experts=EXPERTS,
                               num_dense_layers=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                               layer_types=["full_attention", "conv", "full_attention", "conv"][:layers])
    elif family == "phimoe":
        cfg = tf.PhimoeConfig(**common, intermediate_size=16, num_local_experts=EXPERTS, router_jitter_noise=0.3)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_scored_model(family: str, *, seed: int = 0, layers: int = 3, dtype=torch.float32, **overrides):
    """A tiny model in eval mode with decisive routers and random correction biases of the size of
    the score differences, so the bias changes which experts are chosen."""
    import transformers as tf

    from moei2.models import FAMILIES as ADAPTERS

    cfg = build_scored_config(family, layers=layers, **overrides)
    torch.manual_seed(seed)
    model = getattr(tf, ADAPTERS[family].architecture)(cfg)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("gate.weight", "mlp.router.weight")) and p.dim() == 2 and p.shape[0] == EXPERTS:
                p.normal_(0.0, 0.5)
            elif "experts" in name and "bias" not in name:
                p.normal_(0.0, 0.2)
            elif name.endswith("e_score_correction_bias") or name.endswith("expert_bias"):
                p.copy_(0.15 * torch.randn(p.shape))
    return model.to(dtype).eval()
