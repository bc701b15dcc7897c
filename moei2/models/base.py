"""The uniform view of a transformers 5 MoE causal LM that the rest of moei2 works on.

The families moei2 supports share one layout, described here once: decoder layers in
``model.model.layers``; in an MoE layer, one attribute of the decoder layer holds the sparse block
(``mlp`` by default), whose router (``gate`` by default; its forward returns ``(raw logits, top-k
weights, top-k indices)``, its ``weight`` or that of a linear submodule is [E, H]) and routed
experts (``experts``) with fused 3-D parameters ``gate_up_proj`` [E, 2I, H] (gate rows over up
rows) and ``down_proj`` [E, H, I]. A block may add a shared expert, with or without a sigmoid gate
(``Linear(H, 1)``). Checkpoints on disk keep per-expert keys; transformers fuses them at load
time. A family adapter declares only what differs from this layout (class attributes) and how its
router turns logits into weights; a block whose router or experts talk differently (Llama 4's
``(scores, logits)`` router and score-scaled expert inputs) overrides ``router_choice``,
``routed_output``, ``masked_router_output`` and ``expert_input``.
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
        return self.adapter.router_linear(self.router).weight.detach()

    @property
    def experts_module(self) -> nn.Module:
        return self.adapter.experts_of(self.moe_module)

    @property
    def is_lowrank(self) -> bool:
        return isinstance(self.experts_module, LowRankExperts)

    @property
    def gate_up_proj(self) -> Optional[torch.Tensor]:
        """[E, 2I, H]; ``None`` once low-rank or where the family's experts are not the shared layout."""
        experts = self.experts_module
        standard = self.adapter.standard_experts and not isinstance(experts, LowRankExperts)
        return experts.gate_up_proj.detach() if standard else None

    @property
    def down_proj(self) -> Optional[torch.Tensor]:
        experts = self.experts_module
        standard = self.adapter.standard_experts and not isinstance(experts, LowRankExperts)
        return experts.down_proj.detach() if standard else None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The router's logits for rows ``x`` [n, H] in float64 (router bias included)."""
        linear = self.adapter.router_linear(self.router)
        logits = x.double() @ linear.weight.detach().to(device=x.device, dtype=torch.float64).T
        bias = getattr(linear, "bias", None)
        return logits if bias is None else logits + bias.detach().to(device=x.device, dtype=torch.float64)

    def expert_input(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """What expert ``j`` receives for MoE-input rows ``x`` [n, H]: ``x`` itself, or where the
        family scales it by the router's score (Llama 4), the scaled rows."""
        return self.adapter.expert_input(self, j, x)

    def expert_output(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``j``'s output for MoE-input rows ``x`` [n, H], before the routing weight: the
        family's own expert forward (input scaling, biases and activation included)."""
        experts = self.experts_module
        x = self.expert_input(j, x)
        if isinstance(experts, LowRankExperts):
            return experts[j](x, experts.act_fn)
        return self.adapter.dense_expert_output(experts, j, x)

    def expert(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [I, H], up [I, H], down [H, I])`` of expert ``j`` (products ``A @ B`` when low-rank)."""
        j = operator.index(j)
        if not 0 <= j < self.num_experts:
            raise ValueError(f"expert index {j} out of range for layer {self.layer_index} with {self.num_experts} experts")
        experts = self.experts_module
        if isinstance(experts, LowRankExperts):
            with torch.no_grad():
                return tuple(experts[j].weight(name).detach() for name in ("gate", "up", "down"))
        return self.adapter.dense_expert(experts, j)

    def expert_biases(self, j: int) -> Optional[tuple]:
        """``(gate [I], up [I], down [H])`` biases of expert ``j``, or ``None`` where experts have none."""
        experts = self.experts_module
        if isinstance(experts, LowRankExperts):
            e = experts[j]
            return None if e.gate_bias is None else (e.gate_bias.detach(), e.up_bias.detach(), e.down_bias.detach())
        return self.adapter.dense_expert_biases(experts, j)

    def gated_activation(self):
        """The experts' ``glu(gate, up)`` (:meth:`MoEAdapter.gated_activation`)."""
        return self.adapter.gated_activation(self.experts_module)

    def intermediate(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The input of expert ``j``'s down projection, ``act(gate x) * (up x)`` (the family's gated
        activation and biases where it has them), for MoE-input rows ``x`` [n, H]."""
        experts = self.experts_module
        x = self.expert_input(j, x)
        if isinstance(experts, LowRankExperts):
            return experts[j].intermediate(x, experts.act_fn)
        return self.adapter.dense_intermediate(experts, j, x)

    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0])

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
        return int(self.router_weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        experts = self.experts_module
        return int(getattr(experts, "intermediate_dim", None) or experts.intermediate_size)

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
    """Base adapter: the shared layout (see the module docstring). Subclasses name the family, its
    model class and its MoE block class, and override only the attributes where they differ."""

    family: str = ""
    architecture: str = ""  # the causal-LM class name in transformers
    module_path: str = ""  # transformers.models.<family>.modeling_<family>
    block_class_name: str = ""
    # ---- the layout: attribute names, overridden where a family differs ----
    moe_attr: str = "mlp"  # the decoder layer's attribute holding the sparse block
    router_attr: str = "gate"  # the block's router
    router_linear_attr: Optional[str] = None  # the router's submodule holding ``weight`` (None: the router)
    experts_attr: str = "experts"
    shared_expert_attr: Optional[str] = None  # a shared expert whose output is added
    shared_expert_gate_attr: Optional[str] = None  # its gate: output scaled by sigmoid(gate(x))
    renormalize_topk: Optional[bool] = None  # None: the router's ``norm_topk_prob``
    scaling_attr: Optional[str] = None  # the router's attribute holding a routed scaling factor
    # Model-key suffix -> the suffix checkpoints store it under, where transformers renames on load.
    stored_names: dict = {}
    # ---- config.json keys: every key holding the routed-expert count (export sets them), top-k ----
    expert_count_keys: tuple = ("num_experts",)
    top_k_key: str = "num_experts_per_tok"
    expert_width_key: str = "moe_intermediate_size"  # the routed experts' intermediate size

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_supported(self.config)
        for view in self.moe_layers():
            if not 1 <= view.top_k <= view.num_experts:
                raise ValueError(f"{self.family}: layer {view.layer_index} routes each token to top_k={view.top_k} "
                                 f"experts but its router has {view.num_experts}; the configuration "
                                 f"({self.top_k_key}) contradicts the weights")

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

    # ---- the dense experts (the shared layout; a family with another expert forward overrides these) ----
    # True where the experts are the fused layout computing ``down(act(gate x) * (up x))`` without
    # biases, which the C core evaluates from the weights; otherwise candidate outputs are computed
    # with the family's own expert forward (``dense_expert_output``).
    standard_experts: bool = True

    def dense_expert(self, experts: nn.Module, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [I, H], up [I, H], down [H, I])`` of dense expert ``j``."""
        inter = int(experts.intermediate_dim)
        gate_up = experts.gate_up_proj.detach()[j]
        return gate_up[:inter], gate_up[inter:], experts.down_proj.detach()[j]

    def dense_expert_biases(self, experts: nn.Module, j: int) -> Optional[tuple]:
        """``(gate [I], up [I], down [H])`` biases of dense expert ``j``; ``None`` without biases."""
        return None

    def dense_intermediate(self, experts: nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = nn.functional.linear(x, experts.gate_up_proj[j])
        gate, up = gate_up.chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    def dense_expert_output(self, experts: nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.dense_intermediate(experts, j, x), experts.down_proj[j])

    def gated_activation(self, experts: nn.Module):
        """``glu(gate, up)``: the down projection's input from the gate and up pre-activations
        (biases included), elementwise per channel: ``act(gate) * up``, or the activation's own
        ``glu`` where it has one (low-rank experts keep the family's)."""
        act = experts.act_fn
        glu = getattr(act, "glu", None)
        return glu if glu is not None else (lambda gate, up: act(gate) * up)

    def expert_input(self, view: MoEView, j: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``j``'s input for MoE-input rows ``x``: ``x`` in the shared layout."""
        return x

    # ---- what the block's router and experts modules return (the shared layout; Llama 4 overrides) ----

    def router_choice(self, output, top_k: int):
        """``(logits [T, E], top-k indices [T, k])`` from the router's output, or None when the
        output is not the layout's ``(logits, top-k weights, top-k indices)``."""
        if not isinstance(output, tuple) or len(output) < 3:
            return None
        return output[0], output[2]

    def routed_output(self, output, num_tokens: int) -> torch.Tensor:
        """The routed experts' summed output [T, H] from the experts module's output."""
        return output[0] if isinstance(output, tuple) else output

    # True where moei2's routing rules rewrite the router's (logits, weights, indices) to drop
    # experts; otherwise ``masked_router_output`` rewrites the router's own output.
    router_gives_choice: bool = True

    def masked_router_output(self, output, drop: torch.Tensor, rule):
        """The router's output as if the experts in ``drop`` (bool [E]) were pruned, for a family
        whose router does not return the layout's choice (``router_gives_choice = False``)."""
        raise NotImplementedError(f"{self.family}: the router returns the shared layout's choice")

    def lowrank_experts_module(self, dense: nn.Module, hidden_size: int, intermediate_size: int, ranks,
                               *, dtype, device) -> LowRankExperts:
        """The (uninitialised) low-rank module replacing the dense experts ``dense``."""
        return LowRankExperts(hidden_size, intermediate_size, ranks, dense.act_fn, dtype=dtype, device=device)

    @classmethod
    def export_config(cls, config, num_experts: int) -> None:
        """Edits ``config`` (a copy of the original) to describe ``num_experts`` routed experts in
        every MoE layer, for a plain checkpoint of the architecture; raises ValueError where the
        family's routing cannot be described that way."""
        for key in cls.expert_count_keys:
            setattr(config, key, num_experts)

    def renormalize(self, block: nn.Module) -> bool:
        if self.renormalize_topk is not None:
            return self.renormalize_topk
        return bool(getattr(self.router_of(block), "norm_topk_prob", False))

    def scaling_factor(self, block: nn.Module) -> float:
        return 1.0 if self.scaling_attr is None else float(getattr(self.router_of(block), self.scaling_attr))

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
        return None if self.shared_expert_attr is None else getattr(block, self.shared_expert_attr, None)

    def shared_expert_gate(self, block: nn.Module) -> Optional[nn.Module]:
        return None if self.shared_expert_gate_attr is None else getattr(block, self.shared_expert_gate_attr, None)

    def router_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def router_linear(self, router: nn.Module) -> nn.Module:
        """The module whose ``weight`` [E, H] gives the router logits."""
        return router if self.router_linear_attr is None else getattr(router, self.router_linear_attr)

    def experts_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_attr)

    def set_experts(self, block: nn.Module, experts: nn.Module) -> None:
        setattr(block, self.experts_attr, experts)

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
        block = getattr(decoder_layer, self.moe_attr, None)
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
        num_experts = int(self.router_linear(router).weight.shape[0])
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
        if len(kept) == self.router_linear(self.router_of(block)).weight.shape[0]:
            return kept
        self._keep(block, kept)
        return kept

    def _keep(self, block: nn.Module, kept: list[int]) -> None:
        router = self.router_linear(self.router_of(block))
        experts = self.experts_of(block)
        index = torch.tensor(kept, dtype=torch.long, device=router.weight.device)
        with torch.no_grad():
            for name in ("weight", "bias"):  # a router bias is per expert
                old = getattr(router, name, None)
                if isinstance(old, nn.Parameter):
                    setattr(router, name, nn.Parameter(old.index_select(0, index).clone(),
                                                       requires_grad=old.requires_grad))
            if isinstance(experts, LowRankExperts):
                experts.keep(kept)
            else:
                # every per-expert tensor: the fused weights and any expert biases
                for name, old in list(experts.named_parameters(recurse=False)):
                    new = old.index_select(0, index.to(old.device)).clone()
                    setattr(experts, name, nn.Parameter(new, requires_grad=old.requires_grad))
        self._set_counts(block, len(kept))
