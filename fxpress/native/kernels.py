"""What every launcher of a C++ kernel needs: its source built from beside the launcher, the ctypes
argument types, tensor pointers, and the thread count."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from fxpress.native import build

POINTER, INT, LONG, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


def library_beside(launcher_file: str, name: str, signatures: dict[str, tuple[object, list[object]]],
                   headers: tuple[str, ...] = ("fast_math.h",)) -> ctypes.CDLL:
    """The library built from ``<name>.cpp`` in the launcher's own folder, after the shared
    ``headers`` of this folder (pasted in front, so they are part of the library's key)."""
    return library_with_headers(name, (Path(launcher_file).parent / f"{name}.cpp").read_text(), signatures, headers)


def library_with_headers(name: str, body: str, signatures: dict[str, tuple[object, list[object]]],
                         headers: tuple[str, ...] = ("fast_math.h",)) -> ctypes.CDLL:
    """The library built from ``body`` after the shared ``headers`` of this folder."""
    here = Path(__file__).parent
    source = "".join((here / h).read_text() for h in headers) + body
    return build.library(name, source, signatures)


def pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def threads() -> int:
    """Run kernels on as many threads as torch's intra-op pool has."""
    return torch.get_num_threads()
