"""Writing moei2 checkpoints: :class:`CheckpointWriter` (shards written as tensors arrive, the
directory swapped in at the end), :func:`save` (a model in memory through the writer) and
:class:`SizeTally` (the sizes both report). The format is described in :mod:`moei2.io`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from .atomic_dir import fsync_dir, new_staging, prepare_parent, replace_dir
from .checkpoint import (CHECKPOINT_FORMAT, CONFIG_NAME, INDEX_NAME, LOADER_CLASS, LOADER_NAME, META_NAME, OTHER_FILES,
                         REPORT_NAME, SHARD_PATTERN, is_moei2_dir)
from .dtypes import dtype_name
from .safetensors_file import SAFETENSORS_CODES

__all__ = ["CheckpointWriter", "SizeTally", "save"]

_LOADER_SOURCE = f'''"""Loads this moei2 checkpoint (pruned and low-rank MoE experts) through transformers' Auto classes.

``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` lands here; the compressed
layout cannot be described by the original model class alone, so the model is rebuilt by
``moei2.load`` (pip install moei2[hf]).
"""
import os


class {LOADER_CLASS}:
    """Entry point for transformers' Auto classes; ``from_pretrained`` returns the model ``moei2.load`` builds."""

    _auto_class = None

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        cls._auto_class = auto_class if isinstance(auto_class, str) else auto_class.__name__

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, dtype=None, torch_dtype=None,
                        device_map=None, **kwargs):
        import moei2.io

        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                                     token=kwargs.get("token"))
        if dtype is None:
            dtype = torch_dtype
        if dtype == "auto":
            dtype = None
        device = device_map if isinstance(device_map, str) and device_map != "auto" else "cpu"
        return moei2.io.load(path, dtype=dtype, device=device)
'''


def _unique_state_dict(model):
    """The state dict with tied tensors stored once: ``(tensors, {alias: stored key})``."""
    tensors, aliases, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        ident = (value.device, value.untyped_storage().data_ptr() if value.device.type != "meta" else id(value),
                 value.storage_offset(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().to("cpu").contiguous()
    return tensors, aliases


class SizeTally:
    """The sizes :func:`save` reports, summed piece by piece so a streamed run can count each layer
    while it is resident: :meth:`add_tensors` for everything written, :meth:`add_moe_layer` for
    every MoE layer (in its final, pruned and/or low-rank form), then :meth:`result`."""

    def __init__(self):
        self.params_after = self.bytes_after = 0
        self.params_delta = self.bytes_delta = 0  # what the original had beyond what is written
        self.routed_before = self.routed_after = 0

    def add_tensors(self, tensors) -> None:
        for t in tensors.values():
            self.params_after += t.numel()
            self.bytes_after += t.numel() * t.element_size()

    def add_moe_layer(self, view, original_experts: int) -> None:
        import torch

        current = list(view.experts_module.parameters())
        element = current[0].element_size() if current else torch.finfo(torch.float32).bits // 8
        now = sum(p.numel() for p in current)
        biases = view.expert_biases(0)  # per-expert biases (gpt-oss), kept with their expert
        per_expert = 3 * view.intermediate_size * view.hidden_size + sum(b.numel() for b in biases or ())
        dense = int(original_experts) * per_expert
        router_bias = getattr(view.adapter.router_linear(view.router), "bias", None) is not None
        router_removed = (int(original_experts) - view.num_experts) * (view.hidden_size + router_bias)
        self.routed_before += dense
        self.routed_after += now
        self.params_delta += dense - now + router_removed
        self.bytes_delta += (dense - now) * element + router_removed * view.router_weight.element_size()

    def result(self) -> dict:
        return {"parameters_before": int(self.params_after + self.params_delta),
                "parameters_after": int(self.params_after),
                "bytes_before": int(self.bytes_after + self.bytes_delta), "bytes_after": int(self.bytes_after),
                "routed_expert_parameters_before": int(self.routed_before),
                "routed_expert_parameters_after": int(self.routed_after)}


def _sizes(model, adapter, record, tensors) -> dict:
    """Parameter counts and bytes of the original (dense, unpruned) and the compressed model."""
    tally = SizeTally()
    tally.add_tensors(tensors)
    for view in adapter.moe_layers():
        tally.add_moe_layer(view, record["layers"][str(view.layer_index)]["num_experts"])
    return tally.result()


def _check_output(target: Path, overwrite: bool) -> None:
    if os.path.lexists(target):
        if not target.is_dir():
            raise FileExistsError(f"output path {str(target)!r} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"output path {str(target)!r} already exists; pass overwrite=True to replace it")
        if any(target.iterdir()) and not is_moei2_dir(target):
            raise ValueError(f"output path {str(target)!r} is a non-empty directory that is not a moei2 checkpoint; "
                             "refusing to replace it")


def _file_checksum(path: Path) -> dict:
    import hashlib

    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _tensor_bytes(tensor) -> memoryview:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class CheckpointWriter:
    """Writes a moei2 checkpoint incrementally: tensors go to shard files as they arrive, and the
    directory appears at ``path`` in one atomic step at :meth:`finish`.

    ::

        with CheckpointWriter(path, overwrite=True) as w:      # checks the output location now
            for ...:
                w.add({"model.layers.3.mlp.gate.weight": t, ...})  # full state-dict keys
            sizes = w.finish(config, record, architecture=..., family=..., dtype=..., aliases=..., sizes=...)

    Everything is written to a staging directory next to ``path`` (named
    ``.<name>.moei2-tmp-<pid>-<start>-<random>``); :meth:`finish` swaps it in with
    ``renameat2(RENAME_EXCHANGE)`` where a checkpoint exists (plain rename otherwise; on filesystems
    that refuse the exchange, two renames that the next save or load repairs if a crash falls
    between them) and then removes the previous checkpoint. An exception inside the ``with`` block,
    or :meth:`abort`, removes the staging directory: nothing partial is left and an existing
    checkpoint is untouched. Staging directories of killed processes are removed by the next writer
    for the same path. A shard is closed when it reaches ``max_shard_bytes`` (a tensor larger than
    that gets a shard of its own). Files and directories get the permissions the process umask
    gives, as ``save_pretrained``'s do.
    """

    def __init__(self, path, *, overwrite: bool = False, max_shard_bytes: int = 2 << 30):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        self.path = Path(path).absolute()
        self.max_shard_bytes = max_shard_bytes
        _check_output(self.path, overwrite)
        prepare_parent(self.path)
        _check_output(self.path, overwrite)  # recovery may have put a checkpoint back
        self.staging = new_staging(self.path)
        self._tensors: dict[str, dict] = {}  # key -> {"dtype", "shape", "shard"}
        self._shards: list[dict] = []  # {"keys": [...], "data": Path, "bytes": int}
        self._data = None  # open file of the current shard's tensor data
        self._closed = False

    # ---- tensors ----

    def _write(self, f, data) -> None:
        """The one place bytes reach the disk (a full disk raises OSError here)."""
        f.write(data)

    def add(self, tensors) -> None:
        """Appends ``{state-dict key: tensor}`` to the current shard; nothing is kept in memory.

        Keys must be new; floating-point tensors must be finite (ValueError naming the key)."""
        import torch

        from collections.abc import Mapping

        self._check_open()
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping of state-dict keys to tensors, got {type(tensors).__name__}")
        for key, tensor in tensors.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"tensor keys must be non-empty strings, got {key!r}")
            if key in self._tensors:
                raise ValueError(f"tensor {key!r} is added twice")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensor {key!r}: expected a torch.Tensor, got {type(tensor).__name__}")
            if dtype_name(tensor.dtype) not in SAFETENSORS_CODES:
                raise ValueError(f"tensor {key!r}: dtype {tensor.dtype} cannot be stored in safetensors")
            if tensor.device.type == "meta":
                raise ValueError(f"tensor {key!r} is on the meta device (not materialised)")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"tensor {key!r} contains NaN or infinite values; refusing to save it")
        for key, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            shard = self._shards[-1] if self._shards and self._data is not None else None
            if shard is None or (shard["bytes"] and shard["bytes"] + nbytes > self.max_shard_bytes):
                self._close_shard()
                shard = self._open_shard()
            self._write(self._data, _tensor_bytes(tensor))
            self._tensors[key] = {"dtype": dtype_name(tensor.dtype),
                                  "shape": list(tensor.shape), "shard": len(self._shards) - 1,
                                  "start": shard["bytes"], "end": shard["bytes"] + nbytes}
            shard["keys"].append(key)
            shard["bytes"] += nbytes

    def _open_shard(self) -> dict:
        shard = {"keys": [], "data": self.staging / f".shard-{len(self._shards):05d}.data", "bytes": 0}
        self._shards.append(shard)
        self._data = open(shard["data"], "wb")
        return shard

    def _close_shard(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def _finish_shards(self) -> dict:
        """Turns each shard's data file into a safetensors file; returns ``{file name: {sha256, bytes}}``."""
        import hashlib

        self._close_shard()
        if not self._shards:
            self._open_shard()
            self._close_shard()
        total = len(self._shards)
        files = {}
        for n, shard in enumerate(self._shards):
            name = SHARD_PATTERN.format(n + 1, total)
            header = {key: {"dtype": SAFETENSORS_CODES[self._tensors[key]["dtype"]], "shape": self._tensors[key]["shape"],
                            "data_offsets": [self._tensors[key]["start"], self._tensors[key]["end"]]}
                      for key in shard["keys"]}
            header["__metadata__"] = {"format": "pt", "moei2_format": str(CHECKPOINT_FORMAT)}
            raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            digest = hashlib.sha256()
            with open(self.staging / name, "wb") as out, open(shard["data"], "rb") as data:
                for chunk in (len(raw).to_bytes(8, "little"), raw):
                    digest.update(chunk)
                    self._write(out, chunk)
                while True:
                    chunk = data.read(16 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    self._write(out, chunk)
                out.flush()
                os.fsync(out.fileno())
            shard["data"].unlink()
            for key in shard["keys"]:
                self._tensors[key]["file"] = name
            files[name] = {"sha256": digest.hexdigest(), "bytes": 8 + len(raw) + shard["bytes"]}
        return files

    # ---- the end ----

    def finish(self, config, record, *, architecture: str, family: str, dtype: str, aliases: dict, sizes: dict,
               tokenizer=None, report: Optional[dict] = None) -> dict:
        """Writes the configuration (with ``record`` as its ``moei2`` entry), the index, the loader,
        tokenizer and report, and ``moei2.json`` (last: a directory without it is never taken for a
        checkpoint), then swaps the directory in. Returns ``sizes`` plus ``file_bytes`` and ``path``."""

        self._check_open()
        try:
            report_text = None
            if report is not None:
                if not isinstance(report, dict):
                    raise TypeError(f"report must be a dict or None, got {type(report).__name__}")
                try:
                    report_text = json.dumps(report, indent=2, allow_nan=True, default=_json_default, sort_keys=True)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"report is not JSON-serialisable: {exc}") from None
            bad = [a for a, src in aliases.items() if src not in self._tensors or a in self._tensors]
            if bad:
                raise ValueError(f"aliases {bad[:5]} do not name a written tensor (or name one themselves)")
            files = self._finish_shards()
            staging = self.staging
            if isinstance(config, dict):
                config_dict = copy.deepcopy(config)
                config_dict.update(moei2=record, architectures=[architecture],
                                   auto_map={"AutoModelForCausalLM": f"{LOADER_NAME[:-3]}.{LOADER_CLASS}"})
                self._write_text(staging / CONFIG_NAME, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
            else:
                config = copy.deepcopy(config)
                config.moei2 = record
                config.architectures = [architecture]
                config.auto_map = {"AutoModelForCausalLM": f"{LOADER_NAME[:-3]}.{LOADER_CLASS}"}
                config.save_pretrained(str(staging))
            index = {"metadata": {"total_size": sum(info["end"] - info["start"] for info in self._tensors.values())},
                     "weight_map": {key: info["file"] for key, info in self._tensors.items()}}
            self._write_text(staging / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
            self._write_text(staging / LOADER_NAME, _LOADER_SOURCE)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            if report_text is not None:
                self._write_text(staging / REPORT_NAME, report_text)
            # Every other file is under a checksum too: config.json decides what the weights compute.
            other = {name: _file_checksum(staging / name) for name in sorted(os.listdir(staging))
                     if name not in files and (staging / name).is_file()}
            meta = {"format": CHECKPOINT_FORMAT, "architecture": architecture, "family": family, "dtype": dtype,
                    "index": INDEX_NAME, "num_tensors": len(self._tensors) + len(aliases),
                    "aliases": dict(aliases), "sizes": dict(sizes), "files": files, OTHER_FILES: other,
                    "tensors": {key: {"dtype": info["dtype"], "shape": info["shape"], "file": info["file"]}
                                for key, info in self._tensors.items()}}
            self._write_text(staging / META_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            fsync_dir(staging)
            replace_dir(staging, self.path)
            self._closed = True
        except BaseException:
            self.abort()
            raise
        file_bytes = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return dict(sizes, file_bytes=file_bytes, path=str(self.path))

    def _write_text(self, file: Path, text: str) -> None:
        with open(file, "w") as f:
            self._write(f, text)
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        """Removes everything written so far; an existing checkpoint at the path is untouched."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close_shard()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"checkpoint writer for {str(self.path)!r} is already finished or aborted")

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.abort()  # left without finish(): nothing is published

    def __del__(self):
        try:
            self.abort()
        except Exception:
            pass


def save(model, path, *, tokenizer=None, report: Optional[dict] = None, overwrite: bool = False,
         max_shard_bytes: int = 2 << 30) -> dict:
    """Writes ``model`` (pruned and/or low-rank, or untouched) as a moei2 checkpoint directory.

    path: the directory to create. overwrite: replace an existing moei2 checkpoint (or empty
    directory) there; any other existing path raises FileExistsError (a non-empty directory that is
    not a checkpoint ValueError). tokenizer: saved alongside when given. report: a
    JSON-serialisable dict written to ``report.json``. max_shard_bytes: the size of a weights shard.

    The write goes through :class:`CheckpointWriter`: atomic at the directory level, an existing
    checkpoint replaced in one step, nothing left behind on any error. The same model saved twice
    gives the same bytes. Returns the sizes: ``parameters_before``/``bytes_before`` (the dense
    model with all original experts, in the saved dtypes), ``parameters_after``/``bytes_after``
    (what is saved), the routed-expert parameter counts, ``file_bytes`` (the whole directory) and
    ``path``.
    """
    from .models import get_adapter, structure_of

    adapter = get_adapter(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"report must be a dict or None, got {type(report).__name__}")
    if report is not None:
        try:
            json.dumps(report, allow_nan=True, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"report is not JSON-serialisable: {exc}") from None
    record = structure_of(model, adapter)
    with CheckpointWriter(path, overwrite=overwrite, max_shard_bytes=max_shard_bytes) as writer:
        tensors, aliases = _unique_state_dict(model)
        sizes = _sizes(model, adapter, record, tensors)
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = dtype_name(first.dtype) if first is not None else "float32"
        writer.add(tensors)
        del tensors
        return writer.finish(model.config, record, architecture=type(model).__name__, family=adapter.family,
                             dtype=dtype, aliases=aliases, sizes=sizes, tokenizer=tokenizer, report=report)


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, torch.dtype):
            return str(value)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"object of type {type(value).__name__} is not JSON-serialisable")
