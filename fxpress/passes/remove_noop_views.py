"""Pass remove_noop_views: drop views, expands, aliases and slices that return their input unchanged.

Runs early, so later rules see one canonical chain (``x -> mm``) whatever reshapes the model's
Python code did on the way. A node is kept when it is a graph output whose input is itself a graph
input or weight: removing it would make the output alias an input. Before/after::

    %v = aten.view(%x, [8, 384])   # %x is [8, 384]
    %y = aten.mm(%v, %w)           ->   %y = aten.mm(%x, %w)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.infra.pass_base import PassResult

from fxpress.core.counters import counters
from fxpress.ir.options import Options
from fxpress.ir.match import aten, is_op, same_size, val

def _is_view_op(node: fx.Node) -> bool:
    target = node.target
    # _unsafe_view carries no alias annotation in its schema but returns its input's storage.
    return is_op(node, aten._unsafe_view) or bool(getattr(target, "is_view", False))


def _is_noop(node: fx.Node) -> bool:
    """A view whose result has its input's dtype, sizes, strides and offset: the same tensor."""
    if not _is_view_op(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src, out = val(node.args[0]), val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return (
        src.dtype == out.dtype
        and same_size(src.shape, out.shape)
        and same_size(src.stride(), out.stride())
        and statically_known_true(src.storage_offset() == out.storage_offset())
    )


def _would_alias_input(node: fx.Node) -> bool:
    feeds_output = any(u.op == "output" for u in node.users)
    root = node.args[0]
    while isinstance(root, fx.Node) and root.op == "call_function" and _is_noop(root):
        root = root.args[0]
    return feeds_output and isinstance(root, fx.Node) and root.op in ("placeholder", "get_attr")


def remove_noop_views(gm: fx.GraphModule, *, opts: Options) -> PassResult:
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and _is_noop(node) and not _would_alias_input(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            counters["remove_noop_views"][f"{node.target} => input"] += 1
            removed += 1
    if removed:
        gm.recompile()
    return PassResult(gm, removed > 0)
