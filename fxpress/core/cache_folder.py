"""Folders under ``FXPRESS_CACHE_DIR`` that fxpress reads code back from (wrapper copies, compiled
C++ libraries), and the rules that make them safe to read.

A folder may hold such files only when it is owned by this user and not writable by group or
others (as ssh and pip require of theirs). Files are written under a unique temporary name and
renamed into place, so processes writing the same file never meet and a reader sees the old file
or the new one, never half of one. When a folder is unsafe, unwritable or full, ``folder`` warns
once and returns None: the caller then works without a copy on disk.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from pathlib import Path

from fxpress.core import flags


class CacheFolderWarning(UserWarning):
    """A cache folder cannot be used; what it would hold is kept in memory (or rebuilt) instead."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"fxpress: {message}", CacheFolderWarning, stacklevel=4)


def unsafe_reason(path: Path, *, folder: bool = True) -> str | None:
    """Why ``path`` may not hold (or be) code fxpress reads back, or None when it may."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not (stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)):
        return f"{path} is not a plain {'folder' if folder else 'file'}"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{path} is owned by another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def folder(name: str, without: str) -> Path | None:
    """``FXPRESS_CACHE_DIR/<name>``, made if missing, or None (after one warning saying that
    ``without`` happens instead) when it cannot be made or is unsafe."""
    root = Path(flags.CACHE_DIR.get())
    path = root / name
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        reason = unsafe_reason(root) or unsafe_reason(path)
    except OSError as e:
        warn_once(f"cache folder {path} cannot be made ({e.strerror or e}); {without}")
        return None
    if reason is not None:
        warn_once(f"refusing the cache folder: {reason}; {without}")
        return None
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """A unique temporary file renamed into place: a concurrent reader sees the old file or the new."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
