"""What fxpress can compile, and where in the user's code an unsupported op came from.

fxpress compiles straight-line graphs of ops. Control-flow higher-order ops (``cond``,
``while_loop``, ``map``) carry subgraphs that the schedule and memory plan cannot see through, so a
graph holding one runs eagerly instead, with a warning naming the op and the user's source line.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

# Python-level callables that appear in ATen graphs and are plain arithmetic on sizes.
SIZE_ARITHMETIC = {
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
    operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
    operator.lt, operator.le, operator.gt, operator.ge, torch.sym_float, torch.sym_int,
    torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sqrt, torch.sym_ite,
}


@dataclass(frozen=True)
class Unsupported:
    node: str
    op: str
    reason: str
    source: str | None

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"{self.op} ({self.reason}){where}"


def user_source_line(node: fx.Node) -> str | None:
    """``file.py:123 in fn: code`` for the innermost user frame of the node's stack trace."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [line.strip() for line in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith('File "'):
            path, _, rest = lines[i][len('File "'):].partition('", line ')
            lineno, _, fn = rest.partition(", in ")
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{path}:{lineno} in {fn}: {code}"
    return None


def _reason(node: fx.Node) -> str | None:
    fn = node.target
    if isinstance(fn, torch._ops.HigherOrderOperator):
        return f"higher-order op {fn.name()} with subgraphs is not lowered"
    if isinstance(fn, torch._ops.OpOverload) or fn in SIZE_ARITHMETIC:
        return None
    return f"python callable {getattr(fn, '__name__', fn)!r} is not an op"


def find_unsupported(gm: fx.GraphModule) -> list[Unsupported]:
    """Every node of ``gm`` that fxpress cannot compile, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_method"):
            found.append(Unsupported(node.name, str(node.target), f"{node.op} in an ATen graph",
                                     user_source_line(node)))
        elif node.op == "call_function":
            reason = _reason(node)
            if reason is not None:
                op = getattr(node.target, "__name__", str(node.target))
                found.append(Unsupported(node.name, op, reason, user_source_line(node)))
    return found
