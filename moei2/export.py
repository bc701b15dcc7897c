"""Export for serving: a moei2 checkpoint that only dropped experts, as a plain checkpoint of its
original architecture.

A moei2 checkpoint records per-layer expert counts and low-rank experts, which the original model
class cannot describe, so it loads only through moei2 (``moei2.load`` or ``trust_remote_code``).
When every MoE layer keeps the same number of experts and no layer is low-rank, the pruned model IS
an instance of the original architecture with a smaller expert count: :func:`export` writes it as
such. The routers' rows and any per-expert or router biases are already sliced in the checkpoint;
the family's expert-count fields in ``config.json`` are set to the kept count; the ``moei2`` record
and ``auto_map`` are removed and no moei2 code is written. The weights are written by transformers'
own ``save_pretrained``, so they have the family's usual on-disk names (per-expert tensors where
the family stores them so), which stock ``AutoModelForCausalLM.from_pretrained`` and serving
engines (vLLM, SGLang) read.

Everything that can be checked from ``config.json`` and ``moei2.json`` (architecture, equal
counts, no low-rank layer, the family's own conditions) is checked before any weight is read.
The output directory appears in one atomic step.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["export", "check_exportable"]

# Files a checkpoint directory may hold beside the model that a serving engine wants too.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json")


def check_exportable(checkpoint):
    """Checks, from the checkpoint's metadata alone, that it can be written as a plain checkpoint.

    Returns ``(adapter class, kept expert count)``. Raises ValueError naming what stands in the
    way and what would make the checkpoint exportable: an unsupported architecture, layers with
    different expert counts (compress with ``--prune-rule uniform``), low-rank experts (compress
    with ``--no-decompose``), or a family condition (``MoEAdapter.export_config``).
    """
    from .checkpoint import Checkpoint

    with Checkpoint.open_moei2(checkpoint) as opened:  # one checkpoint, even while a save replaces it
        directory = opened.directory
    adapter_class = opened.adapter_class()
    architecture = adapter_class.architecture
    layers = opened.record.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{directory}: the moei2 record lists no MoE layers")
    counts = {}
    lowrank = []
    for key, entry in sorted(layers.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        if not isinstance(entry, dict) or not isinstance(entry.get("kept"), list):
            raise ValueError(f"{directory}: moei2 record: layer {key} has no list of kept experts")
        counts[key] = len(entry["kept"])
        if entry.get("ranks") is not None:
            lowrank.append(key)
    if lowrank:
        raise ValueError(f"{directory}: layers {', '.join(map(str, lowrank))} hold low-rank experts, which "
                         f"{architecture} cannot describe; compress with --no-decompose to get an exportable "
                         "checkpoint")
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"layer {k}: {n}" for k, n in list(counts.items())[:6])
        raise ValueError(f"{directory}: the MoE layers keep different numbers of experts ({shown}"
                         f"{', ...' if len(counts) > 6 else ''}), which {architecture} cannot describe; compress "
                         "with --prune-rule uniform to get an exportable checkpoint")
    num_experts = next(iter(counts.values()))
    adapter_class.export_config(opened.model_config(), num_experts)  # family conditions
    return adapter_class, num_experts


def _replaceable(target: Path) -> bool:
    """An empty directory or an earlier export (a model directory without moei2's metadata)."""
    from .checkpoint import CONFIG_NAME, META_NAME

    if not any(target.iterdir()):
        return True
    has_weights = (target / "model.safetensors").is_file() or (target / "model.safetensors.index.json").is_file()
    return (target / CONFIG_NAME).is_file() and has_weights and not (target / META_NAME).exists()


def export(checkpoint, output, *, overwrite: bool = False, max_shard_size="5GB") -> dict:
    """Writes the moei2 ``checkpoint`` as a plain checkpoint of its original architecture at ``output``.

    The checkpoint must keep the same number of experts in every MoE layer and no low-rank experts
    (see :func:`check_exportable`, which runs first). overwrite: replace an empty directory or an
    earlier export at ``output``; anything else there raises FileExistsError (a moei2 checkpoint or
    another non-empty directory ValueError). max_shard_size: as for ``save_pretrained``.
    Tokenizer files of the checkpoint are copied. The model is held in memory once, in the saved
    dtype. Returns ``{"path", "architecture", "num_experts", "expert_count_keys"}`` (the config.json
keys set to the kept count).
    """
    from .atomic_dir import staged_directory
    from .io import load

    if not isinstance(output, (str, os.PathLike)):
        raise TypeError(f"output must be a str or os.PathLike, got {type(output).__name__}")
    adapter_class, num_experts = check_exportable(checkpoint)
    target = Path(output).absolute()
    if os.path.lexists(target):
        if not target.is_dir():
            raise FileExistsError(f"output path {str(target)!r} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"output path {str(target)!r} already exists; pass overwrite=True to replace it")
        if not _replaceable(target):
            raise ValueError(f"output path {str(target)!r} is a non-empty directory that is not an earlier export; "
                             "refusing to replace it")
    model = load(checkpoint)
    config = model.config
    for key in ("moei2", "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    adapter_class.export_config(config, num_experts)
    config.architectures = [adapter_class.architecture]
    with staged_directory(target) as staging:
        model.save_pretrained(str(staging), max_shard_size=max_shard_size)
        for name in _TOKENIZER_FILES:
            source = Path(checkpoint) / name
            if source.is_file():
                shutil.copyfile(source, staging / name)
    aliases = getattr(type(config), "attribute_map", {})  # e.g. Qwen3-MoE stores num_experts as num_local_experts
    return {"path": str(target), "architecture": adapter_class.architecture, "num_experts": num_experts,
            "expert_count_keys": sorted({aliases.get(key, key) for key in adapter_class.expert_count_keys})}
