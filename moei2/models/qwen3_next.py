"""Qwen3-Next (``Qwen3NextForCausalLM``).

Softmax over all experts (in float32), top-k, renormalised if ``norm_topk_prob`` (True for the
released models), no scaling. One shared expert (``mlp.shared_expert``) whose output is multiplied
by ``sigmoid(mlp.shared_expert_gate(x))`` and added: the Qwen2-MoE block. Attention alternates
gated delta-net (linear) and full attention layers; moei2 runs them as the model does. Layers in
``mlp_only_layers`` or off the ``decoder_sparse_step`` grid are dense.
"""
from .base import MoEAdapter


class Qwen3NextAdapter(MoEAdapter):
    family = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"
    module_path = "transformers.models.qwen3_next.modeling_qwen3_next"
    block_class_name = "Qwen3NextSparseMoeBlock"
    shared_expert_attr = "shared_expert"
    shared_expert_gate_attr = "shared_expert_gate"
