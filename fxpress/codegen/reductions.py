"""Row reductions: the ATen ops the schedule makes ``reduction`` kernels of, how every emitter
(row-blocked torch calls, generated Triton and C++) finds a reduction kernel's root, and what the
generating emitters share: the reductions they write and the parts of such a kernel."""

from __future__ import annotations

import operator
from typing import Callable

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


# The reductions the Triton and C++ emitters write; log_softmax and amin stay torch calls.
EMITTED = (aten._softmax, aten.native_layer_norm, aten.sum, aten.mean, aten.amax)


class RowKernelParts:
    """A reduction kernel's members by role: the pointwise ``prologue`` computing the reduced input
    ``x``, the ``root`` reduction, its ``getitems`` by index (layer_norm's out, mean, rstd) and the
    pointwise ``epilogue`` over its rows. The generating emitters' kernel writers start from it."""

    def __init__(self, members: list[fx.Node]) -> None:
        self.members = members
        self.root = root = reduction_root(members)
        self.x: fx.Node = root.args[0]
        at = members.index(root)
        self.prologue = members[:at]
        self.epilogue = [n for n in members[at + 1:] if n.target is not operator.getitem]
        self.getitems = {n.args[1]: n for n in members if n.target is operator.getitem}


def generation_refusal(members: list[fx.Node], values_refusal: Callable[[fx.Node], str | None],
                       node_refusal: Callable[[fx.Node], str | None]) -> str | None:
    """Why a reduction kernel cannot be generated, or None: the rules every generating emitter
    shares (one emitted root over the last dimension, an epilogue over whole rows), then the
    emitter's own ``values_refusal`` of the root and ``node_refusal`` of each pointwise member."""
    root = reduction_root(members)
    if root is None or not is_op(root, *EMITTED):
        return "no single softmax/layer_norm/sum/mean/amax root"
    if not reduces_last_dim(root):
        return f"{root.name}: layer_norm over more than the last dimension"
    if is_op(root, aten._softmax) and root.args[2]:
        return "softmax with half-to-float"
    if is_op(root, aten.sum) and root.kwargs.get("dtype") is not None:
        return "sum with a dtype"
    reason = values_refusal(root)
    if reason is not None:
        return reason
    row_shape = tuple(root.args[0].meta["val"].shape)
    after_root = False
    for node in members:
        if node is root or node.target is operator.getitem:
            after_root = after_root or node is root
            continue
        reason = node_refusal(node)
        if reason is not None:
            return reason
        if after_root and tuple(node.meta["val"].shape) != row_shape:
            return f"{node.name}: epilogue over a row statistic is not generated yet"
        if after_root and root in node.all_input_nodes and root.meta["val"].dim() != len(row_shape):
            return f"{node.name}: reads {root.name} broadcast across its rows"
    return None
