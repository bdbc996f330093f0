"""Files that are never half-written, and locks between processes: the one place for both.

- :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_file`: a temporary file
  beside the target, written, fsynced and renamed over it (``os.replace``), then the folder fsynced. A reader
  sees the old content or the new one, never a mix, even after a crash.
- :func:`atomic_folder`: a temporary folder beside the target to fill; when the block ends
  without an error every file and folder in it is fsynced and it is renamed into place. An
  existing target is swapped with the new folder in one step (Linux ``renameat2`` with
  ``RENAME_EXCHANGE``), so a reader sees the old folder or the new one at every instant; where
  the file system cannot swap, the old one is renamed aside and the new one renamed in (put
  back if that fails). After an error the temporary folder is removed and the target is untouched.
- Temporary names carry the writer's pid and host (``.NAME.tmp-PID@HOST-xxxx``,
  ``.NAME.old-PID@HOST-xxxx``): the next write of the same target removes those of a writer
  that died (SIGKILL, power loss), and puts back an old folder a dead writer had moved aside
  without putting the new one in place (:func:`clean_stale`).
- :func:`file_lock`: an exclusive lock on a file (the ``filelock`` library), shared by every
  process on the machine (and by machines on a shared file system that honours ``flock``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_file",
    "atomic_folder",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale",
    "crash_point",
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


# -- a test hook: die at a named point ---------------------------------------------------------
CRASH_ENV = "MODELPRESS_TEST_CRASH_AT"
CRASH_PAUSE_ENV = "MODELPRESS_TEST_CRASH_PAUSE"
CRASH_MARK_ENV = "MODELPRESS_TEST_CRASH_MARK"


def crash_point(name: str) -> None:
    """A test hook for fault runs: die (SIGKILL) or pause at a named point.

    Only when ``MODELPRESS_TEST_CRASH_AT`` names this point. With ``MODELPRESS_TEST_CRASH_PAUSE``
    set to a file path, the point's name is written there and the process sleeps until a test
    kills it from outside; with ``MODELPRESS_TEST_CRASH_MARK`` set to a file path, the name is
    written there and the process goes on (a test kills it a moment later, in the middle of
    whatever follows); otherwise it kills itself. Points:
    the registry's (``during_copy``, ``after_copy``, ``after_rename``, ``before_commit``,
    ``after_commit``), ``folder-filled:NAME`` / ``folder-placed:NAME`` (:func:`atomic_folder`
    of a folder called NAME, before and after it is renamed into place) and the tuner's
    ``tune-artifact`` / ``tune-point`` (a candidate's artifact written / its result cached).
    """
    if os.environ.get(CRASH_ENV) != name:
        return
    if os.environ.get(CRASH_MARK_ENV):
        Path(os.environ[CRASH_MARK_ENV]).write_text(name)
        return
    marker = os.environ.get(CRASH_PAUSE_ENV)
    if marker:
        Path(marker).write_text(name)
        while True:  # pragma: no cover - ended by the test's SIGKILL
            time.sleep(60)
    os.kill(os.getpid(), signal.SIGKILL)  # pragma: no cover


_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically
_AT_FDCWD = -100
_STALE_RE = re.compile(r"\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9]*)-")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _tag() -> str:
    """The pid and host a temporary name carries, so a later writer can tell whether its owner died."""
    return f"{os.getpid()}@{_host()}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (both must exist); False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - a libc without renameat2 (glibc < 2.28, musl)
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # pragma: no cover - the file system cannot swap
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders a dead writer left beside ``target``; returns what was removed.

    Only names of this host whose pid is no longer alive count. A ``.old-`` folder left while
    ``target`` is missing (the writer died between its two renames) is renamed back to ``target``.
    """
    target = Path(target)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return removed
    prefix = f".{target.name}."
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        m = _STALE_RE.match(e.name, len(prefix) - 1)
        if m is None or m.group("host") != _host() or _pid_alive(int(m.group("pid"))):
            continue
        path = Path(e.path)
        try:
            if m.group("kind") == "old" and not (target.exists() or target.is_symlink()):
                os.rename(path, target)
                fsync_dir(target.parent)
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another writer cleaned it first
            continue
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside ``path`` to write (by any means); fsynced and renamed over ``path`` when the block succeeds.

    The parent folder is created. On an error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_tag()}-", suffix=path.suffix, dir=path.parent)  # a tool may read the suffix
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

    An existing ``target`` is swapped with ``tmp`` in one step where the file system can
    (``renameat2(RENAME_EXCHANGE)``), so ``target`` is the old folder or the new one at every
    instant; then the old one (now at ``tmp``) is deleted. Elsewhere the old ``target`` is
    renamed aside first and deleted once the new one is in place; if the second rename fails it
    is renamed back, so ``target`` ends up the old folder or the new one.
    """
    tmp, target = Path(tmp), Path(target)
    if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
        fsync_dir(target.parent)
        trash = target.parent / f".{target.name}.old-{_tag()}-{secrets.token_hex(4)}"
        os.rename(tmp, trash)  # the old folder, under a name the next write removes if this process dies now
        shutil.rmtree(trash, ignore_errors=True)
        return target
    if target.exists() or target.is_symlink():
        aside = target.parent / f".{target.name}.old-{_tag()}-{secrets.token_hex(4)}"
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        fsync_dir(target.parent)
        shutil.rmtree(aside, ignore_errors=True)
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
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_tag()}-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        crash_point(f"folder-filled:{target.name}")
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    crash_point(f"folder-placed:{target.name}")


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
