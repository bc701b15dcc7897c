"""The uniform view of a transformers 5 MoE causal LM that the rest of moei2 works on.

In transformers 5 the families moei2 supports share one layout: decoder layers in
``model.model.layers``; in an MoE layer, ``layer.mlp`` is the sparse block, ``layer.mlp.gate`` the
router (its ``weight`` is [E, H] and its forward returns ``(raw logits, top-k weights, top-k
indices)``) and ``layer.mlp.experts`` the routed experts with fused parameters ``gate_up_proj``
[E, 2I, H] (gate rows over up rows) and ``down_proj`` [E, H, I]. Checkpoints on disk keep
per-expert keys; transformers fuses them at load time. A family adapter only says which classes
make up its MoE block and how its router turns logits into weights.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional

import torch
from torch import nn

from ..modules import LowRankExperts


def as_index(value, what: str) -> int:
    """An integer index from user input. Bools are refused although Python treats them as ints:
    ``True`` as an expert or layer index is always a mistake."""
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is a bool, not an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} {value!r} is not an integer") from None


class MoEView:
    """One MoE layer, read live from its modules (so it stays right after pruning or low-rank).

    Attributes: ``layer_index``, ``decoder_layer``, ``moe_module`` (the sparse block: hook it to see
    the MoE input, i.e. the hidden state after attention and ``post_attention_layernorm``),
    ``router``, ``router_weight`` [E, H], ``experts_module``, ``gate_up_proj`` [E, 2I, H] and
    ``down_proj`` [E, H, I] (``None`` once the layer is low-rank), ``expert(j)``, ``num_experts``,
    ``top_k``, ``renormalize``, ``scaling_factor``, ``hidden_size``, ``intermediate_size``,
    ``shared_experts``, ``shared_expert_gate``, ``act``, ``ranks``.

    Routing rule: ``rule`` (a :class:`moei2.search.RoutingRule`). For the softmax families it is
    ``p = softmax(x @ router_weight.T)`` over the layer's experts, the ``top_k`` largest are chosen,
    divided by their sum if ``renormalize``, then multiplied by ``scaling_factor``; the output is
    ``sum_j w_j expert_j(x)`` plus the shared experts' output.
    """

    def __init__(self, adapter: "MoEAdapter", layer_index: int, decoder_layer: nn.Module):
        block = adapter.moe_block(decoder_layer)
        if block is None:
            raise ValueError(f"layer {layer_index} of this {adapter.family} model has no routed experts")
        self.adapter = adapter
        self.layer_index = int(layer_index)
        self.decoder_layer = decoder_layer

    @property
    def moe_module(self) -> nn.Module:
        return self.adapter.moe_block(self.decoder_layer)

    @property
    def router(self) -> nn.Module:
        return self.adapter.router_of(self.moe_module)

    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.weight.detach()

    @property
    def experts_module(self) -> nn.Module:
        return self.adapter.experts_of(self.moe_module)

    @property
    def is_lowrank(self) -> bool:
        return isinstance(self.experts_module, LowRankExperts)

    @property
    def gate_up_proj(self) -> Optional[torch.Tensor]:
        experts = self.experts_module
        return None if isinstance(experts, LowRankExperts) else experts.gate_up_proj.detach()

    @property
    def down_proj(self) -> Optional[torch.Tensor]:
        experts = self.experts_module
        return None if isinstance(experts, LowRankExperts) else experts.down_proj.detach()

    def expert(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [I, H], up [I, H], down [H, I])`` of expert ``j`` (products ``A @ B`` when low-rank)."""
        j = operator.index(j)
        if not 0 <= j < self.num_experts:
            raise ValueError(f"expert index {j} out of range for layer {self.layer_index} with {self.num_experts} experts")
        experts = self.experts_module
        if isinstance(experts, LowRankExperts):
            with torch.no_grad():
                return tuple(experts[j].weight(name).detach() for name in ("gate", "up", "down"))
        inter = self.intermediate_size
        gate_up = experts.gate_up_proj.detach()[j]
        return gate_up[:inter], gate_up[inter:], experts.down_proj.detach()[j]

    def intermediate(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The input of expert ``j``'s down projection, ``act(gate x) * (up x)``, for rows ``x`` [n, H]."""
        experts = self.experts_module
        if isinstance(experts, LowRankExperts):
            return experts[j].intermediate(x, experts.act_fn)
        gate_up = nn.functional.linear(x, experts.gate_up_proj[j])
        gate, up = gate_up.chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def renormalize(self) -> bool:
        return bool(self.adapter.renormalize(self.moe_module))

    @property
    def scaling_factor(self) -> float:
        return float(self.adapter.scaling_factor(self.moe_module))

    @property
    def rule(self):
        """The layer's :class:`moei2.search.RoutingRule` (what the search and the block step route by)."""
        return self.adapter.routing_rule(self.moe_module)

    @property
    def hidden_size(self) -> int:
        return int(self.router.weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        return int(self.experts_module.intermediate_dim)

    @property
    def shared_experts(self) -> Optional[nn.Module]:
        return self.adapter.shared_experts(self.moe_module)

    @property
    def shared_expert_gate(self) -> Optional[nn.Module]:
        return self.adapter.shared_expert_gate(self.moe_module)

    @property
    def act(self) -> str:
        return self.adapter.hidden_act()

    @property
    def ranks(self) -> Optional[list[tuple[int, int, int]]]:
        """Per-expert ``(gate, up, down)`` ranks, or ``None`` while the experts are dense."""
        experts = self.experts_module
        return experts.ranks if isinstance(experts, LowRankExperts) else None

    def routed_parameters(self) -> int:
        return sum(p.numel() for p in self.experts_module.parameters())

    def __repr__(self) -> str:
        kind = "low-rank" if self.is_lowrank else "dense"
        return (f"MoEView(layer={self.layer_index}, experts={self.num_experts}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}, scaling={self.scaling_factor}, {kind})")


class MoEAdapter:
    """Base adapter: subclasses name the family, its model class and its MoE block class."""

    family: str = ""
    architecture: str = ""  # the causal-LM class name in transformers
    module_path: str = ""  # transformers.models.<family>.modeling_<family>
    block_class_name: str = ""
    block_attr: str = "mlp"  # the decoder layer's attribute that holds the MoE block

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_supported(self.config)

    # ---- family description (overridden by the family modules) ----

    @classmethod
    def model_class(cls):
        import importlib

        return getattr(importlib.import_module(cls.module_path), cls.architecture)

    @classmethod
    def block_class(cls):
        import importlib

        return getattr(importlib.import_module(cls.module_path), cls.block_class_name)

    @classmethod
    def check_supported(cls, config) -> None:
        """Raises ValueError if this configuration routes in a way moei2 does not reproduce."""

    def renormalize(self, block: nn.Module) -> bool:
        return bool(getattr(self.router_of(block), "norm_topk_prob", False))

    def scaling_factor(self, block: nn.Module) -> float:
        return 1.0

    def group_limited(self, block: nn.Module) -> bool:
        """Whether the router limits each token to its best groups of experts (read from the
        router's settings, never its weights, so it works on a streamed model's empty layers)."""
        return False

    def hidden_act(self) -> str:
        """The routed experts' activation."""
        return str(self.config.hidden_act)

    def routing_rule(self, block: nn.Module):
        """The block's routing rule; families beyond softmax-then-top-k override this."""
        from ..search import RoutingRule

        return RoutingRule(int(self.router_of(block).top_k), self.renormalize(block), self.scaling_factor(block))

    def shared_experts(self, block: nn.Module) -> Optional[nn.Module]:
        return None

    def shared_expert_gate(self, block: nn.Module) -> Optional[nn.Module]:
        return None

    def router_of(self, block: nn.Module) -> nn.Module:
        return block.gate

    def experts_of(self, block: nn.Module) -> nn.Module:
        return block.experts

    def set_experts(self, block: nn.Module, experts: nn.Module) -> None:
        block.experts = experts

    def _set_counts(self, block: nn.Module, num_experts: int) -> None:
        """Sets every expert count the block's forward reads (not the config, which layers share)."""
        self.router_of(block).num_experts = num_experts
        experts = self.experts_of(block)
        if not isinstance(experts, LowRankExperts):
            experts.num_experts = num_experts

    # ---- the model ----

    @property
    def layers_module(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The model's decoder layers (the live ``ModuleList``)."""
        return self.layers_module

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_module)

    def moe_block(self, decoder_layer: nn.Module) -> Optional[nn.Module]:
        block = getattr(decoder_layer, self.block_attr, None)
        return block if isinstance(block, self.block_class()) else None

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers_module) if self.moe_block(layer) is not None]

    @property
    def dense_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers_module) if self.moe_block(layer) is None]

    def moe_layers(self) -> list[MoEView]:
        """One :class:`MoEView` per MoE layer, in layer order."""
        return [MoEView(self, i, layer) for i, layer in enumerate(self.layers_module)
                if self.moe_block(layer) is not None]

    def view(self, layer_index: int, decoder_layer: Optional[nn.Module] = None) -> MoEView:
        """The view of MoE layer ``layer_index``, or of ``decoder_layer`` (e.g. a copy of it)."""
        if decoder_layer is None:
            layer_index = operator.index(layer_index)
            if not 0 <= layer_index < self.num_hidden_layers:
                raise ValueError(f"layer index {layer_index} out of range: the model has {self.num_hidden_layers} layers")
            decoder_layer = self.layers_module[layer_index]
        return MoEView(self, layer_index, decoder_layer)

    # ---- structural edits ----

    def check_drop(self, decoder_layer: nn.Module, drop: Iterable, *, layer_name: str = "layer") -> list[int]:
        """Validates ``drop`` (indices into the layer's current experts); returns the kept positions."""
        block = self.moe_block(decoder_layer)
        if block is None:
            raise ValueError(f"{layer_name} has no routed experts (not a {self.block_class_name})")
        router = self.router_of(block)
        num_experts = int(router.weight.shape[0])
        top_k = int(router.top_k)
        if isinstance(drop, (str, bytes)) or not isinstance(drop, Iterable):
            raise ValueError(f"{layer_name}: experts to drop must be an iterable of integers, got {type(drop).__name__}")
        indices = []
        for j in drop:
            j = as_index(j, f"{layer_name}: expert index")
            if not 0 <= j < num_experts:
                raise ValueError(f"{layer_name}: expert index {j} out of range; the layer has {num_experts} experts")
            indices.append(j)
        if len(set(indices)) != len(indices):
            dup = sorted({j for j in indices if indices.count(j) > 1})
            raise ValueError(f"{layer_name}: expert indices {dup} are given more than once")
        kept = [j for j in range(num_experts) if j not in set(indices)]
        if len(kept) < top_k:
            raise ValueError(f"{layer_name}: dropping {len(indices)} of {num_experts} experts leaves {len(kept)}, "
                             f"fewer than top_k={top_k}")
        return kept

    def prune_layer(self, decoder_layer: nn.Module, drop: Iterable) -> list[int]:
        """Drops routed experts ``drop`` (indices into the layer's current experts) in place.

        Works on the model's own decoder layer and on a ``copy.deepcopy`` of one. The router's rows
        and the experts are kept in their order and renumbered 0..M-1; the expert counts the forward
        reads are set on the router and experts modules (never on the config, which the layers
        share). Returns the kept positions (indices into the experts before this call).
        """
        kept = self.check_drop(decoder_layer, drop)
        block = self.moe_block(decoder_layer)
        if len(kept) == self.router_of(block).weight.shape[0]:
            return kept
        self._keep(block, kept)
        return kept

    def _keep(self, block: nn.Module, kept: list[int]) -> None:
        router = self.router_of(block)
        experts = self.experts_of(block)
        index = torch.tensor(kept, dtype=torch.long, device=router.weight.device)
        with torch.no_grad():
            router.weight = nn.Parameter(router.weight.index_select(0, index).clone(),
                                         requires_grad=router.weight.requires_grad)
            if isinstance(experts, LowRankExperts):
                experts.keep(kept)
            else:
                for name in ("gate_up_proj", "down_proj"):
                    old = getattr(experts, name)
                    new = old.index_select(0, index.to(old.device)).clone()
                    setattr(experts, name, nn.Parameter(new, requires_grad=old.requires_grad))
        self._set_counts(block, len(kept))
