"""Every file lmforge writes goes through here: written whole or not at all.

`write_atomic` writes to a temporary name beside the target, fsyncs it, renames it over the target
and fsyncs the folder, so a reader (or a resumed run after a power cut) sees the old file or the new
one, never half of either. Temporary names share one pattern (`.NAME.tmp-PID`), so that a run can
clean up what a killed one left (`remove_stale_temporaries`) without touching anything else.

A failed write raises `DiskError`: one line naming the file and what the system said (disk full,
read-only, no permission, ...). The CLI prints it and exits with status 2.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lmforge.errors import UserError

TEMP_SUFFIX = ".tmp-"
# ".NAME.tmp-PID" (files) and ".NAME.tmp-PID-<random>" (staging folders of prepare/export).
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-\w+)?$")

# What a user can do about each errno a write may hit.
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full: free space, then run the command again",
    errno.EDQUOT: "the disk quota is used up: free space, then run the command again",
    errno.EFBIG: "the file is larger than this file system or limit allows",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: fix the folder's permissions or choose another",
    errno.EPERM: "operation not permitted: fix the folder's permissions or choose another",
    errno.EIO: "an input/output error from the disk: check the disk, then run again",
}


class DiskError(UserError):
    """A write (or read) the system refused: disk full, read-only, no permission, I/O error."""


def disk_error(path: str | Path, error: OSError, doing: str = "write") -> DiskError:
    """The one-line error for an OSError on `path`."""
    what = DISK_ERRNOS.get(error.errno or 0)
    if what is None and error.errno is None and _nearly_full(Path(path)):
        what = DISK_ERRNOS[errno.ENOSPC]  # a write that stopped short: the disk filled up
    return DiskError(f"could not {doing} {path}: {what or error.strerror or error}")


def _nearly_full(path: Path) -> bool:
    import shutil

    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free < (1 << 20)
            except OSError:
                return False
    return False


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_SUFFIX}{os.getpid()}")


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in `directory` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(
    path: str | Path, data: str | bytes | Callable[[IO[Any]], None], *, binary: bool | None = None
) -> Path:
    """Write `data` (text, bytes, or a function given the open file) to `path` atomically."""
    path = Path(path)
    if binary is None:
        binary = not isinstance(data, str)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        _unlink_quietly(tmp)
        raise disk_error(path, e) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    import json

    return write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(*folders: str | Path) -> list[Path]:
    """Delete the temporary files and staging folders a killed lmforge left in `folders`.

    Only names of this module's pattern whose process is gone are touched; nothing else is.
    """
    import shutil

    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = TEMP_NAME.match(entry.name)
            if not match or _pid_alive(int(match.group("pid"))):
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
            except OSError:
                continue
    return removed
