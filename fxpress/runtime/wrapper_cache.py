"""Generated wrapper modules: run from the source fxpress generated, never from a file it finds.

A wrapper runs from the source string in memory. A copy is kept under
``FXPRESS_CACHE_DIR/wrappers/w<sha256 of the source>.py`` so that tracebacks, debuggers and readers
have a file to show; Python's ``linecache`` is primed with the same source, so what ``inspect``
(and Triton, which reads kernel source through it) sees is what runs, whatever the file holds.

The copy is written only into a folder that is safe to keep it in: owned by this user and not
writable by group or others (as ssh and pip require of theirs). A copy that differs from the
source (planted, corrupted, cut short) is rewritten. Writes go to a unique temporary name and are
renamed into place, so processes writing the same wrapper never meet. When the folder is unsafe,
unwritable or full, the wrapper runs from memory alone, with one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import stat
import tempfile
import types
import warnings
from pathlib import Path

from fxpress.core import flags


class CacheFolderWarning(UserWarning):
    """The wrapper cache folder cannot be used; generated wrappers run from memory only."""


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"fxpress: {message}; generated wrappers run from memory without a copy on disk",
                      CacheFolderWarning, stacklevel=4)


def unsafe_reason(folder: Path) -> str | None:
    """Why ``folder`` may not hold code fxpress reads back, or None when it may."""
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a plain folder"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{folder} is owned by another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{folder} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _folder() -> Path | None:
    root = Path(flags.CACHE_DIR.get())
    folder = root / "wrappers"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        reason = unsafe_reason(root) or unsafe_reason(folder)
    except OSError as e:
        _warn_once(f"cache folder {folder} cannot be made ({e.strerror or e})")
        return None
    if reason is not None:
        _warn_once(f"refusing the cache folder: {reason}")
        return None
    return folder


def _keep_copy(folder: Path, name: str, source: bytes) -> Path | None:
    path = folder / f"{name}.py"
    try:
        if not (path.is_file() and not path.is_symlink() and path.read_bytes() == source):
            _write_atomically(path, source)
        return path
    except OSError as e:
        _warn_once(f"cannot write to the cache folder {folder} ({e.strerror or e})")
        return None


def _write_atomically(path: Path, data: bytes) -> None:
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


def load_module(source: str, names: dict[str, object]) -> types.ModuleType:
    """Run ``source`` as a new module, with ``names`` defined first. Its file name, for tracebacks
    and ``inspect``, is its readable copy in the cache folder, or a name of its own without one."""
    name = f"w{hashlib.sha256(source.encode()).hexdigest()[:20]}"
    folder = _folder()
    path = _keep_copy(folder, name, source.encode()) if folder is not None else None
    filename = str(path) if path is not None else f"<fxpress wrapper {name}>"
    # mtime None: linecache keeps this entry and never re-reads the file behind it.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    module.__dict__.update(names)
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def load_wrapper(source: str, constants: dict[str, object], kv_handles: dict[int, int] | None = None
                 ) -> types.ModuleType:
    """Run a wrapper module from its source. ``kv_handles`` maps the KV-site handles written in its
    source to the sites of this process (a loaded artifact's)."""
    return load_module(source, {"CONSTANTS": constants, "KV_HANDLES": kv_handles or {}})
