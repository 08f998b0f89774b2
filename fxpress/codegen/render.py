"""Rendering graph values as Python source for generated wrapper modules."""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
from sympy.printing.pycode import pycode

from fxpress.ir.support import SIZE_ARITHMETIC
from fxpress.ops import op_spec


def code(expr: Any) -> str:
    if isinstance(expr, torch.SymInt):
        expr = expr.node.expr
    expr = sympy.sympify(expr)
    return str(int(expr)) if expr.is_number else pycode(expr, fully_qualified_modules=True)


def render(arg: Any, names: dict[str, str] | None = None) -> str:
    """Python source for an argument; ``names`` renames nodes (a block of a buffer, say)."""
    if isinstance(arg, fx.Node):
        return names.get(arg.name, arg.name) if names else arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(render(a, names) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {render(v, names)}" for k, v in arg.items()) + "}"
    if isinstance(arg, (torch.dtype, torch.layout, torch.memory_format)):
        return str(arg)
    if isinstance(arg, torch.device):
        return f"torch.device({str(arg)!r})"
    if isinstance(arg, float) and (arg != arg or arg in (float("inf"), float("-inf"))):
        return f"float({str(arg)!r})"
    if isinstance(arg, (torch.SymInt, sympy.Expr)):
        return code(arg)
    return repr(arg)


def allocation(name: str, value: torch.Tensor) -> str:
    """A wrapper statement giving ``name`` fresh memory with ``value``'s layout on the wrapper's
    ``DEVICE``: a graph output, which belongs to the caller rather than to the arena."""
    return (f"{name} = torch.empty_strided({render(tuple(value.shape))}, {render(tuple(value.stride()))}, "
            f"dtype={value.dtype}, device=DEVICE)")


def target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._schema.name.split('::')[1]}.{target._overloadname}"
    if target in SIZE_ARITHMETIC:
        module = "operator" if getattr(operator, target.__name__, None) is target else "torch"
        return f"{module}.{target.__name__}"
    raise NotImplementedError(f"the wrapper cannot call {target!r}")


class Source(str):
    """Text :func:`render` emits as it is: a name the wrapper module defines."""

    def __repr__(self) -> str:
        return str(self)


def _state_handles(node: fx.Node, args: tuple) -> tuple:
    """An op's state handle (``OpSpec.state_handle``) goes through the module's ``KV_HANDLES``."""
    spec = op_spec(node.target)
    if spec is None or spec.state_handle is None:
        return args
    handle = args[spec.state_handle]
    return (*args[:spec.state_handle], Source(f"KV_HANDLES.get({handle}, {handle})"), *args[spec.state_handle + 1:])


def call(node: fx.Node, extra_kwargs: str = "", target: Any = None, callee: str = "",
         names: dict[str, str] | None = None, args: tuple | None = None) -> str:
    args = _state_handles(node, tuple(node.args if args is None else args))
    args = [render(a, names) for a in args] + \
        [f"{k}={render(v, names)}" for k, v in node.kwargs.items()]
    if extra_kwargs:
        args.append(extra_kwargs)
    return f"{callee or target_name(target or node.target)}({', '.join(args)})"
