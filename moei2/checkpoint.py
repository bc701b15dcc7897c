"""One reader of model directories: a Hugging Face model or a moei2 checkpoint, read once.

:class:`Checkpoint` holds what every reader of a directory needs and builds the rest from it:
``config`` (config.json, parsed once), ``record`` (its ``moei2`` entry: the experts kept and their
ranks; None for a model moei2 has not compressed), ``meta`` (moei2.json), the tensor index
(``weight_map``: state-dict key to file name, ``files``: the safetensors headers, checked, no data
read), :meth:`Checkpoint.adapter_class` (the architecture and its adapter),
:meth:`Checkpoint.model_config`, :meth:`Checkpoint.skeleton` (the model on the meta device, in the
recorded layout) and :attr:`Checkpoint.storage_dtype`.

Three ways in, one per reader:

- :meth:`Checkpoint.open`: config.json alone (the command line's checks before any loading);
- :meth:`Checkpoint.open_pretrained`: a Hugging Face model directory and its shards, read by path
  for the length of a run (:class:`moei2.streaming.StreamedSource`);
- :meth:`Checkpoint.open_moei2`: a moei2 checkpoint, every file read through one snapshot
  (:class:`moei2.snapshot.Snapshot`) so that a save replacing it meanwhile is wholly before or
  wholly after (``moei2.load``, ``moei2.inspect_checkpoint``, ``moei2.export``).

The file layout of a moei2 checkpoint is described in :mod:`moei2.io` and docs/checkpoints.md.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from .atomic_dir import recover
from .dtypes import torch_dtype
from .safetensors_file import SafetensorsFile, TensorInfo
from .snapshot import Snapshot, open_snapshot

__all__ = ["Checkpoint", "CheckpointError", "check_stored_tensor", "is_moei2_dir", "CHECKPOINT_FORMAT",
           "READ_FORMATS", "WEIGHTS_NAME", "INDEX_NAME", "SHARD_PATTERN", "META_NAME", "CONFIG_NAME", "REPORT_NAME",
           "LOADER_NAME", "LOADER_CLASS", "OTHER_FILES", "PRETRAINED_INDEX", "PRETRAINED_SINGLE"]

CHECKPOINT_FORMAT = 2
READ_FORMATS = (1, 2)
WEIGHTS_NAME = "moei2_model.safetensors"  # format 1: one file
INDEX_NAME = "moei2_model.safetensors.index.json"  # format 2: an index and its shards
SHARD_PATTERN = "moei2_model-{:05d}-of-{:05d}.safetensors"
META_NAME = "moei2.json"
CONFIG_NAME = "config.json"
REPORT_NAME = "report.json"
LOADER_NAME = "modeling_moei2.py"
LOADER_CLASS = "MoEI2ForCausalLM"
OTHER_FILES = "other_files"  # moei2.json: checksums of every file that is neither weights nor moei2.json
PRETRAINED_INDEX = "model.safetensors.index.json"  # a Hugging Face model's weights: an index and shards,
PRETRAINED_SINGLE = "model.safetensors"  # or one file
LAYER_PREFIX = "model.layers."


class CheckpointError(ValueError):
    """A model directory that cannot be read as a model; the message names the file or tensor."""


def is_moei2_dir(path: Path) -> bool:
    return (path / META_NAME).is_file() and (path / CONFIG_NAME).is_file()


def parse_json(data: bytes, file: Path, error=ValueError):
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{file}: not valid JSON ({exc})") from None


def check_stored_tensor(file: Path, key: str, info: TensorInfo, shape: tuple, floating: bool, *,
                        layout: str, error=ValueError) -> None:
    """The one check of a stored tensor against the tensor the model needs (both readers use it):
    the same shape, and a floating-point dtype where the model's is one (a header relabelling a
    float32 weight as int32 would otherwise turn its bit patterns into numbers)."""
    if tuple(info.shape) != tuple(shape):
        raise error(f"{file}: tensor {key!r} has shape {tuple(info.shape)}, {layout} needs {tuple(shape)}")
    if floating and not info.dtype.is_floating_point:
        raise error(f"{file}: tensor {key!r} is stored as {str(info.dtype).removeprefix('torch.')}, {layout} needs "
                    "a floating-point tensor; the file is corrupt")


def _model_directory(path, argument: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a str or os.PathLike, got {type(path).__name__}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"model {str(root)!r} is not a directory (expected a Hugging Face checkpoint "
                                "directory with config.json and safetensors weights)")
    return root


class Checkpoint:
    """A model directory as read once; see the module docstring. ``error`` is the exception class
    the checks raise (a ValueError)."""

    def __init__(self, directory: Path, config: dict, *, meta: Optional[dict] = None,
                 snapshot: Optional[Snapshot] = None, error=ValueError):
        self.directory = directory
        self.config = config
        self.meta = meta
        self.snapshot = snapshot
        self.error = error
        self.files: dict[str, SafetensorsFile] = {}
        self.weight_map: dict[str, str] = {}

    @property
    def config_file(self) -> Path:
        return self.directory / CONFIG_NAME

    @property
    def record(self) -> Optional[dict]:
        """The ``moei2`` entry of config.json: per MoE layer the experts kept and their ranks."""
        record = self.config.get("moei2")
        return record if isinstance(record, dict) else None

    @property
    def is_moei2(self) -> bool:
        """Whether moei2 wrote this directory (it has a record or moei2.json)."""
        return self.meta is not None or "moei2" in self.config or (self.directory / META_NAME).is_file()

    # ---- opening ----

    @classmethod
    def open(cls, path, *, error=ValueError, argument: str = "path") -> "Checkpoint":
        """The directory's config.json, parsed; no weights are looked at. ``argument`` names
        ``path`` in the message when it is not a path."""
        root = _model_directory(path, argument)
        config_file = root / CONFIG_NAME
        if not config_file.is_file():
            has_weights = (root / PRETRAINED_INDEX).is_file() or (root / PRETRAINED_SINGLE).is_file()
            if not has_weights:
                raise FileNotFoundError(f"{str(root)!r} is not a model directory: it has neither config.json nor "
                                        f"{PRETRAINED_SINGLE} / {PRETRAINED_INDEX}")
            raise FileNotFoundError(f"{str(root)!r}: config.json is missing; a model directory needs its "
                                    "transformers configuration next to the weights")
        config = parse_json(config_file.read_bytes(), config_file, error)
        if not isinstance(config, dict):
            raise error(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        return cls(root, config, error=error)

    @classmethod
    def open_pretrained(cls, path) -> "Checkpoint":
        """A Hugging Face model directory (config.json plus ``model.safetensors.index.json`` and its
        shards, or one ``model.safetensors``), its headers read and checked: FileNotFoundError (no
        such directory, no config.json, no weights, a missing shard) or :class:`CheckpointError`
        for a moei2 checkpoint, an unsupported architecture, a broken index or a config.json whose
        layer count differs from the weights'."""
        self = cls.open(path, error=CheckpointError, argument="directory")
        if self.is_moei2:
            raise CheckpointError(f"{str(self.directory)!r} is already compressed by moei2; compress the original "
                                  "model")
        self.adapter_class()
        self._index_pretrained()
        declared = self.config.get("num_hidden_layers")
        stored = 1 + max((int(k.split(".")[2]) for k in self.weight_map
                          if k.startswith(LAYER_PREFIX) and k.split(".")[2].isdigit()), default=-1)
        if isinstance(declared, int) and declared != stored:
            # Checked before the model is built: an absurd count would build that many layers.
            raise CheckpointError(f"{self.config_file}: num_hidden_layers is {declared}, the weights hold {stored} "
                                  "decoder layers; config.json does not match the weights")
        return self

    @classmethod
    @contextlib.contextmanager
    def open_moei2(cls, path) -> Iterator["Checkpoint"]:
        """A moei2 checkpoint as one snapshot, its metadata checked (the tensor index is read by
        :meth:`index`); the files are closed when the block ends."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        directory = Path(path)
        if not os.path.lexists(directory):
            recover(directory.absolute())  # a save killed between its two fallback renames
        if not directory.exists():
            raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint {str(directory)!r} is not a directory")
        with open_snapshot(directory) as snapshot:
            yield cls._from_snapshot(snapshot)

    @classmethod
    def _from_snapshot(cls, snapshot: Snapshot) -> "Checkpoint":
        directory = snapshot.directory
        for name in (META_NAME, CONFIG_NAME):
            if not snapshot.has(name):
                raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {name}: not a moei2 checkpoint, or "
                                        "an incomplete one")
        meta = parse_json(snapshot.read_bytes(META_NAME), directory / META_NAME)
        config = parse_json(snapshot.read_bytes(CONFIG_NAME), directory / CONFIG_NAME)
        if not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{directory / META_NAME}: unknown checkpoint format {found!r} "
                             f"(this moei2 reads formats {', '.join(map(str, READ_FORMATS))})")
        if not isinstance(config, dict) or not isinstance(config.get("moei2"), dict):
            raise ValueError(f"{directory / CONFIG_NAME}: no 'moei2' entry recording the experts kept and their "
                             "ranks")
        checks = [("architecture", str), ("dtype", str), ("aliases", dict)]
        if meta["format"] >= 2:
            checks += [("files", dict), ("tensors", dict)]
        for key, kind in checks:
            if not isinstance(meta.get(key), kind):
                raise ValueError(f"{directory / META_NAME}: '{key}' is missing or not a {kind.__name__}")
        if not isinstance(meta.get(OTHER_FILES, {}), dict):
            raise ValueError(f"{directory / META_NAME}: '{OTHER_FILES}' is not a dict")
        self = cls(directory, config, meta=meta, snapshot=snapshot)
        for name in self.weight_files() + sorted(meta.get(OTHER_FILES, {})):
            if not snapshot.has(name):
                raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {name}: an incomplete checkpoint")
        return self

    # ---- what the files say ----

    def adapter_class(self):
        """The adapter class of the model's architecture (moei2.json's for a moei2 checkpoint, else
        the first supported entry of config.json's ``architectures``, else its ``model_type``'s);
        ``error`` naming the file when moei2 does not support it."""
        from .models import ADAPTERS, FAMILIES

        if self.meta is not None:
            name = found = self.meta["architecture"]
            file = self.directory / META_NAME
        else:
            names = self.config.get("architectures") or []
            if not isinstance(names, list) or not all(isinstance(a, str) for a in names):
                raise self.error(f"{self.config_file}: 'architectures' must be a list of class names, got {names!r}")
            name = next((a for a in names if a in ADAPTERS), None)
            if name is None:
                family = FAMILIES.get(self.config.get("model_type"))
                name = family.architecture if family is not None else None
            found, file = names or self.config.get("model_type"), self.config_file
        if name not in ADAPTERS:
            raise self.error(f"{file}: architecture {found!r} is not supported; supported: "
                             f"{', '.join(sorted(ADAPTERS))}")
        return ADAPTERS[name]

    def model_config(self):
        """The transformers configuration, from the config.json read (what ``from_pretrained`` does
        with a local config.json); ``error`` naming the file when it does not make one."""
        model_class = self.adapter_class().model_class()
        try:
            return model_class.config_class.from_dict(copy.deepcopy(self.config))
        except Exception as exc:
            raise self.error(f"{self.config_file}: cannot be read as a {model_class.config_class.__name__} "
                             f"({exc})") from None

    def skeleton(self, dtype, config=None):
        """The model on the meta device (shapes, no storage): :meth:`build` there."""
        return self.build(dtype, config, device="meta")

    def build(self, dtype, config=None, *, device="cpu"):
        """The model built on ``device`` without initialising its weights, tied, and in the
        recorded layout when the checkpoint has a record; ``config`` (default :meth:`model_config`)
        is used as given. A configuration that makes no model (zero heads, a negative width, ...)
        raises ``error`` naming config.json instead of whatever the model's constructor raises."""
        import torch
        from transformers.initialization import no_init_weights

        model_class = self.adapter_class().model_class()
        config = self.model_config() if config is None else config
        try:
            with torch.device(device), no_init_weights():
                model = model_class._from_config(config, dtype=dtype)
        except Exception as exc:
            raise self.error(f"{self.config_file}: no {model_class.__name__} can be built from it "
                             f"({type(exc).__name__}: {exc})") from None
        # no_init_weights also skips the tying init_weights does.
        model.tie_weights()
        if self.meta is not None:
            from .models import apply_structure

            apply_structure(model, self.record)
        return model

    @property
    def storage_dtype(self):
        """The dtype the weights are stored in: the recorded one, or the most common floating
        dtype of the tensors (float32 when none is floating)."""
        import torch

        if self.meta is not None:
            return torch_dtype(self.meta["dtype"])
        stored = Counter(h.dtype for f in self.files.values() for h in f.tensors.values()
                         if h.dtype.is_floating_point).most_common(1)
        return stored[0][0] if stored else torch.float32

    def tensor(self, key: str) -> TensorInfo:
        """The header entry of the tensor stored under ``key``."""
        return self.files[self.weight_map[key]].tensors[key]

    def file_of(self, key: str) -> Path:
        return self.directory / self.weight_map[key]

    def checkpoint_bytes(self) -> int:
        return sum(os.path.getsize(f.path) for f in self.files.values())

    # ---- the tensor index ----

    def weight_files(self) -> list[str]:
        """The names of a moei2 checkpoint's weights files, as moei2.json records them."""
        meta = self.meta
        if meta["format"] == 1:
            return [WEIGHTS_NAME]
        names = sorted(meta["files"])
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not isinstance(meta["files"][n], dict)]
        if bad or not names:
            raise ValueError(f"{self.directory / META_NAME}: 'files' must map weight file names in the directory to "
                             f"their checksums, got {bad[:3] or 'none'}")
        return names

    def index(self) -> dict:
        """``{key: file name}`` over every weights file of a moei2 checkpoint (headers only, read
        once), checked against the dtypes and shapes recorded at save time (format 2)."""
        if self.weight_map:
            return self.weight_map
        directory, meta = self.directory, self.meta
        for name in self.weight_files():
            f = self.files[name] = self.snapshot.safetensors(name)
            for key in f.tensors:
                if key in self.weight_map:
                    raise ValueError(f"{directory / name}: tensor {key!r} is also stored in {self.weight_map[key]}")
                self.weight_map[key] = name
        if meta["format"] >= 2:
            self._check_recorded_tensors()
        return self.weight_map

    def _check_recorded_tensors(self) -> None:
        directory, recorded = self.directory, self.meta["tensors"]
        if set(recorded) != set(self.weight_map):
            extra = sorted(set(self.weight_map) - set(recorded))
            missing = sorted(set(recorded) - set(self.weight_map))
            raise ValueError(f"{directory}: the weights files do not hold the tensors {META_NAME} records "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        for key, name in self.weight_map.items():
            info, want = self.tensor(key), recorded[key]
            got_dtype = str(info.dtype).replace("torch.", "")
            if (not isinstance(want, dict) or want.get("file") != name or want.get("dtype") != got_dtype
                    or list(want.get("shape", ())) != list(info.shape)):
                raise ValueError(f"{directory / name}: tensor {key!r} is stored as {got_dtype} {list(info.shape)}, "
                                 f"{META_NAME} records {want!r}; the checkpoint is corrupt")

    def _index_pretrained(self) -> None:
        """Reads a Hugging Face model's index (or its one weights file) and every shard's header,
        checking each index entry."""
        root = self.directory
        index_file = root / PRETRAINED_INDEX
        if index_file.is_file():
            try:
                index = json.loads(index_file.read_text())
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_file}: not a safetensors index ({exc})") from None
            for name in sorted(set(weight_map.values())):
                path = root / name
                if Path(name).name != name:
                    raise CheckpointError(f"{index_file}: shard name {name!r} is not a file name in the directory")
                if not path.is_file():
                    raise FileNotFoundError(f"{index_file} names shard {name!r}, which is missing from {str(root)!r}")
                self.files[name] = SafetensorsFile(path)
            absent = [(k, v) for k, v in weight_map.items() if k not in self.files[v].tensors]
            if absent:
                k, v = absent[0]
                raise CheckpointError(f"{index_file} names {len(absent)} tensor(s) absent from their shard, e.g. "
                                      f"{k!r} in {v!r}")
            self.weight_map = dict(weight_map)
            return
        single = root / PRETRAINED_SINGLE
        if single.is_file():
            f = self.files[PRETRAINED_SINGLE] = SafetensorsFile(single)
            self.weight_map = {k: PRETRAINED_SINGLE for k in f.tensors}
            return
        others = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {others[:3]}: only safetensors weights are streamed)" if others else ""
        raise FileNotFoundError(f"{str(root)!r} has no {PRETRAINED_SINGLE} or {PRETRAINED_INDEX}{hint}")

    # ---- checksums (moei2 checkpoints) ----

    def verify_checksums(self, weights: bool) -> None:
        """The files under a checksum against the sha256 and size recorded at save time: with
        ``weights`` the weights files, else the others (config.json, the index, tokenizer and report,
        where the checkpoint records them; small, so checked before anything is built from them)."""
        import hashlib

        directory, meta = self.directory, self.meta
        recorded = meta["files"] if weights else meta.get(OTHER_FILES, {})
        for name, want in sorted(recorded.items()):
            if not isinstance(want, dict):
                raise ValueError(f"{directory / META_NAME}: the checksum of {name!r} is not a dict")
            digest = hashlib.sha256()
            size = 0
            fd = self.snapshot.fds[name]
            while True:
                chunk = os.pread(fd, 16 << 20, size)
                if not chunk:
                    break
                size += len(chunk)
                digest.update(chunk)
            if size != want.get("bytes") or digest.hexdigest() != want.get("sha256"):
                raise ValueError(f"{directory / name}: checksum mismatch (sha256 {digest.hexdigest()[:16]}..., "
                                 f"{size} bytes; {META_NAME} records {str(want.get('sha256'))[:16]}..., "
                                 f"{want.get('bytes')} bytes): the file is corrupt or was changed after saving. "
                                 "load(..., verify=False) skips this check")
