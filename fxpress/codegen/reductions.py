"""Row reductions: the ATen ops the schedule makes ``reduction`` kernels of, and how every emitter
(row-blocked torch calls, generated Triton) finds a reduction kernel's root."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpress.ir.match import aten, is_op, val

REDUCTION_OPS = (aten._softmax, aten._log_softmax, aten.native_layer_norm, aten.sum, aten.mean,
                 aten.amax, aten.amin)


def reduces_last_dim(node: fx.Node) -> bool:
    """Whether the reduction ``node`` reduces (layer_norm: normalises) the last dimension only."""
    x = val(node.args[0])
    if is_op(node, aten.native_layer_norm):
        return len(node.args[1]) == 1
    if is_op(node, aten._softmax, aten._log_softmax):
        return node.args[1] in (-1, x.dim() - 1)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, x.dim() - 1)


def is_row_reduction(node: fx.Node) -> bool:
    """A reduction the schedule gives a kernel of its own: one over the last dimension, or any
    layer_norm."""
    if is_op(node, aten.native_layer_norm):
        return True
    return isinstance(val(node), torch.Tensor) and is_op(node, *REDUCTION_OPS) and reduces_last_dim(node)


def reduction_root(nodes: list[fx.Node]) -> fx.Node | None:
    """The one reduction among a reduction kernel's ``nodes``, None when there is not exactly one."""
    roots = [n for n in nodes if is_op(n, *REDUCTION_OPS)]
    return roots[0] if len(roots) == 1 else None
