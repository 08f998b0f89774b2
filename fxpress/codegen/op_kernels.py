"""How the triton target launches each fxpress op: checks on the node's metadata, then a launch
of the op's hand-written kernel (``fxpress/codegen/kernels/``). Ops missing here, or nodes whose
layout a kernel does not take, run their reference implementation instead."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx as fx

from fxpress.codegen.schedule import Kernel
from fxpress.codegen.triton_ops import TL_DTYPES
from fxpress.codegen.triton_pointwise import TritonKernel, _static


def _contiguous(value: torch.Tensor) -> bool:
    return _static(value) and value.is_contiguous()


def _rms_norm(kernel: Kernel, node: fx.Node) -> TritonKernel | str:
    x, weight, eps = node.args
    x_val, out_val = x.meta["val"], node.meta["val"]
    if not (_contiguous(x_val) and _contiguous(out_val)) or x_val.dtype not in TL_DTYPES:
        return "rms_norm of a non-contiguous or symbolic-shaped input"
    if weight is not None and not (_contiguous(weight.meta["val"]) and weight.meta["val"].dim() == 1):
        return "rms_norm with a weight that is not one contiguous row"
    width = int(x_val.shape[-1])
    rows = math.prod(int(s) for s in x_val.shape[:-1])
    weight_name = weight.name if weight is not None else x.name
    launch = (f"rms_norm_kernel[({rows},)]({x.name}, {weight_name}, {node.name}, {width}, {float(eps)!r}, "
              f"HAS_WEIGHT={weight is not None}, BLOCK={min(1024, 1 << max(width - 1, 0).bit_length())})")
    return TritonKernel(kernel.name, "", (x.name, weight_name), (node.name,), rows,
                        imports=("from fxpress.codegen.kernels.rms_norm import rms_norm_kernel",),
                        launch=launch)


OP_KERNELS: dict[object, Callable[[Kernel, fx.Node], TritonKernel | str]] = {
    torch.ops.fxpress.rms_norm.default: _rms_norm,
}


def lower_op(kernel: Kernel, nodes: dict[str, fx.Node]) -> TritonKernel | str:
    """A launch of the op's kernel, or why the op keeps its reference implementation."""
    (node,) = [nodes[n] for n in kernel.nodes]
    lower = OP_KERNELS.get(node.target)
    return f"{node.target} has no Triton kernel" if lower is None else lower(kernel, node)
