"""Safetensors files read without memory maps.

A held memory map keeps every page it touched in the process's resident set, and a long run
touches a whole checkpoint; positioned reads into fresh tensors leave only the page cache, which
the kernel drops under pressure. Every header is checked before a byte of data is trusted: the
offsets lie inside the file, each size matches dtype x shape, and the tensors tile the data area
without gaps or overlaps.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

__all__ = ["SafetensorsFile", "TensorInfo", "SAFETENSORS_DTYPES", "SAFETENSORS_CODES"]

SAFETENSORS_DTYPES = {  # the format's dtype codes -> torch dtype names
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
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
                name = SAFETENSORS_DTYPES[entry["dtype"]]
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
