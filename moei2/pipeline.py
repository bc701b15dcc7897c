"""moei2.compress: the whole MoE-I2 method on a Hugging Face model, as a driver over the stages.

Pass 1 (one decoder layer resident at a time): the importance of every expert, then the
per-layer prune counts, which need every layer's importance.
Pass 2 (one KT block of layers resident at a time): for each layer of the block the search cache
and K candidate masks; the KT choice over the block; then for each layer: prune, survivor
statistics (Grams), ranks, factors, propagate the hidden state, write the layer to the sink.
Optional LoRA recovery last. The stages live in :mod:`moei2.stages`; the model is reached only
through a model source (:mod:`moei2.source`), so a checkpoint streamed from disk goes through the
same code as a model in memory. With ``work_dir`` every finished layer is recorded, and a rerun
with the same settings, model and data resumes from there.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from .config import CompressionConfig, check_rank_budget
from .calibration_data import calibration_windows
from .state import RunState
from .stages import (Context, KTBlock, Selection, choose_block, decompose_layer, prune_counts, recover,
                     score_layer, search_layer, select)
from .stages.budget import BudgetPlan, budget_target, layer_costs, layer_shape, pack_costs, unpack_costs
from .stages.common import Timer, batch_token_counts, pack_factors, progress_bar, release_free_memory, unpack_factors

__all__ = ["compress", "compress_checkpoint", "compress_source", "routed_expert_parameters", "DeviceOutOfMemory",
           "SEARCH_HIDDEN"]

# Which hidden state the search, the KT step and the Grams see (docs/method.md, "Which hidden
# state each stage sees"): "compressed", the hidden state propagated through the layers already
# compressed; "original", the unmodified model's for the search and the KT step (the Grams always
# see the compressed model's).
SEARCH_HIDDEN = "compressed"


def routed_expert_parameters(adapter) -> int:
    """Routed-expert parameters of a model, dense, pruned or low-rank."""
    return sum(view.routed_parameters() for view in adapter.moe_layers())


def _model_size(model, stored_dtype: Optional[torch.dtype] = None, outer_only: bool = False) -> tuple[int, int]:
    """Parameters and bytes of ``model`` (or of its non-layer part), in ``stored_dtype`` when given:
    a streamed model's skeleton is built in the compute dtype, not the dtype it is stored in."""
    params = [p for n, p in model.named_parameters() if not (outer_only and n.startswith("model.layers."))]
    size = (lambda p: stored_dtype.itemsize) if stored_dtype is not None else (lambda p: p.element_size())
    return sum(p.numel() for p in params), sum(p.numel() * size(p) for p in params)


def compress(model, tokenizer, texts, config: Optional[CompressionConfig] = None, *, output=None,
             overwrite: bool = False, work_dir=None, progress: bool = True):
    """Compresses a model with MoE-I2 and returns ``(model, report)``.

    model: a supported Hugging Face MoE causal LM in memory (see :func:`moei2.models.get_adapter`),
    changed in place; or the path of a Hugging Face checkpoint directory, which is streamed from
    disk one layer (one KT block) at a time and written to ``output`` as layers finish (see
    :func:`compress_checkpoint`; the first value returned is then the output path).
    tokenizer: its tokenizer (for a directory, None reads the directory's). texts: calibration
    text (a string or a list of strings). config: :class:`CompressionConfig` (defaults from
    docs/method.md); ``config.device`` and ``config.dtype`` say where and in which dtype layers
    compute. output, overwrite: where a streamed result is written (for a directory only).
    work_dir: optional directory recording finished layers so
    an interrupted run resumes. The report (a JSON-serialisable dict) holds experts kept per
    layer, ranks, parameter and size reductions, each stage's loss and time, and the seed; for a
    directory also the written checkpoint's sizes under ``checkpoint``.
    """
    from .source import InMemorySource, check_device

    config = _check_config(config)
    check_device(config.device, config.dtype)
    if isinstance(model, (str, os.PathLike)):
        return compress_checkpoint(model, output, tokenizer, texts, config, overwrite=overwrite,
                                   work_dir=work_dir, progress=progress)
    if output is not None:
        raise ValueError("output: only a checkpoint directory is written by compress; save a model in memory "
                         "with moei2.save(model, path)")
    source = InMemorySource(model, device=config.device, dtype=config.dtype)
    report = compress_source(source, tokenizer, texts, config, work_dir=work_dir, progress=progress)
    return model, report


def compress_checkpoint(directory, output, tokenizer=None, texts=None, config: Optional[CompressionConfig] = None,
                        *, overwrite: bool = False, work_dir=None, progress: bool = True):
    """Compresses the checkpoint in ``directory`` streamed from disk and writes it to ``output``.

    Only one KT block of decoder layers is resident at a time (:class:`moei2.streaming.StreamedSource`);
    each layer is written to ``output``'s shards as soon as it is compressed
    (:class:`moei2.io.CheckpointWriter`), and ``output`` appears, atomically, only when all are.
    The input and the output location are checked before any long work. With ``config.lora``
    the compressed checkpoint (far smaller than the original) is then loaded, recovered and
    saved again. Returns ``(output path, report)``; ``moei2.load(output)`` gives the model.
    """
    import dataclasses

    from .io import load, save
    from .paths import check_run_paths
    from .streaming import StreamedSource

    from .source import check_device

    config = _check_config(config)
    check_device(config.device, config.dtype)
    if output is None:
        raise ValueError("output: compressing a checkpoint directory writes the result to a directory; "
                         "give output=")
    check_run_paths(directory, output, work_dir, names=("directory", "output", "work_dir"))
    source = StreamedSource.open(directory, device=config.device, dtype=config.dtype)
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"tokenizer: none given and {str(directory)!r} has no usable tokenizer ({exc})") from None
    streamed_config = dataclasses.replace(config, lora=None) if config.lora is not None else config
    model = source.model
    with _checkpoint_writer(output, overwrite) as writer:
        report = compress_source(source, tokenizer, texts, streamed_config, sink=writer, work_dir=work_dir,
                                 progress=progress)
        from .models import structure_of

        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and head.weight is embed.weight
        aliases = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}
        report["checkpoint"] = writer.finish(
            model.config, structure_of(model, source.adapter), architecture=type(model).__name__,
            family=source.adapter.family, dtype=str(source.storage_dtype).removeprefix("torch."), aliases=aliases,
            sizes=_checkpoint_sizes(report["parameters"]), tokenizer=_saveable(tokenizer),
            report=report if config.lora is None else None)
    if config.lora is not None:
        compressed = load(output, dtype=source.dtype, device=source.device)
        timer = Timer()
        with timer("lora"):
            report["lora"] = recover(compressed, tokenizer, texts, config).report
        report["times"]["lora"] = timer.times["lora"]
        report["times"]["total"] = report["times"].get("total", 0.0) + timer.times["lora"]
        report["config"] = config.to_dict()
        report["checkpoint"] = save(compressed.to(source.storage_dtype), output, tokenizer=_saveable(tokenizer),
                                    report=report, overwrite=True)
    return Path(output), report


def _saveable(tokenizer):
    """The tokenizer, if it can be written next to the weights (any object with the methods
    compression needs is accepted as a tokenizer)."""
    return tokenizer if callable(getattr(tokenizer, "save_pretrained", None)) else None


def _checkpoint_writer(output, overwrite: bool):
    """A writer for ``output``, created first: it checks the location before any long work."""
    from .io import CheckpointWriter

    if not isinstance(output, (str, os.PathLike)):
        raise TypeError(f"output must be a str or os.PathLike, got {type(output).__name__}")
    return CheckpointWriter(output, overwrite=overwrite)


def _checkpoint_sizes(parameters: dict) -> dict:
    """The sizes a checkpoint records, from the report's parameter counts."""
    return {"parameters_before": parameters["model_before"], "parameters_after": parameters["model_after"],
            "bytes_before": parameters["model_bytes_before"], "bytes_after": parameters["model_bytes_after"],
            "routed_expert_parameters_before": parameters["routed_expert_before"],
            "routed_expert_parameters_after": parameters["routed_expert_after"]}


def compress_source(source, tokenizer, texts, config: Optional[CompressionConfig] = None, *, sink=None,
                    work_dir=None, progress: bool = True, search_hidden: Optional[str] = None) -> dict:
    """Compresses the model of ``source`` (a :class:`moei2.source.ModelSource`) and returns the report.

    sink: optional object with ``add(tensors)``, given every finished decoder layer's tensors
    (full state-dict keys, in the source's storage dtype, on the CPU) once, inside the layer's
    scope, and the non-layer tensors once at the end. search_hidden: ``"compressed"`` (default,
    :data:`SEARCH_HIDDEN`) or ``"original"``. Where the heavy stages compute follows
    ``config.kernels`` on the source's device.
    """
    config = _check_config(config)
    search_hidden = SEARCH_HIDDEN if search_hidden is None else search_hidden
    if search_hidden not in ("compressed", "original"):
        raise ValueError(f"search_hidden must be 'compressed' or 'original', got {search_hidden!r}")
    if sink is not None and not callable(getattr(sink, "add", None)):
        raise TypeError(f"sink must have an add(tensors) method, got {type(sink).__name__}")
    model, adapter = source.model, source.adapter
    _check_compressible(adapter, model, config)
    _check_prunable(adapter, config)
    budget_total = (budget_target(config, [layer_shape(v) for v in adapter.moe_layers()])
                    if config.budget is not None else None)
    if config.lora is not None and source.streamed:
        raise ValueError("LoRA recovery needs the whole model in memory; it is not available for a streamed "
                         "model: compress without lora, load the result and run moei2.lora_finetune on it")
    from .calibrate import LayerRunner

    started = time.perf_counter()
    model.eval()
    ctx = Context(source=source, config=config, runner=None, input_ids=None, batches=[], batch_sizes=[],
                  state=None, progress=progress,
                  torch_kernels=config.kernels == "torch" or (config.kernels == "auto" and source.device.type != "cpu"),
                  park_dtype=_park_dtype(source))
    with ctx.timer("calibration_data"):
        input_ids = calibration_windows(tokenizer, texts, config.num_sequences, config.seq_len, config.seed)
    vocabulary = model.get_input_embeddings().num_embeddings
    if int(input_ids.max()) >= vocabulary:
        raise ValueError(f"tokenizer: it gives token id {int(input_ids.max())}, the model's vocabulary has "
                         f"{vocabulary} tokens: the tokenizer belongs to another model")
    data_hash = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:16]
    tag = "" if search_hidden == "compressed" else f"-{search_hidden}"
    ctx.state = state = RunState(work_dir, f"{config.fingerprint()}-{source.fingerprint()}-{data_hash}{tag}")
    ctx.input_ids = input_ids
    num_sequences = int(input_ids.shape[0])
    ctx.batches = [slice(s, min(s + config.calib_batch_size, num_sequences))
                   for s in range(0, num_sequences, config.calib_batch_size)]
    ctx.batch_sizes = batch_token_counts(num_sequences, config.calib_batch_size, config.seq_len)
    ctx.runner = LayerRunner(model, adapter=adapter, device=source.device, dtype=source.dtype)

    views = adapter.moe_layers()
    moe_layers = [v.layer_index for v in views]
    num_experts = {v.layer_index: int(v.num_experts) for v in views}
    top_k = {v.layer_index: int(v.top_k) for v in views}
    stored_dtype = source.storage_dtype if source.streamed else None
    params_before, bytes_before = _model_size(model, stored_dtype)
    routed_before = routed_expert_parameters(adapter)
    report: dict = {
        "seed": config.seed,
        "config": config.to_dict(),
        "model": {"architecture": type(model).__name__, "family": adapter.family,
                  "num_hidden_layers": adapter.num_hidden_layers, "moe_layers": moe_layers,
                  "num_experts": num_experts, "top_k": top_k},
        "calibration": {"sequences": num_sequences, "seq_len": int(config.seq_len),
                        "tokens": int(input_ids.numel()), "requested_sequences": config.num_sequences},
        "resumed": state.resumed,
        "search_hidden": search_hidden,
        "layers": {str(l): {} for l in moe_layers},
    }

    with source.outer(), torch.no_grad():
        hidden = ctx.embed()
    # ---- pass 1: importance and prune counts (budget mode: the layers' costs and the plan) ----
    counts = {l: 0 for l in moe_layers}
    importance: dict = {}
    plan = None
    if config.budget is not None:
        with ctx.timer("budget_costs"):
            costs = _budget_pass(ctx, hidden, moe_layers)
        with ctx.timer("budget_allocation"):
            plan = BudgetPlan.make(config, {l: costs[l][0] for l in moe_layers}, budget_total)
        importance = {str(l): costs[l][1] for l in moe_layers}
        counts = plan.counts()
        report["budget"] = plan.record()
        for l in moe_layers:
            report["layers"][str(l)].update(importance=importance[str(l)],
                                            layer_importance=float(sum(importance[str(l)])), prune_count=counts[l])
    elif config.prunes:
        with ctx.timer("importance"):
            importance = _importance_pass(ctx, hidden, moe_layers)
        counts = prune_counts(config, {l: importance[str(l)] for l in moe_layers}, num_experts, top_k)
        for l in moe_layers:
            report["layers"][str(l)].update(importance=importance[str(l)],
                                            layer_importance=float(sum(importance[str(l)])), prune_count=counts[l])

    # ---- pass 2: search, KT choice, prune, low-rank, propagate, write ----
    writer = _Writer(source, sink if config.lora is None else None)
    results = _compression_pass(ctx, hidden, moe_layers, counts, importance, search_hidden, writer, plan)
    del hidden
    selections, chosen, blocks, ranks, spectra = results
    for l in moe_layers:
        info = report["layers"][str(l)]
        if config.prunes:
            sel = selections[l]
            dropped = [int(j) for j in np.flatnonzero(sel.masks[chosen[l]])]
            info.update(search={"candidates": sel.masks, "candidate_losses": sel.losses, "history": sel.history,
                                "evaluations": sel.evaluations, "chosen_candidate": chosen[l]},
                        dropped=dropped, kept=[j for j in range(num_experts[l]) if j not in dropped])
        else:
            info.update(dropped=[], kept=list(range(num_experts[l])))
        if str(l) in ranks:
            info["lowrank"] = ranks[str(l)]
    if config.prunes:
        report["blocks"] = [b.to_dict() for b in blocks]
    if config.decomposes:
        report["spectra"] = spectra

    # ---- LoRA recovery ----
    if config.lora is not None:
        with ctx.timer("lora"):
            report["lora"] = recover(model, tokenizer, texts, config).report
        if sink is not None:
            _Writer(source, sink).write_all()
    if sink is not None:
        sink.add(source.outer_tensors())

    if source.streamed:
        outer_params, outer_bytes = _model_size(model, stored_dtype, outer_only=True)
        params_after, bytes_after = writer.params + outer_params, writer.bytes + outer_bytes
        routed_after = writer.routed
    else:
        params_after, bytes_after = _model_size(model)
        routed_after = routed_expert_parameters(adapter)
    report["parameters"] = {
        "routed_expert_before": routed_before, "routed_expert_after": routed_after,
        "routed_expert_reduction": 1.0 - routed_after / routed_before if routed_before else 0.0,
        "model_before": params_before, "model_after": params_after,
        "model_reduction": 1.0 - params_after / params_before,
        "model_bytes_before": bytes_before, "model_bytes_after": bytes_after,
        "model_gib_before": bytes_before / 2**30, "model_gib_after": bytes_after / 2**30,
    }
    report["times"] = dict(ctx.timer.times, total=time.perf_counter() - started)
    state.close()
    return report


# ---- checks -----------------------------------------------------------------------------------

def _check_config(config) -> CompressionConfig:
    if config is None:
        return CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    return config


def _park_dtype(source) -> Optional[torch.dtype]:
    """The dtype resident layers wait in: the one they are stored in, when narrower than the
    compute dtype (it holds their values exactly); None when nothing would be saved."""
    stored = getattr(source, "storage_dtype", None)
    if stored is None or not stored.is_floating_point or stored.itemsize >= source.dtype.itemsize:
        return None
    return stored


def _check_compressible(adapter, model, config) -> None:
    """Refuses, before any work, what the pipeline cannot do: experts already low-rank, a rank
    budget the experts cannot take (a top-k above the expert count is the adapter's refusal)."""
    for view in adapter.moe_layers():
        if config.decomposes:
            check_rank_budget(config, view.hidden_size, view.intermediate_size)
    record = getattr(model.config, "moei2", None)
    lowrank = {v.layer_index for v in adapter.moe_layers() if v.is_lowrank}
    if isinstance(record, Mapping):
        lowrank |= {int(l) for l, e in (record.get("layers") or {}).items()
                    if isinstance(e, Mapping) and e.get("ranks") is not None}
    if lowrank:
        raise ValueError(
            f"model: the routed experts of layer(s) {sorted(lowrank)} are already low-rank (a model compressed "
            "by moei2); compressing low-rank experts again is not supported: start from the original model")


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


def _check_prunable(adapter, config) -> None:
    """Refuses, before any work, pruning layers with group-limited routing: the search drops any
    experts, and a group-limited router only holds equal groups (docs/method.md, "Routing rules")."""
    if not config.prunes:
        return
    grouped = [v.layer_index for v in adapter.moe_layers() if adapter.group_limited(v.moe_module)]
    if grouped:
        raise ValueError(f"model: layer(s) {grouped} use group-limited routing (n_group > topk_group), whose groups "
                         "must stay equal, which the search does not ensure; compress it with prune_ratio=0 "
                         "(low rank only)")


# ---- pass 1 -----------------------------------------------------------------------------------

@_names_device_oom
def _importance_pass(ctx, hidden, moe_layers) -> dict:
    """Every MoE layer's expert importance on the original model, one layer resident at a time."""
    state = ctx.state
    importance = dict(state.get("expert_importance", {}))

    def measure(i, stats, view):
        importance[str(i)] = score_layer(ctx, stats, view)
        state.put("expert_importance", importance)

    _first_pass(ctx, hidden, [l for l in moe_layers if str(l) not in importance], measure, "pass 1: importance")
    return importance


def _budget_pass(ctx, hidden, moe_layers) -> dict:
    """Budget mode's pass 1: every MoE layer's costs and expert importance on the original model,
    ``{layer: (LayerCosts, importance)}``."""
    state = ctx.state
    costs = {}
    for l in moe_layers:
        saved = state.load_arrays(f"budget_costs_layer{l}")
        if saved is not None:
            costs[l] = unpack_costs(saved)

    def measure(i, stats, view):
        costs[i] = layer_costs(ctx, stats, view)
        state.save_arrays(f"budget_costs_layer{i}", pack_costs(*costs[i]))

    _first_pass(ctx, hidden, [l for l in moe_layers if l not in costs], measure, "pass 1: budget costs")
    return costs


def _first_pass(ctx, hidden, todo, measure, desc) -> None:
    """Runs the original model up to the last layer of ``todo``, calling ``measure(index, stats,
    view)`` on each MoE layer of ``todo``."""
    source = ctx.source
    if not todo:
        return
    bar = progress_bar(ctx, todo[-1] + 1, desc)
    try:
        for i in range(todo[-1] + 1):
            ctx.where = f"layer {i} (importance)"
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

class _Writer:
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
def _compression_pass(ctx, hidden, moe_layers, counts, importance, search_hidden, writer, plan=None):
    """Pass 2 over every decoder layer; returns (selections, chosen, KT blocks, ranks, spectra)."""
    from .blockwise import make_blocks

    walk = _Pass2(ctx, writer, hidden, moe_layers, counts, importance, search_hidden, plan)
    blocks = make_blocks(moe_layers, ctx.config.kt_block if ctx.config.prunes else 1)
    walk.bar = progress_bar(ctx, ctx.adapter.num_hidden_layers, "pass 2: search, KT, low-rank")
    try:
        for bi, block in enumerate(blocks):
            walk.advance_dense(block[0])
            span = list(range(block[0], block[-1] + 1))
            if ctx.config.prunes and (bi not in walk.kt_done or walk.original is not None):
                walk.choose(bi, block, span)
            for li in span:
                walk.compress_layer(li)
        walk.advance_dense(ctx.adapter.num_hidden_layers)
    finally:
        if walk.bar is not None:
            walk.bar.close()
    kt = [walk.kt_done[i] for i in range(len(blocks))] if ctx.config.prunes else []
    return walk.selections, walk.chosen, kt, walk.ranks, walk.spectra


class _Pass2:
    """Pass 2's walk over the decoder layers, in order: ``position`` is the next layer to handle,
    ``hidden`` its input in the compressed model, ``original`` its input in the unmodified model
    (only when the search sees the original hidden state). Resumed choices come from the work_dir.
    ``plan``: budget mode's :class:`moei2.stages.budget.BudgetPlan` (which layers are low-rank, and
    the survivors' ranks), or None."""

    def __init__(self, ctx, writer, hidden, moe_layers, counts, importance, search_hidden, plan=None):
        state = ctx.state
        self.ctx, self.writer, self.hidden, self.plan = ctx, writer, hidden, plan
        self.moe_layers, self.counts, self.importance = moe_layers, counts, importance
        self.selections = {int(k): Selection.from_dict(v) for k, v in state.get("candidates", {}).items()}
        self.chosen = {int(k): int(v) for k, v in state.get("chosen", {}).items()}
        self.kt_done = {int(k): KTBlock.from_dict(v) for k, v in state.get("blocks", {}).items()}
        self.ranks = dict(state.get("ranks", {}))
        self.spectra = list(state.get("spectra", []))
        self.spectra_layers = {moe_layers[0], moe_layers[-1]}
        # In "original" mode the search walks the unmodified model's hidden state next to the
        # compressed one; in "compressed" mode both are the same tensor.
        self.original = hidden if (search_hidden == "original" and ctx.config.prunes) else None
        self.position = 0
        self.bar = None

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
        ctx, state = self.ctx, self.ctx.state
        resumed = bi in self.kt_done
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
                    if li in self.counts and li not in self.selections and not resumed:
                        self.selections[li], current = _select_layer(ctx, li, module, current, self.counts[li])
                        state.put("candidates", {str(k): v.to_dict() for k, v in self.selections.items()})
                    else:
                        current = ctx.run(li, module, current)
            if not resumed:
                ctx.where = f"the KT walk over layers {span[0]} to {span[-1]}"
                with ctx.timer("kt_block"):
                    self.kt_done[bi] = choose_block(ctx, block, modules, self.selections, start, current)
                self.chosen.update(zip(block, self.kt_done[bi].choice))
                state.put("blocks", {str(k): v.to_dict() for k, v in self.kt_done.items()})
                state.put("chosen", {str(k): v for k, v in self.chosen.items()})
            if self.original is not None:
                self.original = current
        release_free_memory()

    def compress_layer(self, li: int) -> None:
        """Layer ``li`` alone: prune, Grams, ranks, factors, propagate, write."""
        from . import lowrank_experts, prune_experts

        ctx, config = self.ctx, self.ctx.config
        model = ctx.source.model
        ctx.where = f"layer {li} (prune, decomposition)"
        with ctx.source.layer(li) as module:
            if li in self.counts:
                kept = None
                if config.prunes:
                    mask = self.selections[li].masks[self.chosen[li]]
                    kept = [j for j, dropped in enumerate(mask) if not dropped]
                    if len(kept) < len(mask):
                        prune_experts(model, {li: [j for j, dropped in enumerate(mask) if dropped]})
                ranks = None if self.plan is None else self.plan.ranks(li, kept)
                if config.decomposes and (self.plan is None or ranks is not None):
                    with ctx.timer("decomposition"):
                        factors = _factors(ctx, li, module, self.hidden, self.importance.get(str(li)), kept,
                                           self.ranks, self.spectra, li in self.spectra_layers, ranks)
                        lowrank_experts(model, {li: factors})
                        del factors  # the module holds copies: free these before the next layer loads
            if li != self.moe_layers[-1]:
                with ctx.timer("propagation"):
                    self.hidden = ctx.run(li, module, self.hidden)
            self.writer.layer(li, module)
        self._done(li)


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


def _factors(ctx, index, module, hidden, full_importance, kept, ranks, spectra, with_spectra, chosen_ranks=None) -> dict:
    """Low-rank factors of one pruned layer: from the work_dir if finished, else computed on the
    Grams of ``hidden`` (the compressed model's hidden state) and recorded."""
    config, state = ctx.config, ctx.state
    view = ctx.view(index, module)
    saved = state.load_arrays(f"factors_layer{index}")
    if str(index) in ranks and saved is not None:
        return unpack_factors(saved, int(view.num_experts))
    # Grams are computed by the decomposition a group of experts at a time (from the captured X).
    stats, _ = ctx.capture(index, module, hidden, grams=False, keep_outputs=False)
    decomposition = decompose_layer(ctx, stats, view, full_importance=full_importance, kept=kept,
                                    spectra=spectra if with_spectra else None, ranks=chosen_ranks)
    del stats
    state.save_arrays(f"factors_layer{index}", pack_factors(decomposition.factors))
    ranks[str(index)] = decomposition.record()
    state.put("spectra", spectra)
    state.put("ranks", ranks)
    return decomposition.factors
