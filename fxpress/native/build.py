"""Build C++ kernel sources into shared libraries once, and load them with ctypes.

A library is keyed by the SHA-256 of its source, the compiler's flags and version, and the
instruction-set macros ``-march=native`` defines here, so a cache shared between machines never
hands one a library built for another's CPU. Libraries are kept under
``FXPRESS_CACHE_DIR/native/<name>-<key>.so`` with the same rules as generated wrappers
(``fxpress.core.cache_folder``): the folder is this user's and writable by no one else, and a
library is loaded back only when it is a plain file of this user's whose SHA-256 matches the one
recorded when it was built; anything else is rebuilt. Without a usable folder, libraries are built
into a private temporary folder and loaded from there, every process anew.

The compiler is ``FXPRESS_CXX`` (default ``g++``). ``compiler_refusal()`` says why it cannot build
(missing, failing, no OpenMP), which ``target="auto"`` shows when it falls back to the cpu target.
Kernels are plain ``extern "C"`` functions over raw pointers, so nothing here includes torch's
headers, and a build takes under a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fxpress.core import cache_folder, flags
from fxpress.core.errors import FxpressError

# -ffp-contract=off: no fused multiply-adds the source did not write, so float results do not
# depend on which instructions the compiler picked (integer kernels' float64 constants stay exact).
# -fno-trapping-math: floating-point exceptions are masked, so the compiler may compute both sides
# of a choice (a division on one side of a `?:`), which loops with choices need to vectorise; every
# operation still rounds as written.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off",
         "-fno-trapping-math")
BUILD_SECONDS = 300
_WITHOUT = "C++ kernels are rebuilt in every process"
_PROBE = 'extern "C" int fxpress_probe(int n) { int s = 0;\n#pragma omp parallel for reduction(+:s)\n' \
         'for (int i = 0; i < n; ++i) s += i; return s; }\n'


class NativeBuildError(FxpressError, RuntimeError):
    """The C++ compiler is missing or failed on a kernel source."""


@dataclass(frozen=True)
class Toolchain:
    compiler: str  # the resolved path
    identity: str  # version line and the -march=native macros: part of every library's key


@functools.lru_cache(maxsize=None)
def _toolchain(name: str) -> Toolchain:
    path = shutil.which(name)
    if path is None:
        raise NativeBuildError(f"the C++ compiler {name!r} (FXPRESS_CXX) is not found")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True)
        macros = subprocess.run([path, "-march=native", "-dM", "-E", "-x", "c++", "-"], input="",
                                capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"the C++ compiler {path} (FXPRESS_CXX) does not run: {e}") from None
    identity = version.stdout.splitlines()[0] + "\n" + "\n".join(sorted(macros.stdout.splitlines()))
    return Toolchain(path, identity)


def toolchain() -> Toolchain:
    return _toolchain(flags.CXX.get())


@functools.lru_cache(maxsize=None)
def _refusal(name: str) -> str | None:
    try:
        library("probe", _PROBE, {"fxpress_probe": (ctypes.c_int, [ctypes.c_int])})
    except NativeBuildError as e:
        return str(e)
    return None


def compiler_refusal() -> str | None:
    """Why C++ kernels cannot be built here (checked once per compiler by building a tiny OpenMP
    library), or None when they can."""
    return _refusal(flags.CXX.get())


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def library(name: str, source: str, signatures: dict[str, tuple[object, Sequence[object]]]) -> ctypes.CDLL:
    """The library built from ``source`` (built once per key, loaded once per process), with each
    function in ``signatures`` given its ctypes ``(restype, argtypes)``."""
    chain = toolchain()
    key = hashlib.sha256("\0".join((source, " ".join(FLAGS), chain.identity)).encode()).hexdigest()[:24]
    stem = f"{name}-{key}"
    with _lock:  # one build per library even when many threads compile at once
        lib = _loaded.get(stem)
        if lib is None:
            lib = _load_or_build(stem, source, chain)
            for function, (restype, argtypes) in signatures.items():
                getattr(lib, function).restype = restype
                getattr(lib, function).argtypes = list(argtypes)
            _loaded[stem] = lib
    return lib


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_or_build(stem: str, source: str, chain: Toolchain) -> ctypes.CDLL:
    folder = cache_folder.folder("native", _WITHOUT)
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="fxpress-native-") as private:
            built = _compile(Path(private), stem, source, chain)
            return ctypes.CDLL(str(built))  # the mapping outlives the file
    path, record = folder / f"{stem}.so", folder / f"{stem}.sha256"
    if _trusted(path, record):
        return ctypes.CDLL(str(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{stem}.") as scratch:
        built = _compile(Path(scratch), stem, source, chain)
        data = built.read_bytes()
    try:
        cache_folder.write_atomically(path, data)
        cache_folder.write_atomically(record, hashlib.sha256(data).hexdigest().encode())
    except OSError as e:
        cache_folder.warn_once(f"cannot write to the cache folder {folder} ({e.strerror or e}); {_WITHOUT}")
    if _trusted(path, record):
        return ctypes.CDLL(str(path))
    with tempfile.TemporaryDirectory(prefix="fxpress-native-") as private:  # the copy did not stick
        return ctypes.CDLL(str(_compile(Path(private), stem, source, chain)))


def _trusted(path: Path, record: Path) -> bool:
    """A library fxpress built: a plain file of this user's, writable by no one else, whose bytes
    hash to what was recorded when it was built."""
    try:
        if cache_folder.unsafe_reason(path, folder=False) or cache_folder.unsafe_reason(record, folder=False):
            return False
        return record.read_text().strip() == _digest(path)
    except OSError:
        return False


def _compile(folder: Path, stem: str, source: str, chain: Toolchain) -> Path:
    cpp, out = folder / f"{stem}.cpp", folder / f"{stem}.so"
    cpp.write_text(source)
    command = [chain.compiler, *FLAGS, str(cpp), "-o", str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"building {stem} with {chain.compiler} failed: {e}") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        raise NativeBuildError(f"building {stem} with {' '.join(command)} failed (exit {done.returncode}):\n{tail}")
    return out
