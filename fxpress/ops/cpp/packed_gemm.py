"""A dense float32 Linear against a frozen weight through MKL's packed-B GEMM, for the cpp target
(``fxpress/codegen/targets/cpp/gemm.py`` decides which ``mm`` / ``addmm`` calls run it).

``torch.mm`` hands MKL the weight as it lies, and MKL re-lays it out in blocks for its micro-kernel
on every call: 5 to 20 % of a Linear's time at an encoder's sizes (1024 x 384 by 384 x 1536, on a
2-core AVX-512 Xeon; more at fewer rows). ``cblas_sgemm_pack`` makes that layout once and
``cblas_sgemm_compute`` reads it: the same MKL kernels, so the result is bit for bit ``torch.mm``'s
for more than one row (``tests/native/test_cpp_packed_gemm.py``; one row torch runs as a
matrix-vector product, which sums in another order). The packed copy of each weight stays beside it (about
the weight's size again) and is made anew after an in-place update (``fxpress/native/layouts.py``).

MKL is reached in torch's own library, which exports the CBLAS packed interface on builds with MKL
(x86); elsewhere ``mkl_refusal`` says why and the calls stay ``torch.mm``.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch

from fxpress.native.kernels import FLOAT, INT, LONG, POINTER
from fxpress.native.layouts import DerivedLayouts

# CBLAS enumerations (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
_SIGNATURES = {
    "cblas_sgemm_pack_get_size": (ctypes.c_size_t, [INT, LONG, LONG, LONG]),
    "cblas_sgemm_pack": (None, [INT, INT, INT, LONG, LONG, LONG, FLOAT, POINTER, LONG, POINTER]),
    "cblas_sgemm_compute": (None, [INT, INT, INT, LONG, LONG, LONG, POINTER, LONG, POINTER, LONG, FLOAT, POINTER,
                                   LONG]),
}


@functools.cache
def _mkl() -> ctypes.CDLL | str:
    """torch's CPU library with the CBLAS packed interface bound, or why it cannot be."""
    if not torch.backends.mkl.is_available():
        return "this torch build has no MKL (its packed GEMM is what these calls would run)"
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    name = ("" if sys.platform == "win32" else "lib") + "torch_cpu" + suffix
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name))
        for symbol, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(lib, symbol)
            function.restype, function.argtypes = restype, argtypes
    except (OSError, AttributeError) as e:
        return f"torch's library does not export MKL's packed GEMM ({e})"
    return lib


def mkl_refusal() -> str | None:
    """Why packed GEMMs cannot run here, or None."""
    lib = _mkl()
    return lib if isinstance(lib, str) else None


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """MKL's layout of ``weight.T`` ([n, k] as a Linear keeps it) for products with ``rows`` rows."""
    lib, (n, k) = _mkl(), weight.shape
    layout = torch.empty(lib.cblas_sgemm_pack_get_size(_B_MATRIX, rows, n, k), dtype=torch.uint8)
    lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, rows, n, k, 1.0, weight.data_ptr(), weight.stride(0),
                         layout.data_ptr())
    return layout


# Packed weights, made on first use and kept while the weight lives unchanged.
packed = DerivedLayouts(_pack)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ weight.T (+ bias, added first as ``addmm`` does): x [m, k] and out [m, n] float32
    with unit column stride, weight [n, k] row-major float32. Operands of any other layout run
    ``torch.mm`` / ``torch.addmm`` instead, with the same result."""
    (m, k), n = x.shape, weight.shape[0]
    rows_apart = m == 1 or (x.stride(0) >= k and out.stride(0) >= n)  # MKL's leading dimensions
    if x.stride(1) != 1 or out.stride(1) != 1 or weight.stride(1) != 1 or weight.stride(0) < k \
            or not rows_apart or m == 0 or k == 0:
        if bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(bias, x, weight.t(), out=out)
    layout = packed(weight, rows=m)  # held until the GEMM returns
    beta = 0.0
    if bias is not None:
        out.copy_(bias.expand(m, n))
        beta = 1.0
    _mkl().cblas_sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k, x.data_ptr(), max(x.stride(0), k),
                               layout.data_ptr(), n, beta, out.data_ptr(), max(out.stride(0), n))
    return out
