"""A checkpoint directory opened once: every file read through handles taken before any is parsed.

Readers of a moei2 checkpoint go through a :class:`Snapshot`, so that a save replacing the
checkpoint while it is read gives the old or the new one, never a mix.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .safetensors_file import SafetensorsFile

__all__ = ["Snapshot", "open_snapshot"]


class Snapshot:
    """One checkpoint directory, opened once: every regular file in it is opened, relative to the
    directory's handle, before anything is parsed, and all reading goes through those handles.

    A save replaces a checkpoint by swapping a complete new directory in and then removing the old
    one (:func:`moei2.atomic_dir.replace_dir`); a published directory is never changed in place. So once every file
    is open and the path still names the directory opened, what is read is that one checkpoint,
    even if a save replaces it meanwhile (removed files stay readable through open handles).
    :func:`open_snapshot` retries when a swap falls inside the opening.
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

    def safetensors(self, name: str) -> "SafetensorsFile":
        return SafetensorsFile(self.directory / name, fd=self.fds[name])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SNAPSHOT_TRIES = 50


def open_snapshot(directory: Path) -> Snapshot:
    """A :class:`Snapshot` of ``directory`` taken while no save swapped it (retried otherwise)."""
    for _ in range(_SNAPSHOT_TRIES):
        try:
            snapshot = Snapshot(directory)
        except FileNotFoundError:
            continue  # the directory itself was swapped out and removed between lookup and open
        if snapshot.current():
            return snapshot
        snapshot.close()
    raise OSError(f"checkpoint {str(directory)!r} was replaced {_SNAPSHOT_TRIES} times while being opened; "
                  "a save is rewriting it in a loop")
