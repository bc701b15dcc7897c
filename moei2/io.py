"""Saving and loading compressed (pruned and low-rank) MoE checkpoints.

A checkpoint is a directory holding:

``config.json``
    the model's ORIGINAL transformers configuration plus a ``moei2`` entry recording, for every
    MoE layer, the original expert count, the experts kept (original indices) and each kept
    expert's ``[gate, up, down]`` ranks (``null`` while the layer's experts are dense), and an
    ``auto_map`` pointing transformers' ``AutoModelForCausalLM`` at ``modeling_moei2.py``.
``moei2_model.safetensors``
    every tensor of the state dict, tied tensors stored once. It is deliberately not named
    ``model.safetensors``: a plain ``from_pretrained`` without ``trust_remote_code`` would
    otherwise build the uncompressed layout and silently fill the missing experts with random
    weights; with this name it fails with "no file named model.safetensors".
``moei2.json``
    format version, architecture, dtype, the tied-tensor aliases and the sizes.
``modeling_moei2.py``
    a loader so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
    calls :func:`load`.
``report.json`` and tokenizer files, when given.

:func:`load` builds the model from its original configuration, reshapes it to the recorded
layout (:func:`moei2.models.apply_structure`) and then loads the weights strictly, so the
rebuilt model computes exactly what the saved one did.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["save", "load", "is_moei2_checkpoint", "inspect_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
WEIGHTS_NAME = "moei2_model.safetensors"
META_NAME = "moei2.json"
CONFIG_NAME = "config.json"
REPORT_NAME = "report.json"
LOADER_NAME = "modeling_moei2.py"
LOADER_CLASS = "MoEI2ForCausalLM"

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


# ---- safetensors files, read without memory maps -----------------------------------------------

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 << 20


class TensorInfo:
    """One entry of a safetensors header: ``dtype`` (torch), ``shape``, byte range ``start``..``end`` in the file."""

    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype, shape, start, end):
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """A safetensors file's header, parsed and checked (offsets inside the file, sizes matching
    dtype x shape) without reading the data; :meth:`reader` reads tensors with positioned reads
    into new tensors, so no memory map keeps pages resident.

    Raises ValueError naming the file for anything that is not a well-formed safetensors file.
    """

    def __init__(self, path):
        import torch

        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than a header")
                n = int.from_bytes(head, "little")
                if n > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} exceeds the file")
                raw = f.read(n)
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.path}: unreadable safetensors file, corrupt or truncated ({exc})") from None
        self.data_offset = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        data_size = size - self.data_offset
        for key, entry in header.items():
            try:
                name = _ST_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                start, end = (int(x) for x in entry["data_offsets"])
                dtype = getattr(torch, name)
                numel = 1
                for d in shape:
                    if d < 0:
                        raise ValueError("negative dimension")
                    numel *= d
                itemsize = torch.empty((), dtype=dtype).element_size()
                if not 0 <= start <= end <= data_size or end - start != numel * itemsize:
                    raise ValueError(f"data offsets {start}..{end} do not hold {shape} {entry['dtype']} inside "
                                     f"{data_size} data bytes")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ValueError(f"{self.path}: tensor {key!r} has a corrupt header entry ({exc}); the file is "
                                 "corrupt or truncated") from None
            self.tensors[key] = TensorInfo(dtype, shape, start, end)

    @contextlib.contextmanager
    def reader(self):
        """Yields ``read(key) -> tensor`` (CPU, the stored dtype); the file is closed at exit."""
        import torch

        with open(self.path, "rb", buffering=0) as f:
            def read(key):
                info = self.tensors[key]
                buf = torch.empty(info.nbytes, dtype=torch.uint8)
                if info.nbytes:
                    f.seek(self.data_offset + info.start)
                    view = memoryview(buf.numpy())
                    got = 0
                    while got < info.nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            raise ValueError(f"{self.path}: tensor {key!r} is truncated")
                        got += n
                return buf.view(info.dtype).reshape(info.shape)

            yield read


# ---- saving ----------------------------------------------------------------------------------

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


def _sizes(model, adapter, record, tensors) -> dict:
    """Parameter counts and bytes of the original (dense, unpruned) and the compressed model."""
    import torch

    params_after = sum(t.numel() for t in tensors.values())
    bytes_after = sum(t.numel() * t.element_size() for t in tensors.values())
    params_before, bytes_before = params_after, bytes_after
    routed_before = routed_after = 0
    for view in adapter.moe_layers():
        current = list(view.experts_module.parameters())
        element = current[0].element_size() if current else torch.finfo(torch.float32).bits // 8
        now = sum(p.numel() for p in current)
        original = record["layers"][str(view.layer_index)]["num_experts"]
        dense = original * 3 * view.intermediate_size * view.hidden_size
        router_removed = (original - view.num_experts) * view.hidden_size
        routed_before += dense
        routed_after += now
        params_before += dense - now + router_removed
        bytes_before += (dense - now) * element + router_removed * view.router.weight.element_size()
    return {"parameters_before": int(params_before), "parameters_after": int(params_after),
            "bytes_before": int(bytes_before), "bytes_after": int(bytes_after),
            "routed_expert_parameters_before": int(routed_before),
            "routed_expert_parameters_after": int(routed_after)}


def _is_moei2_dir(path: Path) -> bool:
    return (path / META_NAME).is_file() and (path / CONFIG_NAME).is_file()


def save(model, path, *, tokenizer=None, report: Optional[dict] = None, overwrite: bool = False) -> dict:
    """Writes ``model`` (pruned and/or low-rank, or untouched) as a moei2 checkpoint directory.

    path: the directory to create. overwrite: replace an existing moei2 checkpoint (or empty
    directory) there; any other existing path raises FileExistsError. tokenizer: saved alongside
    when given. report: a JSON-serialisable dict written to ``report.json``.

    The write is atomic: everything goes to a temporary directory next to ``path`` that is renamed
    into place at the end, so on any error nothing is left behind and an existing checkpoint is
    kept. Returns the sizes: ``parameters_before``/``bytes_before`` (the dense model with all
    original experts, in the saved dtypes), ``parameters_after``/``bytes_after`` (what is saved),
    the routed-expert parameter counts, ``file_bytes`` (the whole directory) and ``path``.
    """
    import copy

    from safetensors.torch import save_file

    from .models import get_adapter, structure_of

    adapter = get_adapter(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"report must be a dict or None, got {type(report).__name__}")
    target = Path(path).absolute()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"path {str(target)!r} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"path {str(target)!r} already exists; pass overwrite=True to replace it")
        if any(target.iterdir()) and not _is_moei2_dir(target):
            raise ValueError(f"path {str(target)!r} is a non-empty directory that is not a moei2 checkpoint; "
                             "refusing to replace it")
    report_text = None
    if report is not None:
        try:
            report_text = json.dumps(report, indent=2, allow_nan=True, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"report is not JSON-serialisable: {exc}") from None

    record = structure_of(model, adapter)
    tensors, aliases = _unique_state_dict(model)
    sizes = _sizes(model, adapter, record, tensors)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = str(first.dtype).replace("torch.", "") if first is not None else "float32"

    config = copy.deepcopy(model.config)
    config.moei2 = record
    config.architectures = [type(model).__name__]
    config.auto_map = {"AutoModelForCausalLM": f"{LOADER_NAME[:-3]}.{LOADER_CLASS}"}
    meta = {"format": CHECKPOINT_FORMAT, "architecture": type(model).__name__, "family": adapter.family,
            "dtype": dtype, "weights": WEIGHTS_NAME, "num_tensors": len(tensors) + len(aliases),
            "aliases": aliases, "sizes": sizes}

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    backup = None
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "moei2_format": str(CHECKPOINT_FORMAT)})
        config.save_pretrained(str(tmp))
        (tmp / LOADER_NAME).write_text(_LOADER_SOURCE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if report_text is not None:
            (tmp / REPORT_NAME).write_text(report_text)
        # moei2.json is written last: a directory without it is never taken for a checkpoint.
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            backup.rmdir()
            target.rename(backup)
        try:
            tmp.rename(target)
        except BaseException:
            if backup is not None:
                backup.rename(target)
                backup = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    sizes = dict(sizes, file_bytes=sum(f.stat().st_size for f in target.iterdir() if f.is_file()), path=str(target))
    return sizes


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


# ---- reading ---------------------------------------------------------------------------------

def is_moei2_checkpoint(path) -> bool:
    """True if ``path`` is a directory written by :func:`save` (it has ``moei2.json`` and ``config.json``)."""
    try:
        p = Path(path)
        if not _is_moei2_dir(p):
            return False
        meta = json.loads((p / META_NAME).read_text())
        return isinstance(meta, dict) and "format" in meta
    except (OSError, TypeError, ValueError):
        return False


def _read_checkpoint(path):
    """Checks the files of a checkpoint; returns ``(directory, meta, config dict)``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {str(directory)!r} is not a directory")
    for name in (META_NAME, CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {name}: not a moei2 checkpoint, or an "
                                    "incomplete one")
    meta = _read_json(directory / META_NAME)
    config = _read_json(directory / CONFIG_NAME)
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{directory / META_NAME}: unknown checkpoint format {found!r} "
                         f"(this moei2 reads format {CHECKPOINT_FORMAT})")
    if not isinstance(config, dict) or not isinstance(config.get("moei2"), dict):
        raise ValueError(f"{directory / CONFIG_NAME}: no 'moei2' entry recording the experts kept and their ranks")
    for key, kind in (("architecture", str), ("dtype", str), ("aliases", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{directory / META_NAME}: '{key}' is missing or not a {kind.__name__}")
    return directory, meta, config


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


def _weight_header(file: Path) -> dict:
    """Names, dtypes and shapes of the tensors in a safetensors file (reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{file}: unreadable safetensors file, corrupt or truncated ({exc})") from None


def inspect_checkpoint(path) -> dict:
    """A summary of a moei2 checkpoint without building the model.

    Returns ``path``, ``architecture``, ``family``, ``dtype``, ``layers`` (per MoE layer:
    ``num_experts`` originally, ``kept`` original indices, ``num_kept``, ``ranks`` or ``None``),
    ``experts_kept`` and ``experts_total``, ``sizes`` (as returned by :func:`save`),
    ``num_tensors``, ``files`` (name → bytes), ``has_tokenizer``, ``has_report``.
    """
    directory, meta, config = _read_checkpoint(path)
    header = _weight_header(directory / WEIGHTS_NAME)
    record = config["moei2"]
    layers = {}
    for key, entry in sorted(record.get("layers", {}).items(), key=lambda kv: int(kv[0])):
        layers[int(key)] = {"num_experts": entry.get("num_experts"), "kept": entry.get("kept"),
                            "num_kept": len(entry.get("kept") or []), "ranks": entry.get("ranks")}
    files = {f.name: f.stat().st_size for f in sorted(directory.iterdir()) if f.is_file()}
    return {
        "path": str(directory.absolute()),
        "architecture": meta["architecture"],
        "family": meta.get("family"),
        "dtype": meta["dtype"],
        "layers": layers,
        "experts_kept": sum(v["num_kept"] for v in layers.values()),
        "experts_total": sum(int(v["num_experts"] or 0) for v in layers.values()),
        "sizes": meta.get("sizes"),
        "num_tensors": len(header) + len(meta["aliases"]),
        "files": files,
        "has_tokenizer": any(name.startswith("tokenizer") for name in files),
        "has_report": REPORT_NAME in files,
    }


def _resolve_dtype(dtype, saved: str):
    import torch

    if dtype is None:
        dtype = saved
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype: {dtype!r} is not a torch dtype")
        dtype = value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (or its name), got {dtype!r}")
    return dtype


def load(path, *, dtype=None, device="cpu"):
    """Rebuilds a model saved by :func:`save`, in eval mode.

    dtype: the dtype to build the model in (default: the saved one). device: where the model is put.
    The model is built from its original configuration, pruned and given low-rank experts as
    recorded in ``config.json``, then every tensor is loaded strictly: a missing, unexpected or
    mis-shaped tensor raises ValueError naming it, a missing file FileNotFoundError.
    """
    import torch
    from safetensors.torch import load_file

    from .models import ADAPTERS, apply_structure

    directory, meta, config_dict = _read_checkpoint(path)
    architecture = meta["architecture"]
    if architecture not in ADAPTERS:
        raise ValueError(f"{directory / META_NAME}: architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(sorted(ADAPTERS))}")
    dtype = _resolve_dtype(dtype, meta["dtype"])
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None

    header = _weight_header(directory / WEIGHTS_NAME)
    model_class = ADAPTERS[architecture].model_class()
    try:
        config = model_class.config_class.from_pretrained(str(directory))
    except Exception as exc:
        raise ValueError(f"{directory / CONFIG_NAME}: cannot be read as a {model_class.config_class.__name__} "
                         f"({exc})") from None
    from transformers.initialization import no_init_weights

    # Weights are all overwritten below, so the random initialisation is skipped.
    with no_init_weights():
        model = model_class._from_config(config, dtype=dtype)
    # no_init_weights also skips the tying that init_weights does.
    model.tie_weights()
    apply_structure(model, config_dict["moei2"])

    expected = model.state_dict()
    aliases = meta["aliases"]
    stored = set(header)
    wanted = set(expected) - set(aliases)
    missing = sorted(wanted - stored)
    unexpected = sorted(stored - wanted)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match the recorded layout: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(wanted):
        if header[key][1] != tuple(expected[key].shape):
            raise ValueError(f"{directory / WEIGHTS_NAME}: tensor {key!r} has shape {header[key][1]}, the recorded "
                             f"layout needs {tuple(expected[key].shape)}")
    bad_alias = [a for a, src in aliases.items() if a not in expected or src not in stored]
    if bad_alias:
        raise ValueError(f"{directory / META_NAME}: tied-tensor aliases {bad_alias[:5]} do not match the model")
    try:
        state = load_file(str(directory / WEIGHTS_NAME))
    except Exception as exc:
        raise ValueError(f"{directory / WEIGHTS_NAME}: unreadable, corrupt or truncated ({exc})") from None
    for alias, source in aliases.items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True)
    model.config.moei2 = config_dict["moei2"]
    return model.to(device).eval()
