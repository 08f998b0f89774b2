"""ATen pointwise op -> Triton expression: the vocabulary of generated pointwise kernels.

Each entry renders one node from its operands' expressions (strings) and literal arguments.
Values are computed in fp32 (half-precision inputs are up-cast on load, as Inductor does) and
cast to each output's dtype on store. An op missing from the table keeps its kernel a torch call.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fxpress.core.triton_types import TL_DTYPES

aten = torch.ops.aten
SQRT1_2 = 0.7071067811865476



def _binary(symbol: str) -> Callable[..., str]:
    def render(a: str, b: str, alpha: Any = 1) -> str:
        return f"({a} {symbol} {b})" if alpha == 1 else f"({a} {symbol} {b} * {alpha!r})"
    return render


# Only core builtins (tl.exp, tl.erf, ...): triton.language's own @jit helpers such as
# tl.sigmoid run in the interpreter only when TRITON_INTERPRET was set before triton's import.
def _sigmoid(a: str) -> str:
    return f"(1.0 / (1.0 + tl.exp(-{a})))"


def _tanh(a: str) -> str:
    return f"(2.0 * {_sigmoid(f'2.0 * {a}')} - 1.0)"


def _gelu(a: str, approximate: str = "none") -> str:
    if approximate == "tanh":
        inner = f"0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a})"
        return f"(0.5 * {a} * (1.0 + {_tanh(inner)}))"
    return f"(0.5 * {a} * (1.0 + tl.erf({a} * {SQRT1_2})))"


def _pow(a: str, exponent: Any) -> str:
    if exponent == 2:
        return f"({a} * {a})"
    if exponent == 0.5:
        return f"tl.sqrt({a})"
    raise NotImplementedError(f"pow with exponent {exponent!r}")


def _cast(a: str, dtype: torch.dtype | None = None, **kwargs: Any) -> str:
    if set(kwargs) - {"layout", "device"} or dtype not in TL_DTYPES:
        raise NotImplementedError(f"_to_copy with {kwargs} to {dtype}")
    if dtype in (torch.float16, torch.bfloat16):
        return f"{a}.to({TL_DTYPES[dtype]}).to(tl.float32)"  # round as the cast would
    return f"{a}.to({TL_DTYPES[dtype]})"


OPS: dict[Any, Callable[..., str]] = {
    aten.add.Tensor: _binary("+"), aten.add.Scalar: _binary("+"),
    aten.sub.Tensor: _binary("-"), aten.sub.Scalar: _binary("-"),
    aten.mul.Tensor: _binary("*"), aten.mul.Scalar: _binary("*"),
    aten.div.Tensor: _binary("/"), aten.div.Scalar: _binary("/"),
    aten.neg.default: lambda a: f"(-{a})",
    aten.relu.default: lambda a: f"tl.maximum({a}, 0.0)",
    aten.abs.default: lambda a: f"tl.abs({a})",
    aten.exp.default: lambda a: f"tl.exp({a})",
    aten.log.default: lambda a: f"tl.log({a})",
    aten.sqrt.default: lambda a: f"tl.sqrt({a})",
    aten.rsqrt.default: lambda a: f"(1.0 / tl.sqrt({a}))",
    aten.sin.default: lambda a: f"tl.sin({a})",
    aten.cos.default: lambda a: f"tl.cos({a})",
    aten.sigmoid.default: _sigmoid,
    aten.tanh.default: _tanh,
    aten.gelu.default: _gelu,
    aten.silu.default: lambda a: f"({a} * {_sigmoid(a)})",
    aten.pow.Tensor_Scalar: _pow,
    aten.where.self: lambda c, a, b: f"tl.where({c}, {a}, {b})",
    aten.eq.Tensor: _binary("=="), aten.eq.Scalar: _binary("=="),
    aten.ne.Tensor: _binary("!="), aten.ne.Scalar: _binary("!="),
    aten.lt.Tensor: _binary("<"), aten.lt.Scalar: _binary("<"),
    aten.le.Tensor: _binary("<="), aten.le.Scalar: _binary("<="),
    aten.gt.Tensor: _binary(">"), aten.gt.Scalar: _binary(">"),
    aten.ge.Tensor: _binary(">="), aten.ge.Scalar: _binary(">="),
    aten.clone.default: lambda a, memory_format=None: a,
    aten._to_copy.default: _cast,
}
