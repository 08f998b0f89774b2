"""Integer-only ops (I-BERT / I-ViT): quantise, softmax, GELU and LayerNorm on int8/int32 codes.

- ``int_row_scale(x, masked, bits)``: ``max |x| / (2**(bits-1) - 1)`` per row, the dynamic scale;
- ``int_quantize(x, scale, masked, bits)``: codes of ``x`` (int8; int32 above 8 bits);
- ``int_softmax(q, scale, method, max_q, exp_bits, out_bits)``: probabilities at ``2**-out_bits``;
- ``int_softmax_dynamic(x, method, max_q, exp_bits, out_bits)``: the same from a float input,
  its row scale and masked int8 codes computed in the same kernel (one pass where three ran);
- ``int_gelu(q, scale, method, max_q, exp_bits)``: int32 codes at ``int_gelu_scale(scale, method)``;
- ``int_layer_norm(q, bias_codes, in_shift, var_shift, out_shift)``: int32 codes whose per-channel
  scale folds in the LayerNorm weight (``fxpress.integer.constants.layer_norm_affine``);
- ``int_matmul(a, b)``: int8 ``[M, K] @ [K, N]`` accumulated exactly in int32 (``fxpress.integer.matmul``).

A float result is ``codes.float() * scale``: the ``integer_only`` pass writes that dequantisation
as plain ATen ops only where a float op reads the result. The references are
``fxpress.integer.arith``; the Triton kernels are ``fxpress.ops.kernels.integer``.
"""

from __future__ import annotations

import torch

from fxpress.integer import arith, constants, matmul, quantize
from fxpress.core.errors import IntegerError
from fxpress.integer.config import METHODS
from fxpress.ops._define import define_op
from fxpress.ops.lowering import Launcher, float_input_refusal


def _kernels(function: str) -> dict[str, Launcher]:
    """The Triton and C++ kernels of an integer-only op (``fxpress/ops/kernels/integer.py``,
    ``fxpress/ops/cpp/integer.py``), bit-exact with its reference."""
    return {"triton": Launcher("fxpress.ops.kernels.integer", function, float_input_refusal(function)),
            "cpp": Launcher("fxpress.ops.cpp.integer", function)}


def _check_method(where: str, method: str) -> None:
    if method not in METHODS:
        raise IntegerError(f"fxpress::{where}: method {method!r} is not one of {METHODS}")


def _check_scale_shape(where: str, x: torch.Tensor, scale: torch.Tensor) -> None:
    per_row = tuple(x.shape[:-1]) + (1,)
    if scale.numel() != 1 and tuple(scale.shape) != per_row:
        raise IntegerError(f"fxpress::{where}: scale has shape {tuple(scale.shape)}; expected one element or "
                           f"one per row {per_row} for input {tuple(x.shape)}")


# int_row_scale / int_quantize ---------------------------------------------------------------------

def _check_bits(where: str, masked: bool, bits: int) -> None:
    if not 2 <= bits <= 24 or (masked and bits != 8):
        raise IntegerError(f"fxpress::{where}: bits={bits} is invalid: expected 2..24 (exactly 8 with masked "
                           "positions, whose code is -128)")


def _row_scale_reference(x: torch.Tensor, masked: bool, bits: int) -> torch.Tensor:
    _check_bits("int_row_scale", masked, bits)
    return quantize.row_scale(x, masked, bits)


def _row_scale_fake(x: torch.Tensor, masked: bool, bits: int) -> torch.Tensor:
    _check_bits("int_row_scale", masked, bits)
    return x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


def _quantize_reference(x: torch.Tensor, scale: torch.Tensor, masked: bool, bits: int) -> torch.Tensor:
    _check_scale_shape("int_quantize", x, scale)
    _check_bits("int_quantize", masked, bits)
    return quantize.quantize(x, scale, masked, bits)


def _quantize_fake(x: torch.Tensor, scale: torch.Tensor, masked: bool, bits: int) -> torch.Tensor:
    _check_scale_shape("int_quantize", x, scale)
    _check_bits("int_quantize", masked, bits)
    return torch.empty_like(x, dtype=quantize.code_dtype(bits), memory_format=torch.contiguous_format)


int_row_scale = define_op("int_row_scale", _row_scale_reference, _row_scale_fake, lowerings=_kernels("int_row_scale"))
int_quantize = define_op("int_quantize", _quantize_reference, _quantize_fake, lowerings=_kernels("int_quantize"))


# int_softmax --------------------------------------------------------------------------------------

def _softmax_checks(q, scale, method, max_q, exp_bits, out_bits) -> None:
    _check_method("int_softmax", method)
    _check_scale_shape("int_softmax", q, scale)
    if q.dtype != torch.int8:
        raise IntegerError(f"fxpress::int_softmax: expects int8 codes, got {q.dtype}")
    arith.check_row_length(q.shape[-1], exp_bits)


def _softmax_reference(q: torch.Tensor, scale: torch.Tensor, method: str, max_q: int, exp_bits: int,
                       out_bits: int) -> torch.Tensor:
    _softmax_checks(q, scale, method, max_q, exp_bits, out_bits)
    return arith.softmax_int(q, scale, method, max_q, exp_bits, out_bits)


def _softmax_fake(q, scale, method, max_q, exp_bits, out_bits):
    _softmax_checks(q, scale, method, max_q, exp_bits, out_bits)
    return torch.empty_like(q, dtype=arith.softmax_dtype(out_bits), memory_format=torch.contiguous_format)


int_softmax = define_op("int_softmax", _softmax_reference, _softmax_fake, lowerings=_kernels("int_softmax"))


# int_softmax_dynamic: int_row_scale, int_quantize and int_softmax of one float input in one kernel

def _softmax_dynamic_checks(x, method, exp_bits) -> None:
    _check_method("int_softmax_dynamic", method)
    if not x.is_floating_point():
        raise IntegerError(f"fxpress::int_softmax_dynamic: expects a float input, got {x.dtype}")
    arith.check_row_length(x.shape[-1], exp_bits)


def _softmax_dynamic_reference(x: torch.Tensor, method: str, max_q: int, exp_bits: int,
                               out_bits: int) -> torch.Tensor:
    _softmax_dynamic_checks(x, method, exp_bits)
    scale = quantize.row_scale(x, True, 8)
    return arith.softmax_int(quantize.quantize(x, scale, True, 8), scale, method, max_q, exp_bits, out_bits)


def _softmax_dynamic_fake(x, method, max_q, exp_bits, out_bits):
    _softmax_dynamic_checks(x, method, exp_bits)
    return torch.empty_like(x, dtype=arith.softmax_dtype(out_bits), memory_format=torch.contiguous_format)


int_softmax_dynamic = define_op("int_softmax_dynamic", _softmax_dynamic_reference, _softmax_dynamic_fake,
                                lowerings=_kernels("int_softmax_dynamic"))


# int_gelu / int_gelu_scale ------------------------------------------------------------------------

def _gelu_checks(q, scale, method) -> None:
    _check_method("int_gelu", method)
    _check_scale_shape("int_gelu", q, scale)
    if q.dtype != torch.int8:
        raise IntegerError(f"fxpress::int_gelu: expects int8 codes, got {q.dtype}")


def _gelu_reference(q: torch.Tensor, scale: torch.Tensor, method: str, max_q: int, exp_bits: int) -> torch.Tensor:
    _gelu_checks(q, scale, method)
    return arith.gelu_int(q, scale, method, max_q, exp_bits)


def _gelu_fake(q, scale, method, max_q, exp_bits):
    _gelu_checks(q, scale, method)
    return torch.empty_like(q, dtype=torch.int32, memory_format=torch.contiguous_format)


def _gelu_scale_reference(scale: torch.Tensor, method: str) -> torch.Tensor:
    _check_method("int_gelu_scale", method)
    return constants.gelu_output_scale(scale, method)


def _gelu_scale_fake(scale: torch.Tensor, method: str) -> torch.Tensor:
    return torch.empty_like(scale)


int_gelu = define_op("int_gelu", _gelu_reference, _gelu_fake, lowerings=_kernels("int_gelu"))
int_gelu_scale = define_op("int_gelu_scale", _gelu_scale_reference, _gelu_scale_fake,
                           lowerings={"triton": _kernels("int_gelu_scale")["triton"]})


# int_layer_norm -----------------------------------------------------------------------------------

def _layer_norm_checks(q, bias_codes, in_shift, var_shift, out_shift) -> None:
    where = "fxpress::int_layer_norm"
    if q.dtype not in (torch.int8, torch.int32):
        raise IntegerError(f"{where}: expects int8 or int32 codes, got {q.dtype}")
    if bias_codes.dtype != torch.int32 or tuple(bias_codes.shape) != (q.shape[-1],):
        raise IntegerError(f"{where}: bias_codes must be int32 of shape ({q.shape[-1]},), got "
                           f"{bias_codes.dtype} {tuple(bias_codes.shape)}")
    for name, value in (("in_shift", in_shift), ("var_shift", var_shift), ("out_shift", out_shift)):
        if not 0 <= value <= 30:
            raise IntegerError(f"{where}: {name}={value} is outside [0, 30]")


def _layer_norm_reference(q: torch.Tensor, bias_codes: torch.Tensor, in_shift: int, var_shift: int,
                          out_shift: int) -> torch.Tensor:
    _layer_norm_checks(q, bias_codes, in_shift, var_shift, out_shift)
    return arith.layer_norm_int(q, bias_codes, in_shift, var_shift, out_shift)


def _layer_norm_fake(q, bias_codes, in_shift, var_shift, out_shift):
    _layer_norm_checks(q, bias_codes, in_shift, var_shift, out_shift)
    return torch.empty_like(q, dtype=torch.int32, memory_format=torch.contiguous_format)


int_layer_norm = define_op("int_layer_norm", _layer_norm_reference, _layer_norm_fake, overwritable=0,
                           lowerings=_kernels("int_layer_norm"))


# int_matmul ---------------------------------------------------------------------------------------

def _matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return matmul.int8_matmul(a, b)


def _matmul_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    matmul.check_operands(a, b, "fxpress::int_matmul")
    return a.new_empty(a.shape[0], b.shape[1], dtype=torch.int32)


# torch._int_mm is the kernel on every target (exact: see fxpress.integer.matmul), each writing
# into the op's planned slot.
int_matmul = define_op("int_matmul", _matmul_reference, _matmul_fake, out_impl=matmul.int8_matmul,
                       lowerings={"triton": Launcher("fxpress.ops.kernels.integer", "int_matmul"),
                                  "cpp": Launcher("fxpress.ops.cpp.integer", "int_matmul")})
