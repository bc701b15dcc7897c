"""Replacing a directory in one atomic step, and cleaning up after a writer that was killed.

A writer fills a staging directory next to its target (``.<name>.moei2-tmp-<pid>-<start>-<random>``)
and swaps it in with ``renameat2(RENAME_EXCHANGE)`` where something is already there (a plain
rename otherwise), then removes what it replaced. On filesystems that refuse the exchange, two
renames are used, and a crash between them leaves the previous directory under a backup name
(``.<name>.moei2-old-...``) that :func:`recover` puts back. Staging and backup names carry the
owner's pid and start time, so the leftovers of dead processes are told from those of a save
running now.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Optional

__all__ = ["staged_directory", "prepare_parent", "new_staging", "replace_dir", "recover", "fsync_dir"]

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


def recover(target: Path) -> None:
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
        if not os.path.lexists(target) and (backup / "config.json").is_file():
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


def fsync_dir(path: Path) -> None:
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


def replace_dir(staging: Path, target: Path) -> None:
    """Puts ``staging`` at ``target`` in one atomic step and removes what was there before."""
    if os.path.lexists(target):
        if _renameat2_exchange(staging, target):
            fsync_dir(target.parent)
            shutil.rmtree(staging, ignore_errors=True)  # now the previous checkpoint
            return
        # Fallback: two renames. A crash between them leaves the previous checkpoint under the
        # backup name, which recover (run by the next save and by load) puts back.
        backup = target.parent / f".{target.name}.{_OLD_TAG}-{_owner_tag()}-{os.urandom(4).hex()}"
        os.rename(target, backup)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(backup, target)
            raise
        fsync_dir(target.parent)
        shutil.rmtree(backup, ignore_errors=True)
        return
    os.rename(staging, target)
    fsync_dir(target.parent)


def prepare_parent(target: Path) -> None:
    """Creates ``target``'s parent directory and repairs what a killed writer left beside ``target``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"output path {str(target)!r}: cannot create its parent directory "
                              f"({exc.strerror or exc})") from None
    recover(target)


def new_staging(target: Path) -> Path:
    """A new, empty staging directory next to ``target`` (the umask applies, as for
    ``save_pretrained``'s directories)."""
    staging = target.parent / f".{target.name}.{_STAGING_TAG}-{_owner_tag()}-{os.urandom(4).hex()}"
    try:
        os.mkdir(staging, 0o777)
    except OSError as exc:
        raise PermissionError(f"output path {str(target)!r}: its parent directory {str(target.parent)!r} is not "
                              f"writable ({exc.strerror or exc})") from None
    return staging


@contextlib.contextmanager
def staged_directory(target: Path):
    """Yields an empty staging directory next to ``target`` that is put at ``target`` in one atomic
    step (replacing what is there) when the block ends normally, and removed on any exception.
    The caller has checked that ``target`` may be replaced."""
    target = Path(target).absolute()
    prepare_parent(target)
    staging = new_staging(target)
    try:
        yield staging
        for file in staging.iterdir():
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(staging)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
