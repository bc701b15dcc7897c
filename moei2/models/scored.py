"""Routers that score each expert on its own and choose with a per-expert correction bias.

DeepSeek-V3, GLM-4.5, dots.llm1, MiniMax-M2, ERNIE 4.5 and LFM2-MoE route a token by a score per
expert (a sigmoid of its logit, or ERNIE's softmax) plus a per-expert bias that balances the load:
the bias decides which experts are chosen, the unbiased score is the routing weight. The family
adapters below only say where the router keeps its settings and its bias; the rule itself is a
:class:`moei2.search.RoutingRule` (docs/method.md, "Routing rules").

Pruning slices the bias with the router's rows. A layer with group-limited routing (DeepSeek-V3's
``n_group > topk_group``) can only lose the same number of experts from every group, leaving at
least two in each: the router's forward reshapes its experts into ``n_group`` equal groups and
scores each by its two best. With ``topk_group >= n_group`` every group is taken, so a pruned
layer routes with a single group, which selects exactly the same experts.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .base import MoEAdapter


def _attr(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


class ScoredRouterAdapter(MoEAdapter):
    """Base of the correction-bias families: subclasses set the class attributes."""

    weights = "sigmoid"
    # Where the bias lives, from the MoE block (None: no bias), and whether it is a row [1, E].
    bias_path: Optional[str] = "gate.e_score_correction_bias"
    bias_is_row = False
    norm_eps = 0.0
    # Config fields, for the checks against the weights.
    expert_count_keys = ("n_routed_experts",)
    top_k_key = "num_experts_per_tok"

    def __init__(self, model):
        super().__init__(model)
        self.check_layers()

    # ---- the rule ----

    def choice_bias(self, block: nn.Module) -> Optional[torch.Tensor]:
        if self.bias_path is None:
            return None
        bias = _attr(block, self.bias_path).detach()
        return bias.reshape(-1)

    def groups(self, block: nn.Module) -> tuple[int, int]:
        """``(num_groups, top_groups)`` of the router, ``(1, 1)`` when it has none."""
        router = self.router_of(block)
        return int(getattr(router, "num_group", 1) or 1), int(getattr(router, "topk_group", 1) or 1)

    def routing_rule(self, block: nn.Module):
        from ..search import RoutingRule

        bias = self.choice_bias(block)
        num_groups, top_groups = self.groups(block)
        renormalize = self.renormalize(block)
        return RoutingRule(int(self.router_of(block).top_k), renormalize, self.scaling_factor(block),
                           weights=self.weights,
                           choice_bias=None if bias is None else bias.double().cpu().numpy(),
                           num_groups=num_groups, top_groups=min(top_groups, num_groups),
                           norm_eps=self.norm_eps if renormalize else 0.0)

    def scaling_factor(self, block: nn.Module) -> float:
        return float(getattr(self.router_of(block), "routed_scaling_factor", 1.0))

    @classmethod
    def export_config(cls, config, num_experts: int) -> None:
        """As the base; a group-limited router keeps its groups only while they stay equal, and one
        whose groups are all taken selects the plain top-k, written as a single group."""
        n_group = int(getattr(config, "n_group", 1) or 1)
        topk_group = int(getattr(config, "topk_group", 1) or 1)
        if n_group > 1 and topk_group < n_group and num_experts % n_group:
            raise ValueError(f"{cls.family}: {num_experts} experts cannot form the router's {n_group} equal groups; "
                             "export needs equal drops from every group")
        super().export_config(config, num_experts)
        if n_group > 1 and topk_group >= n_group:
            config.n_group, config.topk_group = 1, 1

    # ---- checks ----

    def check_layers(self) -> None:
        """Refuses a model whose expert count, top-k, bias or groups contradict its weights."""
        record = getattr(self.config, "moei2", None)
        configured = getattr(self.config, self.expert_count_keys[0], None)
        top_k = getattr(self.config, self.top_k_key, None)
        for view in self.moe_layers():
            block, where = view.moe_module, f"{self.family} layer {view.layer_index}"
            num_experts = int(view.router.weight.shape[0])
            experts = self.experts_of(block)
            held = len(experts) if hasattr(experts, "lowrank") else int(experts.gate_up_proj.shape[0])
            if held != num_experts:
                raise ValueError(f"{where}: the router scores {num_experts} experts but the layer holds {held}")
            if not record and configured is not None and num_experts != int(configured):
                raise ValueError(f"{where}: config {self.expert_count_keys[0]}={configured} but the router has "
                                 f"{num_experts} rows")
            if top_k is not None and not 1 <= int(top_k) <= num_experts:
                raise ValueError(f"{where}: config {self.top_k_key}={top_k} must be in [1, {num_experts}] "
                                 f"for {num_experts} experts")
            bias = self.choice_bias(block)
            if bias is not None and bias.numel() != num_experts:
                raise ValueError(f"{where}: the correction bias has {bias.numel()} entries for {num_experts} experts")
            num_groups, top_groups = self.groups(block)
            if num_groups > 1:
                if num_experts % num_groups or num_experts // num_groups < 2:
                    raise ValueError(f"{where}: n_group={num_groups} must divide the {num_experts} experts into "
                                     "groups of at least 2")
                if top_groups < 1:
                    raise ValueError(f"{where}: topk_group={top_groups} must be >= 1")
                if top_groups < num_groups and top_groups * (num_experts // num_groups) < int(view.top_k):
                    raise ValueError(f"{where}: topk_group={top_groups} groups of {num_experts // num_groups} "
                                     f"hold fewer than top_k={view.top_k} experts")

    def group_limited(self, block: nn.Module) -> bool:
        num_groups, top_groups = self.groups(block)
        return num_groups > top_groups

    def check_drop(self, decoder_layer: nn.Module, drop: Iterable, *, layer_name: str = "layer") -> list[int]:
        drop = list(drop) if not isinstance(drop, (str, bytes)) and isinstance(drop, Iterable) else drop
        kept = super().check_drop(decoder_layer, drop, layer_name=layer_name)
        block = self.moe_block(decoder_layer)
        num_groups, _ = self.groups(block)
        num_experts = int(self.router_of(block).weight.shape[0])
        if num_groups > 1 and self.group_limited(block) and len(kept) < num_experts:
            size = num_experts // num_groups
            per_group = [sum(1 for j in kept if j // size == g) for g in range(num_groups)]
            if len(set(per_group)) != 1 or per_group[0] < 2:
                raise ValueError(f"{layer_name}: group-limited routing (n_group={num_groups}) needs every group to "
                                 f"keep the same number (>= 2) of experts; this drop keeps {per_group}")
        return kept

    # ---- pruning ----

    def _keep(self, block: nn.Module, kept: list[int]) -> None:
        grouped = self.group_limited(block)
        super()._keep(block, kept)
        if self.choice_bias(block) is not None:
            owner_path, _, name = self.bias_path.rpartition(".")
            owner = _attr(block, owner_path) if owner_path else block
            old = getattr(owner, name)
            index = torch.tensor(kept, dtype=torch.long, device=old.device)
            with torch.no_grad():
                new = old.index_select(old.dim() - 1, index).clone()
            if isinstance(old, nn.Parameter):
                setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                owner.register_buffer(name, new)
        router = self.router_of(block)
        if hasattr(router, "num_group") and not grouped:
            # Every group was taken: one group of the survivors selects the same experts, and the
            # forward's reshape into equal groups no longer has to hold.
            router.num_group, router.topk_group = 1, 1
