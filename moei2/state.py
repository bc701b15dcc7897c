"""Resumable run state: what each finished stage and layer produced, written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

STATE_FILE = "moei2_state.json"


class ResumeError(ValueError):
    """The work directory belongs to a different run (other config, model or data)."""


class RunState:
    """A JSON document of finished work, kept in ``work_dir`` so an interrupted run can resume.

    Every update rewrites the file through a temporary file and ``os.replace``, so a crash leaves
    either the previous state or the new one, never a torn file. Large arrays (low-rank factors)
    go to ``.npz`` side files written the same way.
    """

    def __init__(self, work_dir: Optional[os.PathLike], fingerprint: str):
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.fingerprint = fingerprint
        self.data: dict[str, Any] = {"fingerprint": fingerprint}
        if self.work_dir is None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / STATE_FILE
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ResumeError(f"work_dir {self.work_dir}: unreadable {STATE_FILE}: {exc}") from exc
            if stored.get("fingerprint") != fingerprint:
                raise ResumeError(
                    f"work_dir {self.work_dir} holds a run with different settings, model or calibration "
                    f"data (fingerprint {stored.get('fingerprint')} != {fingerprint}); use another "
                    "directory or delete it"
                )
            self.data = stored

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
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_arrays(self, name: str) -> Optional[dict[str, np.ndarray]]:
        if self.work_dir is None:
            return None
        path = self.work_dir / f"{name}.npz"
        if not path.exists():
            return None
        with np.load(path) as data:
            return {k: data[k] for k in data.files}


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
