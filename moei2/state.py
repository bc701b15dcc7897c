"""Resumable run state: what each finished stage and layer produced, written atomically, and a
lock so that two runs never share a work directory."""
from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import json
import os
import tempfile
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

STATE_FILE = "moei2_state.json"
LOCK_FILE = ".moei2.lock"
_ARRAYS = "arrays"  # state key: {side file name: its sha256}
_OWNER = "__moei2_owner__"  # inside each side file: "<name> <fingerprint>"


class ResumeError(ValueError):
    """The work directory belongs to a different run (other config, model or data)."""


class WorkDirBusy(ResumeError):
    """Another run (this process or another) is using the work directory now."""


class RunState:
    """A JSON document of finished work, kept in ``work_dir`` so an interrupted run can resume.

    Every update rewrites the file through a temporary file and ``os.replace``, so a crash leaves
    either the previous state or the new one, never a torn file. Large arrays (low-rank factors)
    go to ``.npz`` side files written the same way; each records its name and the run it belongs
    to, and the state records its sha256, so a side file that was damaged, copied over another
    or left by another run is recomputed, never used. The work directory is locked
    (``flock`` on ``.moei2.lock``) while the state lives: a second run on it fails at once with
    :class:`WorkDirBusy`. :meth:`close` releases the lock (so does garbage collection).
    """

    def __init__(self, work_dir: Optional[os.PathLike], fingerprint: str):
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.fingerprint = fingerprint
        self.data: dict[str, Any] = {"fingerprint": fingerprint}
        self._lock = None
        if self.work_dir is None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_work_dir(self.work_dir)
        self._unlock = weakref.finalize(self, os.close, self._lock)
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        fingerprint = self.fingerprint
        path = self.work_dir / STATE_FILE
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ResumeError(f"work_dir {self.work_dir}: unreadable {STATE_FILE}: {exc}") from exc
            found = stored.get("fingerprint") if isinstance(stored, dict) else None
            if found != fingerprint:
                raise ResumeError(
                    f"work_dir {self.work_dir} holds a run with different settings, model or calibration "
                    f"data (fingerprint {found} != {fingerprint}); use another directory or delete it"
                )
            self.data = stored

    def close(self) -> None:
        """Releases the work directory's lock; the state is not used after this."""
        if self._lock is not None:
            self._unlock()
            self._lock = None

    @property
    def resumed(self) -> bool:
        return len(self.data) > 1

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self._flush()

    def _flush(self) -> None:
        if self.work_dir is None:
            return
        _atomic_write_text(self.work_dir / STATE_FILE, json.dumps(self.data, indent=1, default=_jsonable))

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        if self.work_dir is None:
            return
        path = self.work_dir / f"{name}.npz"
        fd, tmp = tempfile.mkstemp(dir=self.work_dir, suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays, **{_OWNER: np.array(f"{name} {self.fingerprint}")})
            digest = _sha256(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        # Recorded after the file is in place: a crash between the two leaves a file without a
        # record, which is recomputed.
        self.data.setdefault(_ARRAYS, {})[name] = digest
        self._flush()

    def load_arrays(self, name: str) -> Optional[dict[str, np.ndarray]]:
        """The arrays saved under ``name``; None (recompute them) when there are none, or when the
        file is not the one this run recorded (damaged, copied from another layer or run)."""
        if self.work_dir is None:
            return None
        path = self.work_dir / f"{name}.npz"
        if not path.exists():
            return None
        recorded = self.data.get(_ARRAYS, {}).get(name)
        reason = None
        if recorded is None:
            reason = "no checksum recorded for it"
        elif _sha256(path) != recorded:
            reason = "its checksum differs from the one recorded"
        else:
            try:
                with np.load(path) as data:
                    arrays = {k: data[k] for k in data.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                arrays, reason = None, f"unreadable ({exc})"
            if arrays is not None and str(arrays.pop(_OWNER, "")) != f"{name} {self.fingerprint}":
                reason = "it belongs to another layer or run"
        if reason is not None:
            warnings.warn(f"work_dir {self.work_dir}: {path.name} is not used ({reason}); recomputing it",
                          stacklevel=2)
            return None
        return arrays


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _lock_work_dir(work_dir: Path) -> int:
    """An exclusive ``flock`` on the work directory's lock file, taken without waiting."""
    fd = os.open(work_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    for attempt in range(2):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if attempt == 0:
            gc.collect()  # a state of a failed run in this process may still hold it, unreachable
    os.close(fd)
    raise WorkDirBusy(f"work_dir {work_dir} is in use by another run (it holds the lock {LOCK_FILE}); wait for "
                      "it to finish or use another directory")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    raise TypeError(f"cannot store {type(value).__name__} in the run state")
