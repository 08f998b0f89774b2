"""Generated C++ kernels inside a wrapper module: each is built (or found in the library cache,
under its integrity rules) when the wrapper loads, and called through ctypes."""

from __future__ import annotations

from typing import Any

from fxpress.native.kernels import INT, LONG, POINTER, library_with_headers

ENTRY = "fxpress_kernel"  # the one function of every generated library

__all__ = ["ENTRY", "INT", "LONG", "POINTER", "native_kernel"]


def native_kernel(body: str, argument_types: list[Any]) -> Any:
    """The function ``ENTRY`` of the library built from ``body`` (after ``fast_math.h``)."""
    library = library_with_headers("fxpress_generated", body, {ENTRY: (None, argument_types)},
                                   ("wide_vectors.h", "fast_math.h"))
    return getattr(library, ENTRY)
