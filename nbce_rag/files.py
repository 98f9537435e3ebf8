"""Atomic persistence helpers: JSON + safetensors/npy, never pickle; temp file then rename."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger(__name__)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; on failure the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: PathLike, obj: Any) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")

    atomic_write(path, _w)


def read_json(path: PathLike) -> Any:
    from nbce_rag.errors import CorruptFileError

    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CorruptFileError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); the file is damaged or truncated") from None


# ---------------------------------------------------------------------- inter-process lock

#: locks this process holds: real path -> (owning thread id, depth), so a thread may nest them
_HELD: Dict[str, Tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file ``fd`` without waiting; False if another holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


#: errors of a file system that cannot lock at all (some network file systems)
_NO_LOCKING = {getattr(errno, n) for n in ("ENOLCK", "EOPNOTSUPP", "ENOSYS", "ENOTSUP") if hasattr(errno, n)}


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def file_lock(path: PathLike, *, timeout: Optional[float], what: str = "") -> Iterator[None]:
    """Hold an exclusive inter-process lock on the file ``path`` (created if missing, never
    deleted, never written) for the ``with`` block.

    ``flock`` locks belong to the open file, so they also exclude other threads of this
    process, and the kernel releases them when the holder dies: a killed writer never leaves
    a stale lock. The same thread may nest the lock. Waits up to ``timeout`` seconds (``None``
    = forever) and then raises :class:`~nbce_rag.errors.LockTimeoutError` naming ``what``.
    """
    from nbce_rag.errors import ConfigError, LockTimeoutError

    if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
        raise ConfigError(f"lock_timeout must be a number of seconds >= 0 or None, got {timeout!r}")
    key = os.path.realpath(path)
    me = threading.get_ident()
    with _HELD_GUARD:
        owner = _HELD.get(key)
        if owner is not None and owner[0] == me:
            _HELD[key] = (me, owner[1] + 1)
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _HELD_GUARD:
                t, depth = _HELD[key]
                _HELD[key] = (t, depth - 1)
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                if _try_lock(fd):
                    break
            except OSError as e:
                if e.errno not in _NO_LOCKING:
                    raise
                logger.warning("cannot lock %s (%s): this file system has no file locks, so concurrent "
                               "writers are not serialised", key, e.strerror or e)
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"{what or key} is locked by another writer (lock file {key}) and was not released "
                    f"within {timeout:g} s; wait for the other save to finish, or pass a longer lock_timeout"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        with _HELD_GUARD:
            _HELD[key] = (me, 1)
        try:
            yield
        finally:
            with _HELD_GUARD:
                del _HELD[key]
            try:
                _unlock(fd)
            except OSError:  # no locking on this file system (warned above); closing releases anyway
                pass
    finally:
        os.close(fd)
