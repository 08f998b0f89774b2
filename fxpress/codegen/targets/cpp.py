"""The cpp target: fxpress ops run C++ kernels built at run time (their ``"cpp"`` launchers, in
``fxpress/ops/cpp/``), loaded with ctypes and run on torch's intra-op thread count with OpenMP; every
other kernel runs as the cpu target runs it (torch calls, row reductions in row blocks).

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
from fxpress.codegen.targets.op_launch import launch_op
from fxpress.codegen.targets.registry import graph_devices
from fxpress.core.errors import UnsupportedGraphError
from fxpress.native import build


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

    def lower(self, kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel | str | None:
        if kernel.kind == "op":
            return launch_op(kernel, nodes, self.name)
        return None  # pointwise runs and reductions run as on the cpu target
