"""ATen elementwise op -> C++ expression: the vocabulary of the cpp target's generated kernels.

Values are ``float`` (float32 tensors) or ``bool`` (comparisons, masks); integer tensors are read
only to be converted (``_to_copy``), as in the Triton vocabulary. Exponentials inside sigmoid,
tanh, SiLU and GELU use ``fast_math.h`` (polynomial, within a few ulp, and loops over them
vectorise); a plain ``exp``/``log``/``sin`` is the C library's, exact to the ulp but scalar. An op
missing from the table keeps its kernel torch calls.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

aten = torch.ops.aten

# What a C++ kernel reads and writes: every dtype here can be loaded; arithmetic is on the first two.
CPP_TYPES = {torch.float32: "float", torch.bool: "bool", torch.int64: "int64_t", torch.int32: "int32_t",
             torch.int16: "int16_t", torch.int8: "int8_t", torch.uint8: "uint8_t"}
COMPUTED = (torch.float32, torch.bool)


def literal(value: Any) -> str:
    """A Python number as a C++ float literal (finite only: callers refuse the rest)."""
    if isinstance(value, bool):
        return "1.0f" if value else "0.0f"
    text = repr(float(value))
    if not math.isfinite(float(value)):
        raise NotImplementedError(f"non-finite literal {value!r}")
    return f"{text}f"


def _operand(value: Any) -> str:
    return value if isinstance(value, str) else literal(value)


def _binary(symbol: str) -> Callable[..., str]:
    def render(a: Any, b: Any, alpha: Any = 1) -> str:
        a, b = _operand(a), _operand(b)
        return f"({a} {symbol} {b})" if alpha == 1 else f"({a} {symbol} {b} * {literal(alpha)})"
    return render


def _compare(symbol: str) -> Callable[..., str]:
    return lambda a, b: f"({_operand(a)} {symbol} {_operand(b)})"


def _unary(template: str) -> Callable[..., str]:
    return lambda a: template.format(a=a)


def _gelu(a: str, approximate: str = "none") -> str:
    if approximate == "tanh":
        return f"fxpress_math::gelu_tanh({a})"
    if approximate != "none":
        raise NotImplementedError(f"gelu with approximate={approximate!r}")
    return f"fxpress_math::gelu({a})"


def _pow(a: str, exponent: Any) -> str:
    if exponent == 2:
        return f"({a} * {a})"
    if exponent == 0.5:
        return f"std::sqrt({a})"
    raise NotImplementedError(f"pow with exponent {exponent!r}")


def _where(condition: str, a: Any, b: Any) -> str:
    return f"({condition} ? {_operand(a)} : {_operand(b)})"


def _copy(a: str, memory_format: Any = None) -> str:
    return a


OPS: dict[Any, Callable[..., str]] = {
    aten.add.Tensor: _binary("+"), aten.add.Scalar: _binary("+"),
    aten.sub.Tensor: _binary("-"), aten.sub.Scalar: _binary("-"),
    aten.mul.Tensor: _binary("*"), aten.mul.Scalar: _binary("*"),
    aten.div.Tensor: _binary("/"), aten.div.Scalar: _binary("/"),
    aten.neg.default: _unary("(-{a})"),
    aten.relu.default: _unary("fxpress_math::relu({a})"),
    aten.abs.default: _unary("std::fabs({a})"),
    aten.exp.default: _unary("std::exp({a})"),
    aten.log.default: _unary("std::log({a})"),
    aten.sqrt.default: _unary("std::sqrt({a})"),
    aten.rsqrt.default: _unary("(1.0f / std::sqrt({a}))"),
    aten.sin.default: _unary("std::sin({a})"),
    aten.cos.default: _unary("std::cos({a})"),
    aten.sigmoid.default: _unary("fxpress_math::sigmoid({a})"),
    aten.tanh.default: _unary("fxpress_math::tanh_approx({a})"),
    aten.silu.default: _unary("fxpress_math::silu({a})"),
    aten.gelu.default: _gelu,
    aten.pow.Tensor_Scalar: _pow,
    aten.where.self: _where,
    aten.eq.Tensor: _compare("=="), aten.eq.Scalar: _compare("=="),
    aten.ne.Tensor: _compare("!="), aten.ne.Scalar: _compare("!="),
    aten.lt.Tensor: _compare("<"), aten.lt.Scalar: _compare("<"),
    aten.le.Tensor: _compare("<="), aten.le.Scalar: _compare("<="),
    aten.gt.Tensor: _compare(">"), aten.gt.Scalar: _compare(">"),
    aten.ge.Tensor: _compare(">="), aten.ge.Scalar: _compare(">="),
    aten.clone.default: _copy,
}

# Logic on bool values (masks): their operands must be bool.
LOGIC: dict[Any, Callable[..., str]] = {
    aten.bitwise_and.Tensor: _compare("&&"), aten.logical_and.default: _compare("&&"),
    aten.bitwise_or.Tensor: _compare("||"), aten.logical_or.default: _compare("||"),
    aten.bitwise_not.default: _unary("(!{a})"), aten.logical_not.default: _unary("(!{a})"),
}
OPS.update(LOGIC)

# Operands that may be bool besides logic's: a where's condition, what a copy copies.
TAKES_BOOL = {aten.where.self: (0,), aten.clone.default: (0,)}


def reads(target: Any, position: int, dtype: torch.dtype) -> bool:
    """Whether operand ``position`` of ``target`` may be a tensor of ``dtype`` here."""
    if target is aten._to_copy.default:
        return dtype in CPP_TYPES
    if target in LOGIC:
        return dtype == torch.bool
    return dtype == torch.float32 or (dtype == torch.bool and position in TAKES_BOOL.get(target, ()))


def conversion(a: str, dtype: torch.dtype) -> str:
    """``_to_copy`` of a value to float32 or bool, rounding as ATen does."""
    if dtype == torch.float32:
        return f"static_cast<float>({a})"
    if dtype == torch.bool:
        return f"({a} != 0)"
    raise NotImplementedError(f"conversion to {dtype}")
