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

import hashlib
import linecache
import types
from pathlib import Path

import torch

from fxpress.core import cache_folder

_WITHOUT = "generated wrappers run from memory without a copy on disk"


def _keep_copy(folder: Path, name: str, source: bytes) -> Path | None:
    path = folder / f"{name}.py"
    try:
        if not (path.is_file() and not path.is_symlink() and path.read_bytes() == source):
            cache_folder.write_atomically(path, source)
        return path
    except OSError as e:
        cache_folder.warn_once(f"cannot write to the cache folder {folder} ({e.strerror or e}); {_WITHOUT}")
        return None


def load_module(source: str, names: dict[str, object]) -> types.ModuleType:
    """Run ``source`` as a new module, with ``names`` defined first. Its file name, for tracebacks
    and ``inspect``, is its readable copy in the cache folder, or a name of its own without one."""
    name = f"w{hashlib.sha256(source.encode()).hexdigest()[:20]}"
    folder = cache_folder.folder("wrappers", _WITHOUT)
    path = _keep_copy(folder, name, source.encode()) if folder is not None else None
    filename = str(path) if path is not None else f"<fxpress wrapper {name}>"
    # mtime None: linecache keeps this entry and never re-reads the file behind it.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    module.__dict__.update(names)
    # Module-level statements (views of constants) run on the real constants, though a compile
    # may load the wrapper inside the tracer's fake mode.
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        exec(compile(source, filename, "exec"), module.__dict__)
    return module


def load_wrapper(source: str, constants: dict[str, object], kv_handles: dict[int, int] | None = None
                 ) -> types.ModuleType:
    """Run a wrapper module from its source. ``kv_handles`` maps the KV-site handles written in its
    source to the sites of this process (a loaded artifact's)."""
    return load_module(source, {"CONSTANTS": constants, "KV_HANDLES": kv_handles or {}})
