"""Blocked cpu emission of row-reduction kernels (softmax, layer_norm, sum/mean/amax over the
last dimension, with their prologue and epilogue).

Emitted whole, such a kernel makes each of its values a full-size torch temporary: a residual add
and the LayerNorm after it hold two hidden-state-sized buffers besides the planned ones. Rows of a
row reduction are independent, so the kernel runs over blocks of one leading dimension instead (the
first whose size is not 1): inputs that have that dimension are sliced, inputs broadcast along it (a
LayerNorm weight, position embeddings shared by the batch) are passed whole, and each block's
result is written into its part of the output slot. Temporaries are then one block (about
``BLOCK_ELEMENTS`` values), and writing over an input the plan let the output reuse stays safe,
because a block is computed completely before it is written.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from fxpress.codegen.render import allocation, call, code, render
from fxpress.codegen.schedule import Kernel
from fxpress.codegen.reductions import reduces_last_dim, reduction_root
from fxpress.codegen.source_writer import SourceWriter
from fxpress.ir.match import same_size, val

BLOCK_ELEMENTS = 1 << 18  # values per block temporary (1 MiB in fp32)


def _blocked(value: Any, ndim: int, dim: int, size: Any) -> str | None:
    """How a value enters a block: "slice" (it has the blocked dimension), "whole" (broadcast
    along it), or None (it cannot be blocked)."""
    if not isinstance(value, torch.Tensor):
        return "whole"
    j = dim - (ndim - value.dim())  # broadcasting aligns dimensions from the right
    if value.dim() > ndim:
        return None
    if j < 0 or value.shape[j] == 1:
        return "whole"
    return "slice" if same_size([value.shape[j]], [size]) else None


def _index(name: str, value: torch.Tensor, ndim: int, dim: int) -> str:
    j = dim - (ndim - value.dim())
    return f"{name}[{':, ' * j}block]"


def emit_row_blocked(w: SourceWriter, kernel: Kernel, nodes: dict[str, fx.Node], slotted: set[str]) -> bool:
    """Emit ``kernel`` as a loop over blocks; False (nothing emitted) when it does not fit."""
    members = [nodes[n] for n in kernel.nodes]
    root = reduction_root(members)
    if root is None or len(kernel.writes) != 1 or kernel.writes[0] != members[-1].name \
            or not reduces_last_dim(root):
        return False
    x, out_node = val(root.args[0]), members[-1]
    out = val(out_node)
    ndim = x.dim()
    dim = next((d for d in range(ndim - 1) if x.shape[d] not in (0, 1)), None)
    if dim is None or not isinstance(out, torch.Tensor) or out.dim() != ndim:
        return False
    size = x.shape[dim]
    if _blocked(out, ndim, dim, size) != "slice":
        return False
    names: dict[str, str] = {}
    for name in kernel.reads:
        how = _blocked(val(nodes[name]), ndim, dim, size)
        if how is None:
            return False
        if how == "slice":
            names[name] = _index(name, val(nodes[name]), ndim, dim)
    for node in members[:-1]:
        value = val(node)
        if any(_blocked(v, ndim, dim, size) is None for v in (value if isinstance(value, tuple) else (value,))):
            return False

    inner = math.prod(x.shape[dim + 1:])
    step = max(1, BLOCK_ELEMENTS // int(inner)) if isinstance(inner, int) else 1
    if out_node.name not in slotted:  # a graph output: the caller's memory
        w.line(allocation(out_node.name, out))
    w.line(f"for start in range(0, {code(size)}, {step}):")
    with w.indented():
        w.line(f"block = slice(start, start + {step})")
        for node in members:
            if node.target is operator.getitem:
                expr = f"{render(node.args[0], names)}[{node.args[1]}]"
            else:
                expr = call(node, names=names)
            target = _index(out_node.name, out, ndim, dim) if node is out_node else node.name
            w.line(f"{target} = {expr}")
    if len(members) > 1:
        w.line(f"del {', '.join(n.name for n in members[:-1])}")  # the last block's temporaries
    return True
