"""Linears against frozen weights on the cpp target: ``mm(x, W^T)`` and ``addmm(b, x, W^T)`` whose W
is a constant of the graph run ``packed_linear`` (``fxpress/ops/cpp/packed_gemm.py``: MKL's GEMM
on a layout of W made once, not on every call), writing into the call's planned slot.

A GEMM whose weight is computed at run time, whose row count is not fixed at compile time or is
small (a decode step's handful of rows moves the weight once either way) stays ``torch.mm``
without comment; one that could run packed but cannot here says why in explain()."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpress.codegen.render import render
from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.ir.match import aten, is_op, val
from fxpress.ops.cpp.packed_gemm import mkl_refusal

MIN_ROWS = 16  # below this a product is a few rows against the weight: the layout saves little


def _frozen_weight(operand: object) -> fx.Node | None:
    """W when ``operand`` is ``W.T`` of a 2-D constant W ([n, k], as a Linear keeps it)."""
    if not isinstance(operand, fx.Node) or not is_op(operand, aten.permute, aten.t):
        return None
    if is_op(operand, aten.permute) and list(operand.args[1]) != [1, 0]:
        return None
    weight = operand.args[0]
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" and val(weight).dim() == 2 else None


def packed_gemm(kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel | str | None:
    """The packed GEMM for this kernel, why it cannot run one, or None when it is no such GEMM."""
    node = nodes[kernel.nodes[0]]
    if len(kernel.nodes) != 1 or not is_op(node, aten.mm, aten.addmm) or node.kwargs:
        return None  # addmm with beta or alpha is not a Linear
    bias, x, operand = (None, *node.args) if is_op(node, aten.mm) else node.args
    weight = _frozen_weight(operand)
    rows = val(x).shape[0] if weight is not None else None
    if weight is None or not isinstance(rows, int) or rows < MIN_ROWS:
        return None
    if bias is not None and (not isinstance(bias, fx.Node) or val(bias).dim() != 1):
        return "addmm's bias is not one row: its broadcast stays ATen's"
    tensors = [val(t) for t in (x, weight, node) + ((bias,) if bias is not None else ())]
    if any(t.dtype != torch.float32 for t in tensors):
        return "a packed GEMM runs float32; this one has " + ", ".join(str(t.dtype) for t in tensors)
    refusal = mkl_refusal()
    if refusal is not None:
        return refusal
    args = ", ".join((render(x), render(weight), node.name))
    inputs = tuple(a.name for a in (x, weight, bias) if isinstance(a, fx.Node))
    launch = f"packed_linear({args}" + (f", bias={render(bias)})" if bias is not None else ")")
    return GeneratedKernel(kernel.name, "", inputs, (node.name,), launch=launch,
                           imports=("from fxpress.ops.cpp.packed_gemm import packed_linear",))
