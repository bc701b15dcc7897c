"""moei2.compress: the whole MoE-I2 method on a Hugging Face model, as a driver over the stages.

Pass 1 (one decoder layer resident at a time): the importance of every expert, then the
per-layer prune counts, which need every layer's importance.
Pass 2 (one KT block of layers resident at a time): for each layer of the block the search cache
and K candidate masks; the KT choice over the block; then for each layer: prune, survivor
statistics (Grams), ranks, factors, propagate the hidden state, write the layer to the sink.
Optional LoRA recovery last. The passes live in :mod:`moei2.passes` and the stages in
:mod:`moei2.stages`; this module checks the settings, sequences the passes and assembles the
report from the stages' results. The model is reached only through a model source
(:mod:`moei2.source`), so a checkpoint streamed from disk goes through the same code as a model in
memory. With ``work_dir`` every finished layer is recorded, and a rerun with the same settings,
model and data resumes from there.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from .config import CompressionConfig, check_rank_budget
from .calibration_data import calibration_windows
from .state import RunState
from .passes import DeviceOutOfMemory, LayerWriter, pass_one, pass_two
from .stages import Context, recover
from .stages.budget import budget_target, layer_shape
from .stages.common import Timer, batch_token_counts

__all__ = ["compress", "compress_checkpoint", "compress_source", "check_settings_fit", "routed_expert_parameters",
           "DeviceOutOfMemory", "SEARCH_HIDDEN"]

# The default of ``CompressionConfig.search_hidden``: which hidden state the search and the KT
# step see (docs/method.md, "Which hidden state each stage sees").
SEARCH_HIDDEN = CompressionConfig.search_hidden


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

    if isinstance(model, (str, os.PathLike)):  # compress_checkpoint checks the settings itself
        return compress_checkpoint(model, output, tokenizer, texts, config, overwrite=overwrite,
                                   work_dir=work_dir, progress=progress)
    config = _check_config(config)
    check_device(config.device, config.dtype)
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
                    work_dir=None, progress: bool = True) -> dict:
    """Compresses the model of ``source`` (a :class:`moei2.source.ModelSource`) and returns the report.

    sink: optional object with ``add(tensors)``, given every finished decoder layer's tensors
    (full state-dict keys, in the source's storage dtype, on the CPU) once, inside the layer's
    scope, and the non-layer tensors once at the end. Which hidden state the search sees follows
    ``config.search_hidden``; where the heavy stages compute, ``config.kernels`` on the source's
    device.

    The stages run in order and each returns its result (:mod:`moei2.stages`), which records
    itself in the work_dir and gives its part of the report; the report is assembled from them.
    """
    config = _check_config(config)
    if sink is not None and not callable(getattr(sink, "add", None)):
        raise TypeError(f"sink must have an add(tensors) method, got {type(sink).__name__}")
    model, adapter = source.model, source.adapter
    budget_total = check_settings_fit(config, [layer_shape(v) for v in adapter.moe_layers()])
    _check_compressible(adapter, model)
    _check_prunable(adapter, config)
    if config.lora is not None and source.streamed:
        raise ValueError("LoRA recovery needs the whole model in memory; it is not available for a streamed "
                         "model: compress without lora, load the result and run moei2.lora_finetune on it")

    started = time.perf_counter()
    model.eval()
    ctx = _context(source, tokenizer, texts, config, work_dir, progress)
    report = _run_report(ctx)
    moe_layers, num_experts = report["model"]["moe_layers"], report["model"]["num_experts"]
    before = _Sizes.of(source)
    with source.outer(), torch.no_grad():
        hidden = ctx.embed()
    allocation = pass_one(ctx, hidden, moe_layers, budget_total)
    writer = LayerWriter(source, sink if config.lora is None else None)
    walk = pass_two(ctx, hidden, moe_layers, allocation, writer)
    del hidden
    recovery = None
    if config.lora is not None:
        with ctx.timer("lora"):
            recovery = recover(model, tokenizer, texts, config)
        if sink is not None:
            LayerWriter(source, sink).write_all()
    if sink is not None:
        sink.add(source.outer_tensors())
    after = _Sizes.of(source, writer)

    for l in moe_layers:
        report["layers"][str(l)].update({**allocation.layer_report(l), **walk.layer_report(l, num_experts[l]),
                                         **walk.lowrank.layer_report(l)})
    report.update(allocation.report())
    if config.prunes:
        report.update(walk.kt.report())
    if config.decomposes:
        report.update(walk.lowrank.report())
    if recovery is not None:
        report["lora"] = recovery.report
    report["parameters"] = before.compared_to(after)
    report["times"] = dict(ctx.timer.times, total=time.perf_counter() - started)
    ctx.state.close()
    return report


def _context(source, tokenizer, texts, config, work_dir, progress) -> Context:
    """The run's context: the calibration windows, their batches, the layer runner and the run
    state (whose fingerprint covers the settings, the model and the calibration data)."""
    from .calibrate import LayerRunner

    ctx = Context(source=source, config=config, runner=None, input_ids=None, batches=[], batch_sizes=[],
                  state=None, progress=progress,
                  torch_kernels=config.torch_kernels(source.device),
                  park_dtype=_park_dtype(source))
    with ctx.timer("calibration_data"):
        input_ids = calibration_windows(tokenizer, texts, config.num_sequences, config.seq_len, config.seed)
    vocabulary = source.model.get_input_embeddings().num_embeddings
    if int(input_ids.max()) >= vocabulary:
        raise ValueError(f"tokenizer: it gives token id {int(input_ids.max())}, the model's vocabulary has "
                         f"{vocabulary} tokens: the tokenizer belongs to another model")
    data_hash = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:16]
    ctx.state = RunState(work_dir, f"{config.fingerprint()}-{source.fingerprint()}-{data_hash}")
    ctx.input_ids = input_ids
    num_sequences = int(input_ids.shape[0])
    ctx.batches = [slice(s, min(s + config.calib_batch_size, num_sequences))
                   for s in range(0, num_sequences, config.calib_batch_size)]
    ctx.batch_sizes = batch_token_counts(num_sequences, config.calib_batch_size, config.seq_len)
    ctx.runner = LayerRunner(source.model, adapter=source.adapter, device=source.device, dtype=source.dtype)
    return ctx


def _run_report(ctx) -> dict:
    """The report's description of the run (settings, the model before compression, calibration),
    made before any stage runs; its ``layers`` are filled in from the stages' results."""
    model, adapter, config = ctx.source.model, ctx.adapter, ctx.config
    views = adapter.moe_layers()
    moe_layers = [v.layer_index for v in views]
    return {
        "seed": config.seed,
        "config": config.to_dict(),
        "model": {"architecture": type(model).__name__, "family": adapter.family,
                  "num_hidden_layers": adapter.num_hidden_layers, "moe_layers": moe_layers,
                  "num_experts": {v.layer_index: int(v.num_experts) for v in views},
                  "top_k": {v.layer_index: int(v.top_k) for v in views}},
        "calibration": {"sequences": int(ctx.input_ids.shape[0]), "seq_len": int(config.seq_len),
                        "tokens": int(ctx.input_ids.numel()), "requested_sequences": config.num_sequences},
        "resumed": ctx.state.resumed,
        "search_hidden": config.search_hidden,
        "layers": {str(l): {} for l in moe_layers},
    }


@dataclass
class _Sizes:
    """Parameters and bytes of the model and of its routed experts. A streamed model's are counted
    as its layers are written (its skeleton holds no layer) and in its storage dtype."""

    params: int
    bytes: int
    routed: int

    @classmethod
    def of(cls, source, writer=None) -> "_Sizes":
        model = source.model
        stored_dtype = source.storage_dtype if source.streamed else None
        if writer is None or not source.streamed:
            params, size = _model_size(model, stored_dtype)
            return cls(params, size, routed_expert_parameters(source.adapter))
        outer_params, outer_bytes = _model_size(model, stored_dtype, outer_only=True)
        return cls(writer.params + outer_params, writer.bytes + outer_bytes, writer.routed)

    def compared_to(self, after: "_Sizes") -> dict:
        """The report's ``parameters``: these sizes before compression, ``after`` after it."""
        return {
            "routed_expert_before": self.routed, "routed_expert_after": after.routed,
            "routed_expert_reduction": 1.0 - after.routed / self.routed if self.routed else 0.0,
            "model_before": self.params, "model_after": after.params,
            "model_reduction": 1.0 - after.params / self.params,
            "model_bytes_before": self.bytes, "model_bytes_after": after.bytes,
            "model_gib_before": self.bytes / 2**30, "model_gib_after": after.bytes / 2**30,
        }


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


def check_settings_fit(config: CompressionConfig, shapes) -> Optional[int]:
    """Refuses settings the MoE layers cannot take, before any work: a rank budget the experts
    cannot take (:func:`moei2.config.check_rank_budget`), or a budget mode share they cannot lose
    (:func:`moei2.stages.budget.budget_target`). ValueError naming the setting.

    shapes: ``(experts, top_k, hidden size, expert width[, biases per expert])`` of every MoE layer; experts and top_k
    may be None where they are not known yet (the budget share is then not checked): the command
    line checks the shapes of config.json before the model loads. Returns budget mode's target
    (the routed-expert parameters to keep), or None outside budget mode or when not known."""
    shapes = [tuple(shape) for shape in shapes]
    if config.decomposes:
        for hidden_size, width in sorted({shape[2:4] for shape in shapes}):
            check_rank_budget(config, hidden_size, width)
    if config.budget is None or not all(isinstance(v, int) for shape in shapes for v in shape):
        return None
    return budget_target(config, shapes)


def _check_compressible(adapter, model) -> None:
    """Refuses, before any work, experts already low-rank (a top-k above the expert count is the
    adapter's refusal, a rank budget :func:`check_settings_fit`'s)."""
    record = getattr(model.config, "moei2", None)
    lowrank = {v.layer_index for v in adapter.moe_layers() if v.is_lowrank}
    if isinstance(record, Mapping):
        lowrank |= {int(l) for l, e in (record.get("layers") or {}).items()
                    if isinstance(e, Mapping) and e.get("ranks") is not None}
    if lowrank:
        raise ValueError(
            f"model: the routed experts of layer(s) {sorted(lowrank)} are already low-rank (a model compressed "
            "by moei2); compressing low-rank experts again is not supported: start from the original model")


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
