"""The cpp target: C++ kernels built at run time, loaded with ctypes and run on torch's intra-op
thread count with OpenMP. fxpress ops run their hand-written kernels (their ``"cpp"`` launchers, in
``fxpress/ops/cpp/``); fused pointwise runs and row reductions run kernels generated here
(``pointwise.py``, ``reduction.py``) when their ops and dtypes have a C++ form
(``expressions.py``); ATen's CPU attention calls run a C++ attention kernel (``attention.py``);
Linears against frozen weights run MKL's GEMM on a packed copy of the weight (``gemm.py``);
every other kernel runs as the cpu target runs it (torch calls, row
reductions in row blocks), and explain() says why.

It needs a C++ compiler (``FXPRESS_CXX``, default ``g++``) with OpenMP. ``target="auto"`` picks it
for CPU graphs when that compiler builds a probe library, and otherwise runs the cpu target and
says why in ``explain()``; asking for ``target="cpp"`` without a working compiler is an
``UnsupportedGraphError`` naming the compiler, so the graph runs eagerly with that reason.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets.base import GeneratedKernel, Target
from fxpress.codegen.targets.cpp.attention import attention_refusal, emit_attention, is_attention
from fxpress.codegen.targets.cpp.gemm import packed_gemm
from fxpress.codegen.targets.cpp.pointwise import emit_pointwise, pointwise_refusal
from fxpress.codegen.targets.cpp.reduction import RowKernel, reduction_refusal
from fxpress.codegen.targets.op_launch import launch_op
from fxpress.codegen.targets.registry import graph_devices
from fxpress.core.errors import UnsupportedGraphError
from fxpress.native import build
from fxpress.passes.split_linear_bias import split_linear_bias


class CppTarget(Target):
    name = "cpp"
    auto_rank = 5  # above cpu (0), for graphs on the CPU when a compiler works

    def runs_devices(self, devices: frozenset[str]) -> bool:
        return devices == {"cpu"}

    def auto_refusal(self) -> str | None:
        return build.compiler_refusal()

    def check_graph(self, gm: fx.GraphModule) -> None:
        devices = graph_devices(gm)
        if devices != {"cpu"}:
            raise UnsupportedGraphError(f"target='cpp' runs CPU tensors; this graph has {sorted(devices)}")
        refusal = build.compiler_refusal()
        if refusal is not None:
            raise UnsupportedGraphError(f"target='cpp' cannot build its kernels: {refusal}")

    def device_refusal(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"runs C++ kernels on CPU tensors, not {device.type}"
        refusal = build.compiler_refusal()
        return None if refusal is None else f"cannot build its C++ kernels here: {refusal}"

    def prepare_graph(self, gm: fx.GraphModule) -> None:
        split_linear_bias(gm)  # a Linear's bias added in the generated kernel that reads its output

    def lower(self, kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel | str | None:
        if kernel.kind == "op":
            return launch_op(kernel, nodes, self.name)
        if kernel.kind == "reduction":
            return reduction_refusal(kernel, nodes) or RowKernel(kernel, nodes).emit()
        if kernel.kind == "pointwise":
            return pointwise_refusal(kernel, nodes) or emit_pointwise(kernel, nodes)
        if kernel.kind == "extern" and is_attention(kernel, nodes):
            return attention_refusal(kernel, nodes) or emit_attention(kernel, nodes)
        if kernel.kind == "extern":
            return packed_gemm(kernel, nodes)  # a Linear against a frozen weight, or None
        return None
