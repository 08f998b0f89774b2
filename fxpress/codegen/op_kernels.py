"""How the triton target launches each fxpress op: checks on the node's metadata, then a launch
of the op's hand-written kernel (``fxpress/codegen/kernels/``). Ops missing here, or nodes whose
layout a kernel does not take, run their reference implementation instead."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx as fx

from fxpress.codegen.render import render
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


def _lowrank(launcher: str) -> Callable[[Kernel, fx.Node], TritonKernel | str]:
    """The low-rank ops launch a Python launcher with the op's own arguments plus ``out``; it
    reads sizes at run time, so symbolic sequence lengths need nothing here."""
    from fxpress.codegen.kernels.lowrank import MAX_RANK_PAD, _pad

    def lower(kernel: Kernel, node: fx.Node) -> TritonKernel | str:
        tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        values = [a.meta["val"] for a in tensors] + [node.meta["val"]]
        if any(v.dtype not in TL_DTYPES for v in values):
            return f"{launcher} on a dtype outside {sorted(map(str, TL_DTYPES))}"
        if not node.args[0].meta["val"].is_contiguous():
            return f"{launcher} of a non-contiguous input"
        ranks = [v.shape[0] for a, v in zip(tensors, values) if "down" in _argument_name(node, a)]
        ranks += [v.shape[-1] for a, v in zip(tensors, values) if _argument_name(node, a).startswith("p")]
        if any(_pad(r) > MAX_RANK_PAD for r in ranks if not isinstance(r, torch.SymInt)):
            return f"{launcher} with a rank above {MAX_RANK_PAD} (its on-chip accumulator would spill)"
        args = ", ".join([render(a) for a in node.args] + [node.name])
        return TritonKernel(kernel.name, "", tuple(a.name for a in tensors), (node.name,), 0,
                            imports=(f"from fxpress.codegen.kernels.lowrank import {launcher}",),
                            launch=f"{launcher}({args})")
    return lower


def _launcher(module: str, launcher: str) -> Callable[[Kernel, fx.Node], TritonKernel | str]:
    """Ops whose kernel module has a Python launcher taking the op's arguments plus ``out`` (the
    integer-only and LUT ops): it reads sizes at run time, so symbolic shapes need nothing here."""

    def lower(kernel: Kernel, node: fx.Node) -> TritonKernel | str:
        x = node.args[0].meta["val"]
        if x.is_floating_point() and x.dtype not in TL_DTYPES:
            return f"{launcher} of {x.dtype}"
        tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        args = ", ".join([render(a) for a in node.args] + [node.name])
        return TritonKernel(kernel.name, "", tuple(a.name for a in tensors), (node.name,), 0,
                            imports=(f"from fxpress.codegen.kernels.{module} import {launcher}",),
                            launch=f"{launcher}({args})")
    return lower


def _argument_name(node: fx.Node, arg: fx.Node) -> str:
    schema = node.target._schema
    return next((a.name for a, value in zip(schema.arguments, node.args) if value is arg), "")


OP_KERNELS: dict[object, Callable[[Kernel, fx.Node], TritonKernel | str]] = {
    torch.ops.fxpress.rms_norm.default: _rms_norm,
    torch.ops.fxpress.lowrank_linear.default: _lowrank("lowrank_linear"),
    torch.ops.fxpress.lowrank_ffn.default: _lowrank("lowrank_ffn"),
    torch.ops.fxpress.lowrank_attention.default: _lowrank("lowrank_attention"),
    torch.ops.fxpress.int_row_scale.default: _launcher("integer", "int_row_scale"),
    torch.ops.fxpress.int_quantize.default: _launcher("integer", "int_quantize"),
    torch.ops.fxpress.int_gelu_scale.default: _launcher("integer", "int_gelu_scale"),
    torch.ops.fxpress.int_softmax.default: _launcher("integer", "int_softmax"),
    torch.ops.fxpress.int_gelu.default: _launcher("integer", "int_gelu"),
    torch.ops.fxpress.int_layer_norm.default: _launcher("integer", "int_layer_norm"),
    torch.ops.fxpress.lut_linear.default: _launcher("lut", "lut_linear"),
}


def lower_op(kernel: Kernel, nodes: dict[str, fx.Node]) -> TritonKernel | str:
    """A launch of the op's kernel, or why the op keeps its reference implementation."""
    (node,) = [nodes[n] for n in kernel.nodes]
    lower = OP_KERNELS.get(node.target)
    return f"{node.target} has no Triton kernel" if lower is None else lower(kernel, node)
