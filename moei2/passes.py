"""The two passes of compression over the decoder layers, which :func:`moei2.pipeline.compress_source`
sequences.

Pass 1 (:func:`pass_one`, one decoder layer resident at a time): every MoE layer's expert
importance, then the per-layer prune counts, which need every layer's importance (budget mode:
each layer's costs, then the allocator's plan). Pass 2 (:func:`pass_two`, one KT block of layers
resident at a time): for each block the search and the KT choice, then for each layer prune,
ranks, factors, propagate the hidden state and hand the layer to the sink. Each stage's result
records itself in the run state as a layer or block finishes, and a rerun resumes from it.
"""
from __future__ import annotations

import contextlib

import torch

from .stages import (KTChoices, LowRankLayers, PruneAllocation, Selection, Selections, choose_block, decompose_layer,
                     prune_counts, score_layer, search_layer, select)
from .stages.budget import BudgetPlan, layer_costs, resumed_costs, save_costs
from .stages.common import progress_bar, release_free_memory


class DeviceOutOfMemory(MemoryError):
    """The device ran out of memory; the message names the layer and what was asked for. Every
    layer finished before it is recorded in the work_dir, so a rerun resumes there."""


def _names_device_oom(run_pass):
    """Turns the device's out-of-memory error inside a pass into :class:`DeviceOutOfMemory` naming
    where it happened (``ctx.where``) and how much the failed allocation asked for."""
    import functools
    import re

    @functools.wraps(run_pass)
    def wrapper(ctx, *args, **kwargs):
        try:
            return run_pass(ctx, *args, **kwargs)
        except torch.OutOfMemoryError as exc:
            text = str(exc)
            asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)", text)
            needed = f"it needed {asked.group(1)} more" if asked else text.strip().splitlines()[0]
            resume = ("; every finished layer is in the work_dir: rerun with the same settings to resume (a smaller "
                      "calib_batch_size needs less)" if ctx.state.work_dir is not None else
                      "; with a work_dir a rerun would resume after the finished layers")
            raise DeviceOutOfMemory(f"device {ctx.device}: out of memory at {ctx.where} ({needed}){resume}") from None
    return wrapper


# ---- pass 1 -----------------------------------------------------------------------------------

def pass_one(ctx, hidden, moe_layers, budget_total) -> PruneAllocation:
    """Every MoE layer's expert importance and prune count (budget mode: its costs and the plan)."""
    config = ctx.config
    if config.budget is not None:
        with ctx.timer("budget_costs"):
            costs = _budget_pass(ctx, hidden, moe_layers)
        with ctx.timer("budget_allocation"):
            plan = BudgetPlan.make(config, {l: costs[l][0] for l in moe_layers}, budget_total)
        return PruneAllocation(importance={l: costs[l][1] for l in moe_layers}, counts=plan.counts(), plan=plan)
    if not config.prunes:
        return PruneAllocation(importance={}, counts={l: 0 for l in moe_layers})
    with ctx.timer("importance"):
        importance = _importance_pass(ctx, hidden, moe_layers)
    views = ctx.adapter.moe_layers()
    num_experts, top_k = ({v.layer_index: int(getattr(v, name)) for v in views} for name in ("num_experts", "top_k"))
    counts = prune_counts(config, {l: importance[l] for l in moe_layers}, num_experts, top_k)
    return PruneAllocation(importance=importance, counts=counts)


@_names_device_oom
def _importance_pass(ctx, hidden, moe_layers) -> dict:
    """Every MoE layer's expert importance on the original model, one layer resident at a time."""
    importance = PruneAllocation.resumed_importance(ctx.state)

    def measure(i, stats, view):
        importance[i] = score_layer(ctx, stats, view)
        PruneAllocation.save_importance(ctx.state, importance)

    _first_pass(ctx, hidden, [l for l in moe_layers if l not in importance], measure, "importance")
    return importance


@_names_device_oom
def _budget_pass(ctx, hidden, moe_layers) -> dict:
    """Budget mode's pass 1: every MoE layer's costs and expert importance on the original model,
    ``{layer: (LayerCosts, importance)}``."""
    costs = {l: saved for l in moe_layers if (saved := resumed_costs(ctx.state, l)) is not None}

    def measure(i, stats, view):
        costs[i] = layer_costs(ctx, stats, view)
        save_costs(ctx.state, i, *costs[i])

    _first_pass(ctx, hidden, [l for l in moe_layers if l not in costs], measure, "budget costs")
    return costs


def _first_pass(ctx, hidden, todo, measure, stage: str) -> None:
    """Runs the original model up to the last layer of ``todo``, calling ``measure(index, stats,
    view)`` on each MoE layer of ``todo``; ``stage`` names what is measured (progress bar, errors)."""
    source = ctx.source
    if not todo:
        return
    bar = progress_bar(ctx, todo[-1] + 1, f"pass 1: {stage}")
    try:
        for i in range(todo[-1] + 1):
            ctx.where = f"layer {i} ({stage})"
            with source.layer(i) as module:
                if i in todo:
                    stats, out = ctx.capture(i, module, hidden, grams=False, keep_outputs=True)
                    measure(i, stats, ctx.view(i, module))
                    del stats
                elif i < todo[-1]:
                    out = ctx.run(i, module, hidden)
                else:
                    out = hidden
            hidden = out
            release_free_memory()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


# ---- pass 2 -----------------------------------------------------------------------------------

class LayerWriter:
    """Hands finished layers to the sink and counts what the compressed layers hold."""

    def __init__(self, source, sink):
        self.source, self.sink = source, sink
        self.dtype = getattr(source, "storage_dtype", None)
        self.params = self.bytes = self.routed = 0

    def layer(self, index: int, module) -> None:
        params = list(module.parameters())
        self.params += sum(p.numel() for p in params)
        self.bytes += sum(p.numel() * (self.dtype.itemsize if self.dtype is not None else p.element_size())
                          for p in params)
        block = self.source.adapter.moe_block(module)
        if block is not None:
            self.routed += self.source.adapter.view(index, module).routed_parameters()
        if self.sink is not None:
            self.sink.add({f"model.layers.{index}.{k}": self._out(v) for k, v in module.state_dict().items()})

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to("cpu")

    def write_all(self) -> None:
        for i in range(self.source.adapter.num_hidden_layers):
            with self.source.layer(i) as module:
                self.layer(i, module)


@_names_device_oom
def pass_two(ctx, hidden, moe_layers, allocation, writer) -> "PassTwo":
    """Pass 2 over every decoder layer; returns the finished walk, which holds the stages' results."""
    from .blockwise import make_blocks

    walk = PassTwo(ctx, writer, hidden, moe_layers, allocation)
    blocks = make_blocks(moe_layers, ctx.config.kt_block if ctx.config.prunes else 1)
    walk.bar = progress_bar(ctx, ctx.adapter.num_hidden_layers, "pass 2: search, KT, low-rank")
    try:
        for bi, block in enumerate(blocks):
            walk.advance_dense(block[0])
            span = list(range(block[0], block[-1] + 1))
            if ctx.config.prunes and (bi not in walk.kt.blocks or walk.original is not None):
                walk.choose(bi, block, span)
            for li in span:
                walk.compress_layer(li)
        walk.advance_dense(ctx.adapter.num_hidden_layers)
    finally:
        if walk.bar is not None:
            walk.bar.close()
    return walk


class PassTwo:
    """Pass 2's walk over the decoder layers, in order: ``position`` is the next layer to handle,
    ``hidden`` its input in the compressed model, ``original`` its input in the unmodified model
    (only when the search sees the original hidden state). The walk sequences the stages; their
    results, resumed from the work_dir, are ``selections`` (:class:`moei2.stages.selection.Selections`),
    ``kt`` (:class:`moei2.stages.kt.KTChoices`) and ``lowrank``
    (:class:`moei2.stages.decomposition.LowRankLayers`). ``allocation``: pass 1's result (in
    budget mode its plan says which layers are low-rank, and the survivors' ranks)."""

    def __init__(self, ctx, writer, hidden, moe_layers, allocation):
        state = ctx.state
        self.ctx, self.writer, self.hidden, self.allocation = ctx, writer, hidden, allocation
        self.moe_layers = moe_layers
        self.selections = Selections.resume(state)
        self.kt = KTChoices.resume(state)
        self.lowrank = LowRankLayers.resume(state)
        self.spectra_layers = {moe_layers[0], moe_layers[-1]}
        # In "original" mode the search walks the unmodified model's hidden state next to the
        # compressed one; in "compressed" mode both are the same tensor.
        self.original = hidden if (ctx.config.search_hidden == "original" and ctx.config.prunes) else None
        self.position = 0
        self.bar = None

    def layer_report(self, layer: int, num_experts: int) -> dict:
        """The report's entries of one MoE layer (of ``num_experts`` before pruning) for the
        search and KT stages: what they chose, or every expert kept when nothing is pruned."""
        if self.ctx.config.prunes:
            return self.selections[layer].report(self.kt.chosen[layer])
        return {"dropped": [], "kept": list(range(num_experts))}

    def _done(self, index: int) -> None:
        release_free_memory()
        self.position = index + 1
        if self.bar is not None:
            self.bar.update(1)

    def advance_dense(self, until: int) -> None:
        """Dense layers before ``until``: run on both hidden states and written as they are."""
        ctx = self.ctx
        while self.position < until:
            index = self.position
            ctx.where = f"layer {index}"
            with ctx.source.layer(index) as module:
                if index < self.moe_layers[-1]:
                    self.hidden = ctx.run(index, module, self.hidden)
                    if self.original is not None:
                        self.original = ctx.run(index, module, self.original)
                self.writer.layer(index, module)
            self._done(index)

    def choose(self, bi: int, block: list, span: list) -> None:
        """The block's search and KT choice, on the hidden state the method choice names. The
        block's layers are resident together, unmodified, all but the computing one parked."""
        ctx, counts = self.ctx, self.allocation.counts
        resumed = bi in self.kt.blocks
        with contextlib.ExitStack() as block_scope:
            modules = {}
            for li in span:  # each parked as it arrives: never two layers in float32 at once
                modules[li] = block_scope.enter_context(ctx.source.layer(li))
                ctx.park(modules[li])
            start = self.original if self.original is not None else self.hidden
            current = start
            for li in span:
                ctx.where = f"layer {li} (search)"
                with ctx.computing(modules[li]) as module, ctx.timer("search"):
                    if li in counts and li not in self.selections and not resumed:
                        selection, current = _select_layer(ctx, li, module, current, counts[li])
                        self.selections.add(ctx.state, li, selection)
                    else:
                        current = ctx.run(li, module, current)
            if not resumed:
                ctx.where = f"the KT walk over layers {span[0]} to {span[-1]}"
                with ctx.timer("kt_block"):
                    choice = choose_block(ctx, block, modules, self.selections.layers, start, current)
                self.kt.add(ctx.state, bi, choice)
            if self.original is not None:
                self.original = current
        release_free_memory()

    def compress_layer(self, li: int) -> None:
        """Layer ``li`` alone: prune, Grams, ranks, factors, propagate, write."""
        from . import lowrank_experts, prune_experts

        ctx, config, plan = self.ctx, self.ctx.config, self.allocation.plan
        model = ctx.source.model
        ctx.where = f"layer {li} (prune, decomposition)"
        with ctx.source.layer(li) as module:
            if li in self.allocation.counts:
                kept = None
                if config.prunes:
                    mask = self.selections[li].masks[self.kt.chosen[li]]
                    kept = [j for j, dropped in enumerate(mask) if not dropped]
                    if len(kept) < len(mask):
                        prune_experts(model, {li: [j for j, dropped in enumerate(mask) if dropped]})
                ranks = None if plan is None else plan.ranks(li, kept)
                if config.decomposes and (plan is None or ranks is not None):
                    with ctx.timer("decomposition"):
                        factors = self._factors(li, module, kept, ranks)
                        lowrank_experts(model, {li: factors})
                        del factors  # the module holds copies: free these before the next layer loads
            if li != self.moe_layers[-1]:
                with ctx.timer("propagation"):
                    self.hidden = ctx.run(li, module, self.hidden)
            self.writer.layer(li, module)
        self._done(li)

    def _factors(self, index: int, module, kept, ranks) -> dict:
        """Low-rank factors of one pruned layer: from the work_dir if finished, else computed on
        the Grams of the compressed model's hidden state and recorded. ``ranks``: budget mode's."""
        ctx = self.ctx
        view = ctx.view(index, module)
        resumed = self.lowrank.resumed_factors(ctx.state, index, int(view.num_experts))
        if resumed is not None:
            return resumed
        # Grams are computed by the decomposition a group of experts at a time (from the captured X).
        stats, _ = ctx.capture(index, module, self.hidden, grams=False, keep_outputs=False)
        spectra = [] if index in self.spectra_layers else None
        decomposition = decompose_layer(ctx, stats, view, full_importance=self.allocation.importance.get(index),
                                        kept=kept, spectra=spectra, ranks=ranks)
        del stats
        self.lowrank.add(ctx.state, index, decomposition, spectra)
        return decomposition.factors


def _select_layer(ctx, index, module, hidden, r):
    """Candidates of one MoE layer on ``hidden``, and the layer's unmodified outputs (the next
    layer of the block is searched on them)."""
    view = ctx.view(index, module)
    stats, outputs = ctx.capture(index, module, hidden, grams=False, keep_outputs=True)
    if r == 0:
        selection = Selection.keep_all(view.num_experts)
    else:
        selection = select(ctx.config, search_layer(ctx, stats, view, r), stats, r, index, view)
    return selection, outputs
