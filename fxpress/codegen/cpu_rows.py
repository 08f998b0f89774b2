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

from fxpress.codegen.render import call, code, render
from fxpress.codegen.schedule import Kernel
from fxpress.passes._match import aten, is_op, same_size, val

BLOCK_ELEMENTS = 1 << 18  # values per block temporary (1 MiB in fp32)
_LAST_DIM_REDUCTIONS = (aten._softmax, aten._log_softmax, aten.sum, aten.mean, aten.amax, aten.amin)


def _root(kernel: Kernel, nodes: dict[str, fx.Node]) -> fx.Node | None:
    roots = [nodes[n] for n in kernel.nodes if is_op(nodes[n], aten.native_layer_norm, *_LAST_DIM_REDUCTIONS)]
    return roots[0] if len(roots) == 1 else None


def _last_dim_only(root: fx.Node) -> bool:
    ndim = val(root.args[0]).dim()
    if is_op(root, aten.native_layer_norm):
        return len(root.args[1]) == 1
    if is_op(root, aten._softmax, aten._log_softmax):
        return root.args[1] in (-1, ndim - 1)
    dims = root.args[1] if len(root.args) > 1 else None
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


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


def emit_row_blocked(w: Any, kernel: Kernel, nodes: dict[str, fx.Node], slotted: set[str]) -> bool:
    """Emit ``kernel`` as a loop over blocks; False (nothing emitted) when it does not fit."""
    root = _root(kernel, nodes)
    members = [nodes[n] for n in kernel.nodes]
    if root is None or len(kernel.writes) != 1 or kernel.writes[0] != members[-1].name \
            or not _last_dim_only(root):
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
        w.line(f"{out_node.name} = torch.empty_strided({render(tuple(out.shape))}, "
               f"{render(tuple(out.stride()))}, dtype={out.dtype}, device=DEVICE)")
    w.line(f"for start in range(0, {code(size)}, {step}):")
    w.level += 1
    w.line(f"block = slice(start, start + {step})")
    for node in members:
        if node.target is operator.getitem:
            expr = f"{render(node.args[0], names)}[{node.args[1]}]"
        else:
            expr = call(node, names=names)
        target = _index(out_node.name, out, ndim, dim) if node is out_node else node.name
        w.line(f"{target} = {expr}")
    w.level -= 1
    if len(members) > 1:
        w.line(f"del {', '.join(n.name for n in members[:-1])}")  # the last block's temporaries
    return True
