"""Block-wise KT-reception field: every combination of the block's candidates through the real layers.

A candidate mask is applied through the routing: a forward hook on the router sets the logits of
the dropped experts to -inf and recomputes the top-k weights with the family's own rule (softmax,
top-k, renormalise or not, scaling factor; as :func:`moei2.search.route` does). The decoder
layer routes exactly as the pruned layer would, so no layer is copied and the K^T walk holds no
extra weights; it still costs K + K^2 + ... + K^T layer passes (:func:`moei2.blockwise.search_block`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np
import torch


@dataclass
class KTBlock:
    """The KT choice of one block: the candidate chosen at each of its MoE layers."""

    layers: list
    choice: list
    loss: Optional[float]
    per_layer_best: list
    per_layer_best_loss: Optional[float]
    combinations: list
    losses: list

    def to_dict(self) -> dict:
        return {"layers": self.layers, "choice": self.choice, "loss": self.loss,
                "per_layer_best": self.per_layer_best, "per_layer_best_loss": self.per_layer_best_loss,
                "combinations": self.combinations, "losses": self.losses}

    @classmethod
    def from_dict(cls, d: dict) -> "KTBlock":
        return cls(layers=d["layers"], choice=d["choice"], loss=d["loss"],
                   per_layer_best=d.get("per_layer_best", d["choice"]),
                   per_layer_best_loss=d["per_layer_best_loss"], combinations=d["combinations"], losses=d["losses"])


@dataclass
class KTChoices:
    """The KT stage's result over a run: each finished block's :class:`KTBlock` by block index,
    recorded in the run state under :attr:`RESUME_KEY` as each block finishes; ``chosen`` maps
    every MoE layer of those blocks to its chosen candidate."""

    blocks: dict = field(default_factory=dict)  # {block index: KTBlock}
    chosen: dict = field(default_factory=dict, init=False)  # {layer: candidate index}

    RESUME_KEY: ClassVar[str] = "blocks"

    def __post_init__(self):
        for block in self.blocks.values():
            self.chosen.update(zip(block.layers, block.choice))

    @classmethod
    def resume(cls, state) -> "KTChoices":
        return cls({int(i): KTBlock.from_dict(b) for i, b in state.get(cls.RESUME_KEY, {}).items()})

    def add(self, state, index: int, block: KTBlock) -> None:
        self.blocks[index] = block
        self.chosen.update(zip(block.layers, block.choice))
        state.put(self.RESUME_KEY, {str(i): b.to_dict() for i, b in self.blocks.items()})

    def report(self) -> dict:
        """The report's ``blocks``: every block's choice, in order."""
        return {"blocks": [self.blocks[i].to_dict() for i in sorted(self.blocks)]}


@contextlib.contextmanager
def masked_routing(view, mask):
    """Within the scope, MoE layer ``view`` routes as if the experts in ``mask`` (True = dropped)
    were pruned. The router's output ``(logits, top-k weights, top-k indices)`` is rewritten."""
    drop = torch.as_tensor(np.asarray(mask, dtype=bool))
    if drop.shape != (view.num_experts,):
        raise ValueError(f"layer {view.layer_index}: mask of {drop.numel()} experts for a layer of {view.num_experts}")
    if not bool(drop.any()):
        yield
        return
    rule = view.rule
    if not view.adapter.router_gives_choice:
        hook = _router_output_hook(view, rule, drop)
    elif rule.weights != "softmax" or rule.choice_bias is not None:
        hook = _rule_hook(rule, drop)
    else:
        hook = _softmax_hook(view, drop)
    handle = view.router.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _softmax_hook(view, drop):
    """The router hook for a plain softmax rule: the survivors' softmax, top-k, renormalised and
    scaled as the layer does, in torch on the router's device."""
    top_k, renormalize, scaling = view.top_k, view.renormalize, view.scaling_factor
    # Moved to the router's device once: a host-to-device copy on every router call is a sync
    # per layer and batch of the K^T walk.
    placed = {drop.device: drop}

    def hook(module, args, output):
        logits, weights = output[0], output[1]
        if logits.device not in placed:
            placed[logits.device] = drop.to(logits.device)
        z = logits.masked_fill(placed[logits.device], float("-inf"))
        w, index = torch.topk(torch.softmax(z, dim=-1, dtype=torch.float32), top_k, dim=-1)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        if scaling != 1.0:
            w = w * scaling
        return (z, w.to(weights.dtype), index) + tuple(output[3:])

    return hook


def _rule_hook(rule, drop):
    """The router hook for the rules beyond a plain softmax: the survivors routed by
    :meth:`moei2.search.RoutingRule.route` (float64, from the router's float32 logits)."""
    def hook(module, args, output):
        logits, weights = output[0], output[1]
        index, w = rule.route(logits.detach().reshape(-1, logits.shape[-1]).double().cpu().numpy(), drop.numpy())
        z = logits.masked_fill(drop.to(logits.device), float("-inf"))
        return (z, torch.from_numpy(w).to(device=weights.device, dtype=weights.dtype),
                torch.from_numpy(index).to(weights.device)) + tuple(output[3:])

    return hook


def _router_output_hook(view, rule, drop):
    """The router hook for a router whose output is not the layout's choice (Llama 4's
    (scores, logits)): the family's adapter rewrites it."""
    def hook(module, args, output):
        return view.adapter.masked_router_output(output, drop, rule)

    return hook


def choose_block(ctx, block: list, modules: dict, selections: dict, hidden_start: torch.Tensor,
                 target: torch.Tensor) -> KTBlock:
    """The KT choice for ``block`` (its MoE layer indices).

    modules: every resident decoder layer from the block's first to its last layer (dense ones
    included). hidden_start: the hidden state entering the block; target: what the unmodified
    block outputs from it. The loss of a combination is the sum over calibration batches of the
    Frobenius norm of the block output's error.
    """
    from ..blockwise import search_block

    last = block[-1]
    spans = [list(range(l, (block[i + 1] if i + 1 < len(block) else last + 1))) for i, l in enumerate(block)]
    num_cands = [len(selections[l].masks) for l in block]
    per_layer_best = [selections[l].best for l in block]
    if int(np.prod(num_cands)) == 1:
        return KTBlock(layers=list(block), choice=per_layer_best, loss=None, per_layer_best=per_layer_best,
                       per_layer_best_loss=None, combinations=[per_layer_best], losses=[None])
    views = {l: ctx.view(l, modules[l]) for l in block}

    # Each node of the prefix tree runs its layer over every calibration batch at once, so a
    # layer computes (and is unparked) once per node, not once per node and batch.
    def forward(pos, cand, hidden):
        for li in spans[pos]:
            routing = masked_routing(views[li], selections[li].masks[cand]) if li == block[pos] \
                else contextlib.nullcontext()
            with routing, ctx.computing(modules[li]) as module:
                hidden = ctx.run(li, module, hidden)
        return hidden

    def distance(out, target):
        # Summed over the calibration batches in order: the loss convention of moei2.
        total = 0.0
        for b in ctx.batches:
            total += torch.linalg.vector_norm((out[b] - target[b]).double()).item()
        return total

    with torch.no_grad():
        combos, losses = search_block(num_cands, forward, [(hidden_start, target)], distance)
    best = int(np.argmin(losses))
    baseline = int(np.flatnonzero((combos == np.array(per_layer_best)).all(axis=1))[0])
    return KTBlock(layers=list(block), choice=combos[best].tolist(), loss=float(losses[best]),
                   per_layer_best=per_layer_best, per_layer_best_loss=float(losses[baseline]),
                   combinations=combos.tolist(), losses=losses.tolist())
