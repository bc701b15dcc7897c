"""Model adapters (one module per family), expert pruning and low-rank experts for HF MoE models.

``get_adapter(model)`` returns the adapter of a supported causal LM; ``prune_experts`` and
``lowrank_experts`` change a model in place and record what they did in ``model.config.moei2``
(experts kept per layer as ORIGINAL indices, and per-expert ranks), which :func:`moei2.save`
writes and :func:`moei2.load` rebuilds.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Optional

from .base import MoEAdapter, MoEView, as_index
from .deepseek_v2 import DeepseekV2Adapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_moe import Qwen3MoeAdapter

# ---- families whose routing is softmax over the experts, then top-k (renormalised or not, scaled or not)
from .gpt_oss import GptOssAdapter  # noqa: E402
from .granitemoe import GraniteMoeAdapter  # noqa: E402
from .hunyuan_v1_moe import HunYuanMoEV1Adapter  # noqa: E402
from .qwen3_5_moe import Qwen3_5MoeAdapter  # noqa: E402
from .qwen3_next import Qwen3NextAdapter  # noqa: E402

SOFTMAX_TOPK_FAMILIES = (Qwen3NextAdapter, Qwen3_5MoeAdapter, GraniteMoeAdapter, HunYuanMoEV1Adapter,
                         GptOssAdapter)
# ----

ADAPTERS: dict[str, type[MoEAdapter]] = {
    cls.architecture: cls
    for cls in (Qwen2MoeAdapter, DeepseekV2Adapter, MixtralAdapter, OlmoeAdapter, Qwen3MoeAdapter,
                *SOFTMAX_TOPK_FAMILIES)
}
# Families whose routers choose with a score-correction bias, group-limited top-k or sigmoid
# scores (moei2.search.RoutingRule; moei2/models/scored.py).
from .deepseek_v3 import DeepseekV3Adapter, DeepseekV32Adapter  # noqa: E402
from .dots1 import Dots1Adapter  # noqa: E402
from .ernie4_5_moe import Ernie45MoeAdapter  # noqa: E402
from .glm4_moe import Glm4MoeAdapter  # noqa: E402
from .lfm2_moe import Lfm2MoeAdapter  # noqa: E402
from .minimax_m2 import MiniMaxM2Adapter  # noqa: E402

ADAPTERS.update({cls.architecture: cls for cls in (DeepseekV3Adapter, DeepseekV32Adapter, Glm4MoeAdapter, Dots1Adapter,
                                                   MiniMaxM2Adapter, Ernie45MoeAdapter, Lfm2MoeAdapter)})
# PhiMoE: the shared layout, routed by sparsemixer (moei2.search.RoutingRule, weights="sparsemixer").
from .phimoe import PhimoeAdapter  # noqa: E402

ADAPTERS[PhimoeAdapter.architecture] = PhimoeAdapter
# Llama 4's text model: a router returning (scores, logits) and experts taking score-scaled inputs
# (moei2/models/llama4.py), routed by the rule with unit weights.
from .llama4 import Llama4Adapter  # noqa: E402

ADAPTERS[Llama4Adapter.architecture] = Llama4Adapter

FAMILIES: dict[str, type[MoEAdapter]] = {cls.family: cls for cls in ADAPTERS.values()}
STRUCTURE_FORMAT = 1
MATRICES = ("gate", "up", "down")

__all__ = ["ADAPTERS", "FAMILIES", "MoEAdapter", "MoEView", "get_adapter", "adapter_class", "prune_experts",
           "lowrank_experts", "structure_of", "apply_structure"]


def adapter_class(model) -> type[MoEAdapter]:
    """The adapter class of ``model``'s architecture (its class or any base class)."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise ValueError(f"model: unsupported architecture {type(model).__name__}; supported: {', '.join(sorted(ADAPTERS))}")


def get_adapter(model) -> MoEAdapter:
    """The adapter of ``model`` (a supported transformers causal LM).

    Raises ValueError for an unsupported architecture (listing the supported ones) or a routing
    method the adapter does not reproduce.
    """
    return adapter_class(model)(model)


# ---- the record of what was done -------------------------------------------------------------

def structure_of(model, adapter: Optional[MoEAdapter] = None) -> dict:
    """A copy of ``model.config.moei2``, or the record of an unmodified model."""
    adapter = adapter or get_adapter(model)
    record = getattr(model.config, "moei2", None)
    if isinstance(record, Mapping) and record.get("layers"):
        return copy.deepcopy(dict(record))
    return {
        "format": STRUCTURE_FORMAT,
        "family": adapter.family,
        "layers": {str(v.layer_index): {"num_experts": v.num_experts, "kept": list(range(v.num_experts)), "ranks": None}
                   for v in adapter.moe_layers()},
    }


def _per_layer_plan(adapter: MoEAdapter, requests, what: str, shape: str, check) -> dict:
    """Validates ``{layer index: request}`` before anything changes: every key an MoE layer, given
    once, and ``check(index, request)`` (which raises on bad input) turned into the plan's entry."""
    if not isinstance(requests, Mapping):
        raise ValueError(f"{what} must be a mapping {shape}, got {type(requests).__name__}")
    moe_layers = adapter.moe_layer_indices
    plan = {}
    for layer, request in requests.items():
        index = as_index(layer, f"{what}: layer key")
        if index not in moe_layers:
            raise ValueError(f"{what}: layer {index} is not an MoE layer of this model; MoE layers: {moe_layers}")
        if index in plan:
            raise ValueError(f"{what}: layer {index} is given more than once")
        plan[index] = check(index, request)
    return plan


def prune_experts(model, dropped: Mapping):
    """Removes routed experts in place and returns ``model``.

    dropped: ``{layer_index: iterable of expert indices}``; indices refer to each layer's CURRENT
    experts (after any earlier pruning), counts may differ per layer, and an empty iterable keeps
    the layer as it is. The router's rows and the fused expert tensors are sliced (survivors keep
    their order and are renumbered 0..M-1) and the expert counts the forward reads (on the router
    and experts modules) are set; ``model.config`` keeps the ORIGINAL counts, since layers may now
    differ, and the record in ``model.config.moei2`` maps each layer's experts back to original
    indices, so pruning twice composes and :func:`moei2.load` can rebuild the layout. Shared
    experts are untouched. Everything is checked before anything changes: an unknown layer, an
    index out of range, a duplicate, or fewer than ``top_k`` experts left raises ValueError and
    leaves the model untouched.
    """
    adapter = get_adapter(model)
    plan = _per_layer_plan(
        adapter, dropped, "dropped", "{layer_index: expert indices}",
        lambda index, drop: adapter.check_drop(adapter.layers_module[index], drop, layer_name=f"dropped[{index}]"))
    record = structure_of(model, adapter)
    for index, kept in plan.items():
        entry = record["layers"][str(index)]
        if len(kept) == len(entry["kept"]):
            continue
        adapter.prune_layer(adapter.layers_module[index], [j for j in range(len(entry["kept"])) if j not in set(kept)])
        entry["kept"] = [entry["kept"][j] for j in kept]
        if entry.get("ranks") is not None:
            entry["ranks"] = [entry["ranks"][j] for j in kept]
    model.config.moei2 = record
    return model


def _as_matrix(value, what: str):
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{what}: expected a floating-point array, got dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{what}: expected a floating-point tensor, got dtype {value.dtype}")
        value = value.detach()
    else:
        raise ValueError(f"{what}: expected a NumPy array or torch tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D matrix, got shape {tuple(value.shape)}")
    if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what}: contains NaN or infinite values")
    return value


def _check_factors(view: MoEView, layer_factors, index: int) -> list[dict]:
    what = f"factors[{index}]"
    if not isinstance(layer_factors, Mapping):
        raise ValueError(f"{what}: expected a mapping {{expert index: {{'gate'|'up'|'down': (A, B)}}}}, "
                         f"got {type(layer_factors).__name__}")
    num_experts, hidden, inter = view.num_experts, view.hidden_size, view.intermediate_size
    keys = {}
    for j in layer_factors:
        jj = as_index(j, f"{what}: expert key")
        if not 0 <= jj < num_experts:
            raise ValueError(f"{what}: expert {jj} out of range; the layer has {num_experts} experts")
        if jj in keys:
            raise ValueError(f"{what}: expert {jj} is given more than once")
        keys[jj] = j
    missing = [j for j in range(num_experts) if j not in keys]
    if missing:
        raise ValueError(f"{what}: factors for experts {missing} are missing; all {num_experts} experts of the layer "
                         "must be given")
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    out = []
    for j in range(num_experts):
        mats = layer_factors[keys[j]]
        if not isinstance(mats, Mapping) or set(mats) != set(MATRICES):
            got = sorted(mats) if isinstance(mats, Mapping) else type(mats).__name__
            raise ValueError(f"{what}[{j}]: expected keys 'gate', 'up', 'down', got {got}")
        expert = {}
        for name in MATRICES:
            pair = mats[name]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"{what}[{j}][{name!r}]: expected a pair (A, B)")
            a = _as_matrix(pair[0], f"{what}[{j}][{name!r}] A")
            b = _as_matrix(pair[1], f"{what}[{j}][{name!r}] B")
            m, n = shapes[name]
            if a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0] or a.shape[1] < 1:
                raise ValueError(f"{what}[{j}][{name!r}]: A {tuple(a.shape)} @ B {tuple(b.shape)} does not make a "
                                 f"[{m}, {n}] matrix of rank >= 1 (A must be [{m}, r], B [r, {n}])")
            expert[name] = (a, b)
        out.append(expert)
    return out


def lowrank_experts(model, factors: Mapping):
    """Replaces the routed experts of the given layers by low-rank factors, in place; returns ``model``.

    factors: ``{layer_index: {j: {"gate": (A, B), "up": (A, B), "down": (A, B)}}}`` with ``j`` the
    CURRENT expert index and ``W ≈ A @ B``: gate/up A [I, r], B [r, H]; down A [H, r], B [r, I].
    Ranks may differ per expert and per matrix; every expert of a given layer must be present.
    A and B may be NumPy arrays or torch tensors; they are stored in the dtype and on the device of
    the experts they replace. The layer's experts module becomes a :class:`moei2.modules.LowRankExperts`
    computing ``down_A(down_B(act(gate_A(gate_B x)) * up_A(up_B x)))`` per expert; the ranks are
    recorded in ``model.config.moei2``. All input is checked first; on error nothing changes.
    """
    import torch

    adapter = get_adapter(model)
    plan = _per_layer_plan(adapter, factors, "factors", "{layer_index: {expert: factors}}",
                           lambda index, layer_factors: _check_factors(adapter.view(index), layer_factors, index))
    record = structure_of(model, adapter)
    for index, experts in plan.items():
        view = adapter.view(index)
        old = view.experts_module
        reference = next(old.parameters())
        ranks = [tuple(int(experts[j][name][0].shape[1]) for name in MATRICES) for j in range(len(experts))]
        module = adapter.lowrank_experts_module(old, view.hidden_size, view.intermediate_size, ranks,
                                                dtype=reference.dtype, device=reference.device)
        with torch.no_grad():
            for j, mats in enumerate(experts):
                for name in MATRICES:
                    a, b = module[j].factors(name)
                    a.copy_(mats[name][0].to(dtype=a.dtype, device=a.device))
                    b.copy_(mats[name][1].to(dtype=b.dtype, device=b.device))
                biases = view.expert_biases(j)
                if biases is not None:  # kept exact: the factors approximate the weights alone
                    for name, bias in zip(MATRICES, biases):
                        getattr(module[j], f"{name}_bias").copy_(bias)
        module.train(old.training)
        adapter.set_experts(view.moe_module, module)
        record["layers"][str(index)]["ranks"] = [list(r) for r in ranks]
    model.config.moei2 = record
    return model


def check_structure(adapter: MoEAdapter, record) -> dict:
    """Validates a ``moei2`` record against an UNMODIFIED model of the same configuration."""
    if not isinstance(record, Mapping):
        raise ValueError(f"moei2 record: expected a mapping, got {type(record).__name__}")
    if record.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"moei2 record: unknown format {record.get('format')!r} (this moei2 reads format {STRUCTURE_FORMAT})")
    if record.get("family") != adapter.family:
        raise ValueError(f"moei2 record: family {record.get('family')!r} does not match the model's {adapter.family!r}")
    layers = record.get("layers")
    if not isinstance(layers, Mapping):
        raise ValueError("moei2 record: 'layers' must be a mapping")
    moe_layers = adapter.moe_layer_indices
    if sorted(layers, key=lambda k: int(k) if str(k).isdigit() else -1) != [str(i) for i in moe_layers]:
        raise ValueError(f"moei2 record: layers {sorted(layers)} do not match the model's MoE layers {moe_layers}")
    for i in moe_layers:
        entry = layers[str(i)]
        view = adapter.view(i)
        num_experts = view.num_experts
        if not isinstance(entry, Mapping) or entry.get("num_experts") != num_experts:
            raise ValueError(f"moei2 record: layer {i} records {entry.get('num_experts') if isinstance(entry, Mapping) else entry!r} "
                             f"original experts, the configuration builds {num_experts}")
        kept = entry.get("kept")
        if (not isinstance(kept, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in kept)
                or kept != sorted(set(kept)) or not all(0 <= j < num_experts for j in kept)):
            raise ValueError(f"moei2 record: layer {i} 'kept' must be increasing distinct expert indices in [0, {num_experts})")
        if len(kept) < view.top_k:
            raise ValueError(f"moei2 record: layer {i} keeps {len(kept)} experts, fewer than top_k={view.top_k}")
        ranks = entry.get("ranks")
        if ranks is not None:
            if not isinstance(ranks, list) or len(ranks) != len(kept):
                raise ValueError(f"moei2 record: layer {i} 'ranks' must list one [gate, up, down] triple per kept expert")
            for r in ranks:
                if (not isinstance(r, (list, tuple)) or len(r) != 3
                        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in r)):
                    raise ValueError(f"moei2 record: layer {i} rank entry {r!r} is not three positive integers")
    return dict(record)


def apply_structure(model, record) -> None:
    """Rebuilds the pruned / low-rank layout of ``record`` on an unmodified ``model`` (weights are not set).

    Used when loading: the model is built from its original configuration, then reshaped here, then
    its weights are read from the checkpoint.
    """
    adapter = get_adapter(model)
    record = check_structure(adapter, record)
    for i in adapter.moe_layer_indices:
        entry = record["layers"][str(i)]
        layer = adapter.layers_module[i]
        kept = set(entry["kept"])
        adapter.prune_layer(layer, [j for j in range(entry["num_experts"]) if j not in kept])
        if entry.get("ranks") is not None:
            view = adapter.view(i)
            old = view.experts_module
            reference = next(old.parameters())
            module = adapter.lowrank_experts_module(old, view.hidden_size, view.intermediate_size, entry["ranks"],
                                                    dtype=reference.dtype, device=reference.device)
            adapter.set_experts(view.moe_module, module)
    model.config.moei2 = copy.deepcopy(dict(record))
