"""Saving and loading compressed (pruned and low-rank) MoE checkpoints.

A checkpoint (format 2) is a directory holding:

``config.json``
    the model's ORIGINAL transformers configuration plus a ``moei2`` entry recording, for every
    MoE layer, the original expert count, the experts kept (original indices) and each kept
    expert's ``[gate, up, down]`` ranks (``null`` while the layer's experts are dense), and an
    ``auto_map`` pointing transformers' ``AutoModelForCausalLM`` at ``modeling_moei2.py``.
``moei2_model-00001-of-0000N.safetensors`` and ``moei2_model.safetensors.index.json``
    every tensor of the state dict, tied tensors stored once, in shards with a Hugging Face style
    index (``weight_map``). They are deliberately not named ``model*.safetensors``: a plain
    ``from_pretrained`` without ``trust_remote_code`` would otherwise build the uncompressed
    layout and silently fill the missing experts with random weights; with these names it fails
    with "no file named model.safetensors".
``moei2.json``
    format version, architecture, dtype, the tied-tensor aliases, the sizes, the sha256 and size
    of every weights file (``files``) and each tensor's dtype, shape and file (``tensors``).
    Written last: a directory without it is never taken for a checkpoint.
``modeling_moei2.py``
    a loader so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
    calls :func:`load`.
``report.json`` and tokenizer files, when given.

Format 1 (one ``moei2_model.safetensors``, no checksums) is still read.

Writing goes through :class:`CheckpointWriter` (:mod:`moei2.checkpoint_writer`), which the
streamed pipeline feeds one layer at a time: shards are written as tensors arrive, into a staging
directory next to the target that is swapped in at the end in one atomic step
(:mod:`moei2.atomic_dir`). The same model saved
twice gives the same bytes (all JSON keys sorted). :func:`load` builds the model from its original
configuration on the meta device, reshapes it to the recorded layout
(:func:`moei2.models.apply_structure`), checks every tensor's name, shape and dtype against the
files and the record before allocating, verifies the checksums (``verify=False`` skips them),
refuses non-finite weights, and then loads strictly, so the rebuilt model computes exactly what the
saved one did. It reads one checkpoint or fails: every file is opened relative to one handle on
the directory before anything is parsed (:meth:`moei2.checkpoint.Checkpoint.open_moei2`), so a
save replacing the checkpoint meanwhile is wholly before or wholly after the load. See
docs/checkpoints.md.

This module is the public face of the checkpoint modules: reading (here, over
:class:`moei2.checkpoint.Checkpoint`), writing (:mod:`moei2.checkpoint_writer`), safetensors
headers (:mod:`moei2.safetensors_file`) and the atomic swap (:mod:`moei2.atomic_dir`); the names
users import from ``moei2.io`` stay importable from it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

# The names users and the other modules import from moei2.io, wherever they are defined now.
from .atomic_dir import staged_directory  # noqa: F401
from .checkpoint import (CHECKPOINT_FORMAT, CONFIG_NAME, INDEX_NAME, LOADER_CLASS, LOADER_NAME,  # noqa: F401
                         META_NAME, READ_FORMATS, REPORT_NAME, SHARD_PATTERN, WEIGHTS_NAME, Checkpoint,
                         check_stored_tensor, is_moei2_dir)
from .checkpoint_writer import CheckpointWriter, SizeTally, save
from .dtypes import torch_dtype
from .safetensors_file import SafetensorsFile, TensorInfo  # noqa: F401

__all__ = ["save", "load", "load_with_tokenizer", "is_moei2_checkpoint", "inspect_checkpoint", "CheckpointWriter", "SizeTally",
           "CHECKPOINT_FORMAT", "SafetensorsFile"]


def is_moei2_checkpoint(path) -> bool:
    """True if ``path`` is a directory written by :func:`save` (it has ``moei2.json`` and ``config.json``)."""
    try:
        p = Path(path)
        if not is_moei2_dir(p):
            return False
        meta = json.loads((p / META_NAME).read_text())
        return isinstance(meta, dict) and "format" in meta
    except (OSError, TypeError, ValueError):
        return False


def inspect_checkpoint(path) -> dict:
    """A summary of a moei2 checkpoint without building the model (either layout).

    Returns ``path``, ``architecture``, ``family``, ``dtype``, ``format``, ``layers`` (per MoE layer:
    ``num_experts`` originally, ``kept`` original indices, ``num_kept``, ``ranks`` or ``None``),
    ``experts_kept`` and ``experts_total``, ``sizes`` (as returned by :func:`save`),
    ``num_tensors``, ``expert_shape`` (``[hidden, expert width]`` or None), ``files`` (name → bytes),
    ``has_tokenizer``, ``has_report``.
    """
    from .models import ADAPTERS

    with Checkpoint.open_moei2(path) as checkpoint:
        num_stored = len(checkpoint.index())
        files = {name: checkpoint.snapshot.size(name) for name in sorted(checkpoint.snapshot.fds)}
    directory, meta, config = checkpoint.directory, checkpoint.meta, checkpoint.config
    adapter = ADAPTERS.get(meta["architecture"])
    width = config.get(adapter.expert_width_key if adapter else "moe_intermediate_size")
    hidden = config.get("hidden_size")
    layers = {}
    for key, entry in sorted(checkpoint.record.get("layers", {}).items(), key=lambda kv: int(kv[0])):
        layers[int(key)] = {"num_experts": entry.get("num_experts"), "kept": entry.get("kept"),
                            "num_kept": len(entry.get("kept") or []), "ranks": entry.get("ranks")}
    return {
        "path": str(directory.absolute()),
        "architecture": meta["architecture"],
        "family": meta.get("family"),
        "dtype": meta["dtype"],
        "format": meta["format"],
        "layers": layers,
        "experts_kept": sum(v["num_kept"] for v in layers.values()),
        "experts_total": sum(int(v["num_experts"] or 0) for v in layers.values()),
        "sizes": meta.get("sizes"),
        "num_tensors": num_stored + len(meta["aliases"]),
        # The experts' shape, from the same snapshot's config.json (None where it does not say).
        "expert_shape": [hidden, width] if all(isinstance(v, int) for v in (hidden, width)) else None,
        "files": files,
        "has_tokenizer": any(name.startswith("tokenizer") for name in files),
        "has_report": REPORT_NAME in files,
    }


def _check_record_bounds(checkpoint: Checkpoint, config) -> None:
    """Refuses a record whose ranks or expert counts could not come from this configuration, before
    anything is allocated (an absurd rank would otherwise reach the allocator)."""
    file = checkpoint.config_file
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 0) or 0)
    bound = max(hidden, inter)
    layers = checkpoint.record.get("layers")
    if not isinstance(layers, dict):
        return  # check_structure names this
    for i, entry in layers.items():
        if not isinstance(entry, dict):
            continue
        n = entry.get("num_experts")
        kept = entry.get("kept")
        if isinstance(n, int) and not 0 < n <= 1 << 16:
            raise ValueError(f"{file}: moei2 record: layer {i} records {n} experts, not a plausible expert count")
        if isinstance(kept, list) and isinstance(n, int) and len(kept) > n:
            raise ValueError(f"{file}: moei2 record: layer {i} keeps {len(kept)} experts of {n}")
        ranks = entry.get("ranks")
        if isinstance(ranks, list) and bound:
            for j, triple in enumerate(ranks):
                if isinstance(triple, (list, tuple)):
                    for r in triple:
                        if isinstance(r, int) and not isinstance(r, bool) and r > bound:
                            raise ValueError(
                                f"{file}: moei2 record: layer {i} expert {j} has rank {r}, above the largest the "
                                f"experts allow (max(hidden {hidden}, intermediate {inter}) = {bound})")


def load(path, *, dtype=None, device="cpu", verify: bool = True):
    """Rebuilds a model saved by :func:`save`, in eval mode (the sharded layout of format 2 and the
    single-file layout of format 1).

    dtype: the dtype to build the model in (default: the saved one). device: where the model is put.
    verify: check each weights file against the sha256 recorded at save time (format 2); pass
    ``verify=False`` to skip reading every file twice when the files are trusted. The recorded
    dtype and shape of every tensor are checked either way, and weights with NaN or infinite values
    are always refused.

    The model is first built on the meta device from its original configuration, pruned and given
    low-rank experts as recorded in ``config.json``, and every tensor is matched against the files
    (a missing, unexpected, mis-shaped or non-floating tensor raises ValueError naming it) before
    anything is allocated; then the weights are read and loaded strictly. A missing file raises
    FileNotFoundError, a corrupt one ValueError. Every file comes from one checkpoint, even while
    a save replaces the one at ``path`` (the old or the new one, never a mix).
    """
    with Checkpoint.open_moei2(path) as checkpoint:
        model = _load_snapshot(checkpoint, dtype, device, verify)
    return model


def load_with_tokenizer(path, *, dtype=None, device="cpu", verify: bool = True):
    """:func:`load`, and the tokenizer saved with the model, both from one snapshot of ``path``:
    ``(model, tokenizer)``, or ``(model, None)`` when the checkpoint holds no tokenizer. The
    tokenizer is read from the files the weights were read beside (under the same checksums), so a
    save replacing the checkpoint meanwhile cannot pair one checkpoint's model with another's
    tokenizer."""
    import tempfile

    from transformers import AutoTokenizer

    with Checkpoint.open_moei2(path) as checkpoint:
        model = _load_snapshot(checkpoint, dtype, device, verify)
        snapshot = checkpoint.snapshot
        weights = set(checkpoint.meta.get("files") or {})
        small = [name for name in snapshot.fds if name not in weights and not name.endswith(".safetensors")]
        if not any(name.startswith("tokenizer") for name in small):
            return model, None
        with tempfile.TemporaryDirectory(prefix="moei2-tokenizer-") as copy:
            for name in small:
                (Path(copy) / name).write_bytes(snapshot.read_bytes(name))
            tokenizer = AutoTokenizer.from_pretrained(copy, local_files_only=True)
    return model, tokenizer


def _load_snapshot(checkpoint: Checkpoint, dtype, device, verify: bool):
    """The model of an opened moei2 checkpoint: every check first, then the weights."""
    from .source import check_device

    checkpoint.adapter_class()  # an unsupported architecture is named first
    dtype = torch_dtype(checkpoint.meta["dtype"] if dtype is None else dtype)
    device = check_device(device)  # a missing accelerator is refused before any tensor is read
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
    checksums = verify and checkpoint.meta["format"] >= 2
    if checksums:
        checkpoint.verify_checksums(weights=False)
    checkpoint.index()
    config = checkpoint.model_config()
    _check_record_bounds(checkpoint, config)
    # The layout is checked on a skeleton without storage, so a bad record costs no memory.
    skeleton = checkpoint.skeleton(dtype, copy.deepcopy(config))
    _check_tensors(checkpoint, {k: (tuple(v.shape), v.is_floating_point()) for k, v in skeleton.state_dict().items()})
    del skeleton
    if checksums:
        checkpoint.verify_checksums(weights=True)
    return _read_model(checkpoint, config, dtype).to(device).eval()


def _check_tensors(checkpoint: Checkpoint, expected: dict) -> None:
    """Every tensor the recorded layout needs (``{key: (shape, floating)}``) is stored once, with
    its shape and a floating dtype where needed, and every alias names a stored tensor."""
    directory, aliases = checkpoint.directory, checkpoint.meta["aliases"]
    weights_desc = WEIGHTS_NAME if checkpoint.meta["format"] == 1 else "the weights files"
    stored = set(checkpoint.weight_map)
    wanted = set(expected) - set(aliases)
    missing = sorted(wanted - stored)
    unexpected = sorted(stored - wanted)
    if missing or unexpected:
        raise ValueError(f"{directory / weights_desc} does not match the recorded layout: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(wanted):
        check_stored_tensor(checkpoint.file_of(key), key, checkpoint.tensor(key), *expected[key],
                            layout="the recorded layout")
    bad_alias = [a for a, src in aliases.items() if a not in expected or src not in stored]
    if bad_alias:
        raise ValueError(f"{directory / META_NAME}: tied-tensor aliases {bad_alias[:5]} do not match the model")


def _read_model(checkpoint: Checkpoint, config, dtype):
    """Builds the model in the recorded layout and loads every stored tensor strictly, refusing
    non-finite weights."""
    import torch

    model = checkpoint.build(dtype, config)
    state = {}
    for name in checkpoint.weight_files():
        f = checkpoint.files[name]
        with f.reader() as read:
            for key in f.tensors:
                tensor = read(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{checkpoint.directory / name}: tensor {key!r} contains NaN or infinite values; "
                                     "the checkpoint is corrupt")
                state[key] = tensor
    for alias, source in checkpoint.meta["aliases"].items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True)
    del state
    model.config.moei2 = checkpoint.record
    return model
