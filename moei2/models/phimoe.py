"""Phi-3.5-MoE (``PhimoeForCausalLM``).

Routing rule (transformers' ``sparsemixer`` in eval mode; RoutingRule ``weights="sparsemixer"``):
with logits ``z = x @ W.T`` over the layer's experts, the token takes two experts one after the
other, each the best by logit among those not yet taken (ties to the lower index). A pick of
logit ``m`` weighs ``1 / sum exp(z_j - m)`` over the experts not taken before it whose relative
gap ``(m - z_j) / max(|z_j|, m)`` is at most ``2 * router_jitter_noise``: a softmax over the
near-ties of the pick. Always two experts, whatever ``num_experts_per_tok`` says (a config with
another value is refused); no renormalisation, scaling or shared experts; every layer is an MoE
layer. Training mode samples the picks (Gumbel) and jitters the input; compression runs in eval.

Dropping experts keeps the order of the survivors' logits, but a pick's window can reach
survivors of any rank, so the search keeps every expert as a candidate (docs/method.md).
Checkpoints store the block as ``block_sparse_moe`` with the router as ``gate``.
"""
from .base import MoEAdapter


class PhimoeAdapter(MoEAdapter):
    family = "phimoe"
    architecture = "PhimoeForCausalLM"
    module_path = "transformers.models.phimoe.modeling_phimoe"
    block_class_name = "PhimoeSparseMoeBlock"
    router_attr = "router"
    renormalize_topk = False
    expert_count_keys = ("num_local_experts",)
    expert_width_key = "intermediate_size"
    stored_names = {"mlp.router.weight": "block_sparse_moe.gate.weight"}

    @classmethod
    def check_supported(cls, config):
        top_k = getattr(config, "num_experts_per_tok", None)
        if top_k != 2:
            raise ValueError(f"phimoe: num_experts_per_tok={top_k!r}, but sparsemixer routing always takes 2 experts; "
                             "the configuration contradicts the model's forward")

    def routing_rule(self, block):
        from ..search import RoutingRule

        router = self.router_of(block)
        return RoutingRule(int(router.top_k), False, weights="sparsemixer", window=2.0 * float(router.router_jitter_noise))
