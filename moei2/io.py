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

Writing goes through :class:`CheckpointWriter`, which the streamed pipeline feeds one layer at a
time: shards are written as tensors arrive, into a staging directory next to the target that is
swapped in at the end in one atomic step (``renameat2(RENAME_EXCHANGE)``). The same model saved
twice gives the same bytes (all JSON keys sorted). :func:`load` builds the model from its original
configuration on the meta device, reshapes it to the recorded layout
(:func:`moei2.models.apply_structure`), checks every tensor's name, shape and dtype against the
files and the record before allocating, verifies the checksums (``verify=False`` skips them),
refuses non-finite weights, and then loads strictly, so the rebuilt model computes exactly what the
saved one did. It reads one checkpoint or fails: every file is opened relative to one handle on
the directory before anything is parsed (:class:`_Snapshot`), so a save replacing the checkpoint
meanwhile is wholly before or wholly after the load. See docs/checkpoints.md.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Optional

__all__ = ["save", "load", "load_with_tokenizer", "is_moei2_checkpoint", "inspect_checkpoint", "CheckpointWriter", "SizeTally",
           "CHECKPOINT_FORMAT", "SafetensorsFile"]

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
_OTHER_FILES = "other_files"  # moei2.json: checksums of every file that is neither weights nor moei2.json

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

    ``fd``: an open descriptor of the file to read through instead of ``path`` (which then only names
    it in messages); it stays open, its owner closes it. Raises ValueError naming the file for
    anything that is not a well-formed safetensors file.
    """

    def __init__(self, path, fd: Optional[int] = None):
        import torch

        self.path = Path(path)
        self._fd = fd
        try:
            if fd is None:
                with open(self.path, "rb") as f:
                    size, n, raw = _read_head(f.fileno())
            else:
                size, n, raw = _read_head(fd)
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
        # As the safetensors format requires: the tensors tile the data area, in order, without
        # gaps or overlaps. Overlapping offsets would let one tensor read another's bytes.
        position = 0
        for key, info in sorted(self.tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
            if info.start != position:
                raise ValueError(f"{self.path}: tensor {key!r} starts at data byte {info.start}, expected "
                                 f"{position} (tensors must follow one another without gaps or overlaps); the "
                                 "file is corrupt")
            position = info.end
        if position != data_size:
            raise ValueError(f"{self.path}: the tensors end at data byte {position} of {data_size}; the file is "
                             "corrupt or truncated")

    @contextlib.contextmanager
    def reader(self):
        """Yields ``read(key, scratch=None) -> tensor`` (CPU, the stored dtype); a file opened here is
        closed at exit (one handed to the constructor stays open: its owner closes it).
        ``scratch``: a uint8 tensor to read into when large enough (the result is a view of it),
        which spares the page faults of a fresh allocation per tensor."""
        import torch

        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if self._fd is None else self._fd
        try:
            def read(key, scratch=None):
                info = self.tensors[key]
                if scratch is not None and scratch.numel() >= info.nbytes:
                    buf = scratch[:info.nbytes]
                else:
                    buf = torch.empty(info.nbytes, dtype=torch.uint8)
                if info.nbytes:
                    view = memoryview(buf.numpy())
                    got = 0
                    while got < info.nbytes:
                        n = os.preadv(fd, [view[got:]], self.data_offset + info.start + got)
                        if not n:
                            raise ValueError(f"{self.path}: tensor {key!r} is truncated")
                        got += n
                return buf.view(info.dtype).reshape(info.shape)

            yield read
        finally:
            if self._fd is None:
                os.close(fd)


def _read_head(fd: int) -> tuple[int, int, bytes]:
    """``(file size, header length, header bytes)`` of the safetensors file open as ``fd``."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise ValueError("shorter than a header")
    n = int.from_bytes(head, "little")
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"header length {n} exceeds the file")
    raw = bytearray()
    while len(raw) < n:
        chunk = os.pread(fd, n - len(raw), 8 + len(raw))
        if not chunk:
            raise ValueError("truncated header")
        raw += chunk
    return size, n, bytes(raw)


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


def _is_moei2_dir(path: Path) -> bool:
    return (path / META_NAME).is_file() and (path / CONFIG_NAME).is_file()


# ---- atomic directory replacement and stale staging directories ----------------------------------

_STAGING_TAG = "moei2-tmp"
_OLD_TAG = "moei2-old"
_RENAME_EXCHANGE = 2


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (jiffies since boot, from /proc), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        if not Path("/proc/self/stat").exists():
            try:
                os.kill(pid, 0)
                return "?"
            except ProcessLookupError:
                return None
            except PermissionError:
                return "?"
        return None


def _owner_tag() -> str:
    return f"{os.getpid()}-{_process_start(os.getpid()) or 0}"


def _owner_alive(name: str, tag: str) -> bool:
    """Whether the process that made the staging or backup directory ``name`` still runs."""
    try:
        pid, start = name.split(f".{tag}-", 1)[1].split("-")[:2]
        now = _process_start(int(pid))
    except (IndexError, ValueError):
        return True  # not ours to judge: keep it
    return now is not None and (now == "?" or now == start)


def _leftovers(target: Path, tag: str) -> list[Path]:
    prefix = f".{target.name}.{tag}-"
    try:
        return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def _recover(target: Path) -> None:
    """Finishes or undoes what a killed save left next to ``target``.

    A save that had to fall back to two renames (a filesystem without RENAME_EXCHANGE) and died
    between them leaves the previous checkpoint under a backup name and nothing at ``target``: put
    it back. Staging and backup directories of processes that are gone are removed; those of live
    processes (a save running now) are left alone.
    """
    for backup in _leftovers(target, _OLD_TAG):
        if _owner_alive(backup.name, _OLD_TAG):
            continue
        # A backup is only ever made of a directory a writer was allowed to replace (a moei2
        # checkpoint or an exported model), both of which hold config.json.
        if not os.path.lexists(target) and (backup / CONFIG_NAME).is_file():
            try:
                os.rename(backup, target)
                continue
            except OSError:
                pass
        shutil.rmtree(backup, ignore_errors=True)
    for staging in _leftovers(target, _STAGING_TAG):
        if not _owner_alive(staging.name, _STAGING_TAG):
            shutil.rmtree(staging, ignore_errors=True)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {str(a)!r} and {str(b)!r}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(staging: Path, target: Path) -> None:
    """Puts ``staging`` at ``target`` in one atomic step and removes what was there before."""
    if os.path.lexists(target):
        if _renameat2_exchange(staging, target):
            _fsync_dir(target.parent)
            shutil.rmtree(staging, ignore_errors=True)  # now the previous checkpoint
            return
        # Fallback: two renames. A crash between them leaves the previous checkpoint under the
        # backup name, which _recover (run by the next save and by load) puts back.
        backup = target.parent / f".{target.name}.{_OLD_TAG}-{_owner_tag()}-{os.urandom(4).hex()}"
        os.rename(target, backup)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(backup, target)
            raise
        _fsync_dir(target.parent)
        shutil.rmtree(backup, ignore_errors=True)
        return
    os.rename(staging, target)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def staged_directory(target: Path):
    """Yields an empty staging directory next to ``target`` that is put at ``target`` in one atomic
    step (replacing what is there) when the block ends normally, and removed on any exception.
    The caller has checked that ``target`` may be replaced."""
    target = Path(target).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"output path {str(target)!r}: cannot create its parent directory "
                              f"({exc.strerror or exc})") from None
    _recover(target)
    staging = target.parent / f".{target.name}.{_STAGING_TAG}-{_owner_tag()}-{os.urandom(4).hex()}"
    try:
        os.mkdir(staging, 0o777)
    except OSError as exc:
        raise PermissionError(f"output path {str(target)!r}: its parent directory {str(target.parent)!r} is not "
                              f"writable ({exc.strerror or exc})") from None
    try:
        yield staging
        for file in staging.iterdir():
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        _fsync_dir(staging)
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---- the writer ----------------------------------------------------------------------------------

def _check_output(target: Path, overwrite: bool) -> None:
    if os.path.lexists(target):
        if not target.is_dir():
            raise FileExistsError(f"output path {str(target)!r} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"output path {str(target)!r} already exists; pass overwrite=True to replace it")
        if any(target.iterdir()) and not _is_moei2_dir(target):
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
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionError(f"output path {str(self.path)!r}: cannot create its parent directory "
                                  f"({exc.strerror or exc})") from None
        _recover(self.path)
        _check_output(self.path, overwrite)  # recovery may have put a checkpoint back
        staging = parent / f".{self.path.name}.{_STAGING_TAG}-{_owner_tag()}-{os.urandom(4).hex()}"
        try:
            os.mkdir(staging, 0o777)  # the umask applies, as for save_pretrained's directories
        except OSError as exc:
            raise PermissionError(f"output path {str(self.path)!r}: its parent directory {str(parent)!r} is not "
                                  f"writable ({exc.strerror or exc})") from None
        self.staging = staging
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
            name = str(tensor.dtype).replace("torch.", "")
            if name not in _ST_NAMES:
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
            self._tensors[key] = {"dtype": str(tensor.dtype).replace("torch.", ""),
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
            header = {key: {"dtype": _ST_NAMES[self._tensors[key]["dtype"]], "shape": self._tensors[key]["shape"],
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
                    "aliases": dict(aliases), "sizes": dict(sizes), "files": files, _OTHER_FILES: other,
                    "tensors": {key: {"dtype": info["dtype"], "shape": info["shape"], "file": info["file"]}
                                for key, info in self._tensors.items()}}
            self._write_text(staging / META_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            _fsync_dir(staging)
            _replace_dir(staging, self.path)
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
        dtype = str(first.dtype).replace("torch.", "") if first is not None else "float32"
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


class _Snapshot:
    """One checkpoint directory, opened once: every regular file in it is opened, relative to the
    directory's handle, before anything is parsed, and all reading goes through those handles.

    A save replaces a checkpoint by swapping a complete new directory in and then removing the old
    one (:func:`_replace_dir`); a published directory is never changed in place. So once every file
    is open and the path still names the directory opened, what is read is that one checkpoint,
    even if a save replaces it meanwhile (removed files stay readable through open handles).
    :func:`_open_snapshot` retries when a swap falls inside the opening.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.fds: dict[str, int] = {}
        self._dir = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            for name in sorted(os.listdir(self._dir)):
                try:
                    # O_NONBLOCK: a FIFO planted in the directory must not hang the open.
                    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=self._dir)
                except (FileNotFoundError, IsADirectoryError, PermissionError):
                    continue  # removed under us (see current()), or not a file we could read
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    self.fds[name] = fd
                else:
                    os.close(fd)
        except BaseException:
            self.close()
            raise

    def current(self) -> bool:
        """Whether the path still names the directory opened, and it was not removed: then every
        file opened belongs to one complete checkpoint."""
        mine = os.fstat(self._dir)
        try:
            now = os.stat(self.directory)
        except OSError:
            return False
        return mine.st_nlink > 0 and (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

    def has(self, name: str) -> bool:
        return name in self.fds

    def size(self, name: str) -> int:
        return os.fstat(self.fds[name]).st_size

    def read_bytes(self, name: str) -> bytes:
        fd, out = self.fds[name], bytearray()
        while True:
            chunk = os.pread(fd, 16 << 20, len(out))
            if not chunk:
                return bytes(out)
            out += chunk

    def read_json(self, name: str):
        try:
            return json.loads(self.read_bytes(name))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.directory / name}: not valid JSON ({exc})") from None

    def safetensors(self, name: str) -> "SafetensorsFile":
        return SafetensorsFile(self.directory / name, fd=self.fds[name])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    def __enter__(self) -> "_Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SNAPSHOT_TRIES = 50


def _open_snapshot(directory: Path) -> _Snapshot:
    """A :class:`_Snapshot` of ``directory`` taken while no save swapped it (retried otherwise)."""
    for _ in range(_SNAPSHOT_TRIES):
        try:
            snapshot = _Snapshot(directory)
        except FileNotFoundError:
            continue  # the directory itself was swapped out and removed between lookup and open
        if snapshot.current():
            return snapshot
        snapshot.close()
    raise OSError(f"checkpoint {str(directory)!r} was replaced {_SNAPSHOT_TRIES} times while being opened; "
                  "a save is rewriting it in a loop")


def _read_checkpoint(path) -> _Snapshot:
    """Opens a checkpoint as one snapshot and checks its files; the snapshot carries ``meta`` and
    ``config`` (the parsed moei2.json and config.json). Close it (``with``) when done."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    directory = Path(path)
    if not os.path.lexists(directory):
        _recover(directory.absolute())  # a save killed between its two fallback renames
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {str(directory)!r} is not a directory")
    snapshot = _open_snapshot(directory)
    try:
        _check_snapshot(snapshot)
    except BaseException:
        snapshot.close()
        raise
    return snapshot


def _check_snapshot(snapshot: _Snapshot) -> None:
    directory = snapshot.directory
    for name in (META_NAME, CONFIG_NAME):
        if not snapshot.has(name):
            raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {name}: not a moei2 checkpoint, or an "
                                    "incomplete one")
    meta = snapshot.meta = snapshot.read_json(META_NAME)
    config = snapshot.config = snapshot.read_json(CONFIG_NAME)
    if not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{directory / META_NAME}: unknown checkpoint format {found!r} "
                         f"(this moei2 reads formats {', '.join(map(str, READ_FORMATS))})")
    if not isinstance(config, dict) or not isinstance(config.get("moei2"), dict):
        raise ValueError(f"{directory / CONFIG_NAME}: no 'moei2' entry recording the experts kept and their ranks")
    checks = [("architecture", str), ("dtype", str), ("aliases", dict)]
    if meta["format"] >= 2:
        checks += [("files", dict), ("tensors", dict)]
    for key, kind in checks:
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{directory / META_NAME}: '{key}' is missing or not a {kind.__name__}")
    if not isinstance(meta.get(_OTHER_FILES, {}), dict):
        raise ValueError(f"{directory / META_NAME}: '{_OTHER_FILES}' is not a dict")
    for name in _weight_names(directory, meta) + sorted(meta.get(_OTHER_FILES, {})):
        if not snapshot.has(name):
            raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {name}: an incomplete checkpoint")


def _weight_names(directory: Path, meta: dict) -> list[str]:
    if meta["format"] == 1:
        return [WEIGHTS_NAME]
    names = sorted(meta["files"])
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not isinstance(meta["files"][n], dict)]
    if bad or not names:
        raise ValueError(f"{directory / META_NAME}: 'files' must map weight file names in the directory to their "
                         f"checksums, got {bad[:3] or 'none'}")
    return names


def _headers(snapshot: _Snapshot) -> dict:
    """``{key: (file name, TensorInfo)}`` over every weights file (headers only), checked against the
    dtypes and shapes recorded at save time (format 2)."""
    directory, meta = snapshot.directory, snapshot.meta
    out = {}
    for name in _weight_names(directory, meta):
        f = snapshot.safetensors(name)
        for key, info in f.tensors.items():
            if key in out:
                raise ValueError(f"{directory / name}: tensor {key!r} is also stored in {out[key][0]}")
            out[key] = (name, info)
    if meta["format"] >= 2:
        recorded = meta["tensors"]
        if set(recorded) != set(out):
            extra, missing = sorted(set(out) - set(recorded)), sorted(set(recorded) - set(out))
            raise ValueError(f"{directory}: the weights files do not hold the tensors {META_NAME} records "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        for key, (name, info) in out.items():
            want = recorded[key]
            got_dtype = str(info.dtype).replace("torch.", "")
            if (not isinstance(want, dict) or want.get("file") != name or want.get("dtype") != got_dtype
                    or list(want.get("shape", ())) != list(info.shape)):
                raise ValueError(f"{directory / name}: tensor {key!r} is stored as {got_dtype} {list(info.shape)}, "
                                 f"{META_NAME} records {want!r}; the checkpoint is corrupt")
    return out


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


def _verify_checksums(snapshot: _Snapshot, weights: bool) -> None:
    """The files under a checksum against the sha256 and size recorded at save time: with
    ``weights`` the weights files, else the others (config.json, the index, tokenizer and report,
    where the checkpoint records them; small, so checked before anything is built from them)."""
    import hashlib

    directory, meta = snapshot.directory, snapshot.meta
    recorded = meta["files"] if weights else meta.get(_OTHER_FILES, {})
    for name, want in sorted(recorded.items()):
        if not isinstance(want, dict):
            raise ValueError(f"{directory / META_NAME}: the checksum of {name!r} is not a dict")
        digest = hashlib.sha256()
        size = 0
        fd = snapshot.fds[name]
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


def inspect_checkpoint(path) -> dict:
    """A summary of a moei2 checkpoint without building the model (either layout).

    Returns ``path``, ``architecture``, ``family``, ``dtype``, ``format``, ``layers`` (per MoE layer:
    ``num_experts`` originally, ``kept`` original indices, ``num_kept``, ``ranks`` or ``None``),
    ``experts_kept`` and ``experts_total``, ``sizes`` (as returned by :func:`save`),
    ``num_tensors``, ``expert_shape`` (``[hidden, expert width]`` or None), ``files`` (name → bytes),
    ``has_tokenizer``, ``has_report``.
    """
    with _read_checkpoint(path) as snapshot:
        header = _headers(snapshot)
        files = {name: snapshot.size(name) for name in sorted(snapshot.fds)}
    directory, meta, config = snapshot.directory, snapshot.meta, snapshot.config
    record = config["moei2"]
    from .models import ADAPTERS

    adapter = ADAPTERS.get(meta["architecture"])
    width = config.get(adapter.expert_width_key if adapter else "moe_intermediate_size")
    hidden = config.get("hidden_size")
    layers = {}
    for key, entry in sorted(record.get("layers", {}).items(), key=lambda kv: int(kv[0])):
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
        "num_tensors": len(header) + len(meta["aliases"]),
        # The experts' shape, from the same snapshot's config.json (None where it does not say).
        "expert_shape": [hidden, width] if all(isinstance(v, int) for v in (hidden, width)) else None,
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


def _check_record_bounds(directory: Path, record: dict, config) -> None:
    """Refuses a record whose ranks or expert counts could not come from this configuration, before
    anything is allocated (an absurd rank would otherwise reach the allocator)."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 0) or 0)
    bound = max(hidden, inter)
    layers = record.get("layers")
    if not isinstance(layers, dict):
        return  # check_structure names this
    for i, entry in layers.items():
        if not isinstance(entry, dict):
            continue
        n = entry.get("num_experts")
        kept = entry.get("kept")
        if isinstance(n, int) and not 0 < n <= 1 << 16:
            raise ValueError(f"{directory / CONFIG_NAME}: moei2 record: layer {i} records {n} experts, not a "
                             "plausible expert count")
        if isinstance(kept, list) and isinstance(n, int) and len(kept) > n:
            raise ValueError(f"{directory / CONFIG_NAME}: moei2 record: layer {i} keeps {len(kept)} experts of {n}")
        ranks = entry.get("ranks")
        if isinstance(ranks, list) and bound:
            for j, triple in enumerate(ranks):
                if isinstance(triple, (list, tuple)):
                    for r in triple:
                        if isinstance(r, int) and not isinstance(r, bool) and r > bound:
                            raise ValueError(
                                f"{directory / CONFIG_NAME}: moei2 record: layer {i} expert {j} has rank {r}, above "
                                f"the largest the experts allow (max(hidden {hidden}, intermediate {inter}) = {bound})")


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
    with _read_checkpoint(path) as snapshot:
        model = _load_snapshot(snapshot, dtype, device, verify)
    return model


def load_with_tokenizer(path, *, dtype=None, device="cpu", verify: bool = True):
    """:func:`load`, and the tokenizer saved with the model, both from one snapshot of ``path``:
    ``(model, tokenizer)``, or ``(model, None)`` when the checkpoint holds no tokenizer. The
    tokenizer is read from the files the weights were read beside (under the same checksums), so a
    save replacing the checkpoint meanwhile cannot pair one checkpoint's model with another's
    tokenizer."""
    import tempfile

    from transformers import AutoTokenizer

    with _read_checkpoint(path) as snapshot:
        model = _load_snapshot(snapshot, dtype, device, verify)
        weights = set(snapshot.meta.get("files") or {})
        small = [name for name in snapshot.fds if name not in weights and not name.endswith(".safetensors")]
        if not any(name.startswith("tokenizer") for name in small):
            return model, None
        with tempfile.TemporaryDirectory(prefix="moei2-tokenizer-") as copy:
            for name in small:
                (Path(copy) / name).write_bytes(snapshot.read_bytes(name))
            tokenizer = AutoTokenizer.from_pretrained(copy, local_files_only=True)
    return model, tokenizer


def _load_snapshot(snapshot: _Snapshot, dtype, device, verify: bool):
    import torch

    from .models import ADAPTERS, apply_structure
    from .source import check_device, config_from_dict, meta_skeleton

    directory, meta, config_dict = snapshot.directory, snapshot.meta, snapshot.config
    architecture = meta["architecture"]
    if architecture not in ADAPTERS:
        raise ValueError(f"{directory / META_NAME}: architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(sorted(ADAPTERS))}")
    dtype = _resolve_dtype(dtype, meta["dtype"])
    device = check_device(device)  # a missing accelerator is refused before any tensor is read
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__}")

    if verify and meta["format"] >= 2:
        _verify_checksums(snapshot, weights=False)
    header = _headers(snapshot)
    model_class = ADAPTERS[architecture].model_class()
    config = config_from_dict(model_class, config_dict, directory / CONFIG_NAME)
    _check_record_bounds(directory, config_dict["moei2"], config)
    from transformers.initialization import no_init_weights

    # The layout is checked on a skeleton without storage, so a bad record costs no memory.
    skeleton = meta_skeleton(model_class, copy.deepcopy(config), dtype, directory / CONFIG_NAME)
    apply_structure(skeleton, config_dict["moei2"])
    expected = {k: (tuple(v.shape), v.is_floating_point()) for k, v in skeleton.state_dict().items()}
    del skeleton
    weights_desc = WEIGHTS_NAME if meta["format"] == 1 else "the weights files"
    aliases = meta["aliases"]
    stored = set(header)
    wanted = set(expected) - set(aliases)
    missing = sorted(wanted - stored)
    unexpected = sorted(stored - wanted)
    if missing or unexpected:
        raise ValueError(f"{directory / weights_desc} does not match the recorded layout: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(wanted):
        name, info = header[key]
        check_stored_tensor(directory / name, key, info, *expected[key], layout="the recorded layout")
    bad_alias = [a for a, src in aliases.items() if a not in expected or src not in stored]
    if bad_alias:
        raise ValueError(f"{directory / META_NAME}: tied-tensor aliases {bad_alias[:5]} do not match the model")
    if verify and meta["format"] >= 2:
        _verify_checksums(snapshot, weights=True)

    with no_init_weights():
        model = model_class._from_config(config, dtype=dtype)
    # no_init_weights also skips the tying that init_weights does.
    model.tie_weights()
    apply_structure(model, config_dict["moei2"])
    state = {}
    for name in _weight_names(directory, meta):
        f = snapshot.safetensors(name)
        with f.reader() as read:
            for key in f.tensors:
                tensor = read(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{directory / name}: tensor {key!r} contains NaN or infinite values; "
                                     "the checkpoint is corrupt")
                state[key] = tensor
    for alias, source in aliases.items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True)
    del state
    model.config.moei2 = config_dict["moei2"]
    return model.to(device).eval()
