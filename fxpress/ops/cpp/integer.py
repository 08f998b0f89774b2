"""The cpp target's integer-only kernels (``integer.cpp``), bit-exact with ``fxpress.integer.arith``.

Launchers take the op's arguments plus ``out``. Inputs are made contiguous; float inputs are read
as float32 (as the references compute), scales as float64.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from fxpress.core.errors import IntegerError
from fxpress.integer import constants, matmul
from fxpress.integer.arith import NEWTON_STEPS, check_row_length
from fxpress.integer.quantize import code_limit, mask_limit, reciprocal
from fxpress.native.kernels import FLOAT, INT, LONG, POINTER, library_beside, pointer, threads
from fxpress.ops.lowering import rows_of


@functools.cache
def _lib():
    return library_beside(__file__, "integer", {
        "fxpress_int_row_scale": (None, [POINTER, LONG, LONG, INT, FLOAT, FLOAT, POINTER, INT]),
        "fxpress_int_quantize": (None, [POINTER, POINTER, LONG, LONG, LONG, INT, FLOAT, FLOAT, INT, POINTER, INT]),
        "fxpress_int_softmax": (INT, [POINTER, POINTER, LONG, POINTER, LONG, LONG, INT, INT, INT, INT, POINTER, INT]),
        "fxpress_int_softmax_dynamic": (INT, [POINTER, LONG, LONG, FLOAT, FLOAT, POINTER, INT, INT, INT, INT, POINTER,
                                              INT]),
        "fxpress_int_gelu": (INT, [POINTER, POINTER, LONG, POINTER, LONG, LONG, INT, INT, INT, INT, INT, POINTER, INT]),
        "fxpress_int_layer_norm": (None, [POINTER, INT, POINTER, LONG, LONG, INT, INT, INT, INT, POINTER, INT]),
    })


# A ctypes array, not a tensor: this module may first be imported inside a compile's fake mode.
_COEFFICIENTS = (ctypes.c_double * len(constants.COEFFICIENTS))(*constants.COEFFICIENTS)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _scales(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One float64 scale per row (stride 1), or one for every row (stride 0)."""
    flat = scale.detach().reshape(-1).to(torch.float64).contiguous()
    return flat, 0 if flat.numel() == 1 else 1


def _raise_for(status: int, where: str, scale: torch.Tensor) -> None:
    if status == 1:
        constants.check_scale(scale, where)  # raises, naming the bad entries
    if status:
        raise IntegerError(f"{where}: integer constants overflow int32 at scales {scale.flatten()[:4].tolist()}")


def _inverse_limit(bits: int) -> float:
    """``1 / L`` rounded to float32, as ``fxpress.integer.quantize.row_scale`` multiplies by it."""
    return float(torch.tensor(1.0 / code_limit(bits), dtype=torch.float32))


def int_row_scale(x: torch.Tensor, masked: bool, bits: int, out: torch.Tensor) -> torch.Tensor:
    limit = mask_limit(x.dtype)
    x, rows, width = rows_of(_float32(x))
    _lib().fxpress_int_row_scale(pointer(x), rows, width, int(masked), limit, _inverse_limit(bits), pointer(out),
                                 threads())
    return out


def int_quantize(x: torch.Tensor, scale: torch.Tensor, masked: bool, bits: int, out: torch.Tensor) -> torch.Tensor:
    limit = mask_limit(x.dtype)
    x, rows, width = rows_of(_float32(x))
    inv = reciprocal(scale).reshape(-1).contiguous()
    _lib().fxpress_int_quantize(pointer(x), pointer(inv), 0 if inv.numel() == 1 else 1, rows, width, int(masked),
                                limit, float(code_limit(bits)), out.element_size(), pointer(out), threads())
    return out


def int_softmax(q: torch.Tensor, scale: torch.Tensor, method: str, max_q: int, exp_bits: int, out_bits: int,
                out: torch.Tensor) -> torch.Tensor:
    q, rows, width = rows_of(q)
    check_row_length(width, exp_bits)
    scales, stride = _scales(scale)
    status = _lib().fxpress_int_softmax(pointer(q), pointer(scales), stride, _COEFFICIENTS, rows, width,
                                        int(method == "ibert"), exp_bits, max_q, out_bits, pointer(out), threads())
    _raise_for(status, "integer softmax", scale)
    return out


def int_softmax_dynamic(x: torch.Tensor, method: str, max_q: int, exp_bits: int, out_bits: int,
                        out: torch.Tensor) -> torch.Tensor:
    limit = mask_limit(x.dtype)
    x, rows, width = rows_of(_float32(x))
    check_row_length(width, exp_bits)
    status = _lib().fxpress_int_softmax_dynamic(pointer(x), rows, width, limit, _inverse_limit(8), _COEFFICIENTS,
                                                int(method == "ibert"), exp_bits, max_q, out_bits, pointer(out),
                                                threads())
    if status:
        raise IntegerError(f"integer softmax: integer constants overflow int32 at a row scale of {tuple(x.shape)}")
    return out


def int_gelu(q: torch.Tensor, scale: torch.Tensor, method: str, max_q: int, exp_bits: int,
             out: torch.Tensor) -> torch.Tensor:
    q, rows, width = rows_of(q)
    scales, stride = _scales(scale)
    status = _lib().fxpress_int_gelu(pointer(q), pointer(scales), stride, _COEFFICIENTS, rows, width,
                                     int(method == "ibert"), exp_bits, max_q, constants.ERF_BITS,
                                     constants.SIGMOID_BITS, pointer(out), threads())
    _raise_for(status, "integer GELU", scale)
    return out


def int_layer_norm(q: torch.Tensor, bias_codes: torch.Tensor, in_shift: int, var_shift: int, out_shift: int,
                   out: torch.Tensor) -> torch.Tensor:
    q, rows, width = rows_of(q)
    bias = bias_codes.contiguous()
    _lib().fxpress_int_layer_norm(pointer(q), q.element_size(), pointer(bias), rows, width, in_shift, var_shift,
                                  out_shift, NEWTON_STEPS, pointer(out), threads())
    return out


def int_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """oneDNN's int8 GEMM through ``torch._int_mm`` (exact: ``fxpress.integer.matmul``), into ``out``."""
    return matmul.int8_matmul(a, b, out)
