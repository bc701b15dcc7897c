"""DeepSeek-V2 / DeepSeek-V2-Lite (``DeepseekV2ForCausalLM``).

The first ``first_k_dense_replace`` layers are dense. In MoE layers the router computes logits in
float32, takes the softmax over all routed experts and the top-k (``topk_method="greedy"``),
does NOT renormalise (transformers' router ignores ``norm_topk_prob``), and multiplies the weights
by ``routed_scaling_factor``. ``n_shared_experts`` shared experts form one MLP
(``mlp.shared_experts``) whose output is added without a gate.

Group-limited routing (``topk_method="group_limited_greedy"`` with ``topk_group < n_group``, as in
DeepSeek-V2 236B) restricts each token to its best groups of experts; pruning breaks the equal
group sizes it relies on, so it is refused. With ``topk_group >= n_group`` (or ``n_group == 1``)
it selects exactly what greedy selects and is accepted; a pruned layer then routes greedily.
"""
from .base import MoEAdapter


class DeepseekV2Adapter(MoEAdapter):
    family = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    module_path = "transformers.models.deepseek_v2.modeling_deepseek_v2"
    block_class_name = "DeepseekV2Moe"
    shared_expert_attr = "shared_experts"
    renormalize_topk = False  # the router ignores norm_topk_prob
    scaling_attr = "routed_scaling_factor"
    expert_count_keys = ("n_routed_experts",)

    @classmethod
    def check_supported(cls, config):
        method = getattr(config, "topk_method", "greedy")
        if method == "greedy":
            return
        if method == "group_limited_greedy":
            n_group, topk_group = getattr(config, "n_group", None), getattr(config, "topk_group", None)
            if isinstance(n_group, int) and isinstance(topk_group, int) and (n_group == 1 or topk_group >= n_group):
                return
            raise ValueError(
                f"deepseek_v2: topk_method='group_limited_greedy' with n_group={n_group}, topk_group={topk_group} "
                "limits each token to its best expert groups; moei2 supports only greedy top-k routing "
                "(topk_method='greedy', or group-limited with topk_group >= n_group)")
        raise ValueError(f"deepseek_v2: topk_method={method!r} is not supported; moei2 supports only 'greedy' top-k routing")

    @classmethod
    def export_config(cls, config, num_experts):
        super().export_config(config, num_experts)
        if getattr(config, "topk_method", "greedy") != "greedy":
            # Accepted group-limited settings select exactly the greedy top-k (see the module
            # docstring), and greedy needs no equal-sized groups.
            config.topk_method = "greedy"

    def _set_counts(self, block, num_experts):
        super()._set_counts(block, num_experts)
        router = self.router_of(block)
        if router.topk_method != "greedy":
            # Accepted group-limited settings select exactly the greedy top-k; greedy needs no
            # equal-sized groups, which a pruned layer no longer has.
            router.topk_method = "greedy"
