"""Files that are never half-written, and locks between processes: the one place for both.

- :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_file`: a temporary file
  beside the target, written, fsynced and renamed over it (``os.replace``), then the folder fsynced. A reader
  sees the old content or the new one, never a mix, even after a crash.
- :func:`atomic_folder`: a temporary folder beside the target to fill; when the block ends
  without an error every file and folder in it is fsynced and it is renamed into place. An
  existing target is moved aside first and removed only once the new folder is in place (put
  back if that rename fails); after an error the temporary folder is removed and the target
  is untouched.
- :func:`file_lock`: an exclusive lock on a file (the ``filelock`` library), shared by every
  process on the machine (and by machines on a shared file system that honours ``flock``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_file",
    "atomic_folder",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_lock",
    "fsync_dir",
    "fsync_tree",
    "replace_folder",
]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it, a new file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on a folder
        return
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder``, then every folder (deepest first), to disk."""
    root = Path(folder)
    dirs = []
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            dirs.append(path)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside ``path`` to write (by any means); fsynced and renamed over ``path`` when the block succeeds.

    The parent folder is created. On an error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)  # a tool may read the suffix
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsynced temporary file renamed over it (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def replace_folder(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the complete folder ``tmp`` to ``target`` (same file system), replacing a folder there.

    The old ``target`` is renamed aside first and deleted once the new one is in place; if the
    second rename fails it is renamed back, so ``target`` ends up the old folder or the new one.
    """
    tmp, target = Path(tmp), Path(target)
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        aside = old / target.name
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            shutil.rmtree(old, ignore_errors=True)
            raise
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
        fsync_dir(target.parent)
    return target


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``target`` to fill; renamed to ``target`` (fsynced) when the block succeeds.

    An existing ``target`` is replaced (see :func:`replace_folder`): check for it before, if
    replacing is not wanted. On an error the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created with its folder if missing) for the block.

    Waits for another holder to release it (``timeout`` seconds at most, -1: no limit; then
    ``filelock.Timeout``). A lock held by a process that died is released by the kernel.
    """
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, timeout=timeout):
        yield
