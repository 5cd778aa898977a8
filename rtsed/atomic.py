"""Output files written whole or not at all, and output paths checked before any work.

``write_atomically(path, write)`` writes into a temporary file in the destination's folder,
flushes and fsyncs it, then renames it over ``path`` (``os.replace``, atomic on POSIX within one
file system): a reader, a full disk or a killed process sees the old file or the complete new
one, never a file cut mid-line. ``check_writable(path)`` finds a missing folder, a folder given
as a file name, or a read-only or full destination up front, so that a command can refuse before
it computes anything.

Both raise OutputError, whose message names the path, the problem and the fix.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


class OutputError(OSError):
    """An output file that cannot be written; the message names the path, the problem and the fix."""


_REASONS = {
    errno.ENOSPC: "the disk is full (no space left on device): free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write elsewhere",
    errno.EROFS: "it is on a read-only file system: choose a folder on a writable disk",
    errno.EACCES: "permission denied: choose a folder you may write to, or change its permissions",
    errno.EPERM: "permission denied: choose a folder you may write to, or change its permissions",
}


def os_error_reason(exc: OSError) -> str:
    """What an OSError of a write means for the user, and the fix (a full disk, a read-only one, ...)."""
    return _REASONS.get(exc.errno, f"{exc.strerror or exc}: choose another path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` if a file can be created there (its folder exists and takes a new file), else
    OutputError. Creates and removes one empty temporary file in the folder."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder: give a file name in it, e.g. {path / 'events.tsv'}")
    if not folder.exists():
        raise OutputError(f"{what} {path}: the folder {folder} does not exist: create it "
                          f"(mkdir -p {folder}) or choose another path")
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: {folder} is a file, not a folder: choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot write in {folder}: {os_error_reason(exc)}") from None
    os.close(fd)
    os.unlink(tmp)
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False,
                     what: str = "output") -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename it over ``path``.

    On any failure (a full disk, a read-only folder, an error inside ``write``) the temporary
    file is removed and ``path`` is left as it was; OSErrors become OutputError naming the path
    and the fix, other exceptions propagate unchanged. The file gets the permissions a plain
    ``open`` would give it (mkstemp's are 0600).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        raise OutputError(f"{what} {path}: the folder {path.parent} does not exist: create it "
                          f"(mkdir -p {path.parent}) or choose another path") from None
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot write in {path.parent}: {os_error_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"{what} {path}: writing failed, so it was left as it was (no partial file): "
                              f"{os_error_reason(exc)}") from None
        raise
    return path


def lock_temporary(fd: int) -> None:
    """Mark a temporary file as being written by a live process (an exclusive ``flock`` on its
    descriptor, released by the kernel when the process dies), so that
    ``remove_stale_temporaries`` leaves it alone. A no-op where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX: only the age guard protects a writer
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporary files matching ``pattern`` (a glob) in ``folder`` that a killed
    writer left behind -> the paths removed.

    A file is left alone while it is younger than ``min_age_s`` (a writer that has created it
    but not yet locked it) or while a live process holds its ``lock_temporary`` lock (another
    run sharing the folder, mid-write). Files that vanish meanwhile are skipped."""
    import time

    try:
        import fcntl
    except ImportError:
        fcntl = None
    removed = []
    now = time.time()
    for path in sorted(Path(folder).glob(pattern)):
        try:
            if now - path.stat().st_mtime < min_age_s:
                continue
            with open(path, "rb") as f:
                if fcntl is not None:
                    try:
                        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer holds it
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed
