"""Pass split_linear_bias: a Linear's bias leaves its GEMM and joins the pointwise kernel that reads
the result, for a target that fuses pointwise runs (the cpp target asks for it, through
``Target.prepare_graph``; it is not in the pipeline, where the cpu target would pay a separate add).

``addmm(b, x, w)`` writes b into every row of its output before the GEMM accumulates into it: one
more pass over a wide output (MiniLM's FFN: 1024 x 1536 floats a layer). When every reader of the
result is a reshape whose readers are all pointwise (GELU, a residual add), ``mm`` leaves the
product alone and the bias is added behind each reshape, where the reader's fused kernel adds it
in registers. The sum's order changes (``x w + b`` instead of ``b + x w`` accumulated), a float
rounding apart. Before/after::

    %a = addmm(%b, %x, %w); %v = view(%a, [8, 128, 1536]); %g = gelu(%v)
    ->  %m = mm(%x, %w); %v = view(%m, [8, 128, 1536]); %s = add(%v, %b); %g = gelu(%s)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpress.core.counters import counters
from fxpress.ir.match import aten, insert_call, is_op, val

RULE = "addmm(b, x, w) read by pointwise ops => mm(x, w) + b in their kernel"


def _pointwise(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _readers_fuse(node: fx.Node) -> bool:
    """Every reader of ``node`` is a reshape read only by pointwise ops."""
    return bool(node.users) and all(
        is_op(u, aten.view, aten._unsafe_view, aten.reshape) and u.users and all(_pointwise(r) for r in u.users)
        for u in node.users)


def split_linear_bias(gm: fx.GraphModule) -> PassResult:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.addmm) or node.kwargs or len(node.args) != 3:
            continue  # beta or alpha given: not a plain Linear
        bias, x, w = node.args
        if not isinstance(bias, fx.Node) or val(bias).dim() != 1 or not _readers_fuse(node):
            continue
        product = insert_call(gm, node, aten.mm.default, (x, w))
        for reshape in list(node.users):
            reshape.replace_input_with(node, product)
            readers = list(reshape.users)
            added = insert_call(gm, reshape.next, aten.add.Tensor, (reshape, bias))
            for reader in readers:
                reader.replace_input_with(reshape, added)
        gm.graph.erase_node(node)
        counters["split_linear_bias"][RULE] += 1
        rewrites += 1
    if rewrites:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, rewrites > 0)
