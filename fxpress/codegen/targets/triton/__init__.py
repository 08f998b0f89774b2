"""The triton target: generated Triton kernels for fused pointwise runs and row reductions, the
ops' hand-written Triton kernels (their ``"triton"`` launchers), torch calls for the rest.

Its kernels run on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets.base import GeneratedKernel, Target
from fxpress.codegen.targets.op_launch import launch_op
from fxpress.codegen.targets.registry import graph_devices
from fxpress.codegen.targets.triton.pointwise import emit_pointwise, pointwise_kernel_refusal
from fxpress.codegen.targets.triton.reduction import emit_reduction, reduction_refusal
from fxpress.core import flags
from fxpress.core.errors import UnsupportedGraphError


class TritonTarget(Target):
    name = "triton"
    auto_rank = 10  # target="auto" on a graph whose tensors are all on CUDA

    def runs_devices(self, devices: frozenset[str]) -> bool:
        return devices == {"cuda"}

    def check_graph(self, gm: fx.GraphModule) -> None:
        devices = graph_devices(gm)
        if devices - {"cuda"} and not flags.TRITON_INTERPRET.get():
            raise UnsupportedGraphError(
                f"target='triton' needs CUDA tensors (this graph has {sorted(devices)}); set "
                "TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter on CPU")

    def device_refusal(self, device: torch.device) -> str | None:
        if device.type == "cpu" and not flags.TRITON_INTERPRET.get():
            return ("runs Triton kernels on CPU tensors: set TRITON_INTERPRET=1 to run them in Triton's "
                    "interpreter, or compile it with target='cpu'")
        return None

    def lower(self, kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel | str:
        if kernel.kind == "op":
            return launch_op(kernel, nodes, self.name)
        if kernel.kind == "reduction":
            return reduction_refusal(kernel, nodes) or emit_reduction(kernel, nodes)
        if kernel.kind == "pointwise":
            return pointwise_kernel_refusal(kernel, nodes) or emit_pointwise(kernel, nodes)
        return f"{kernel.kind} kernels are not generated yet"

    def preamble(self) -> tuple[str, ...]:
        return ("import triton", "import triton.language as tl")
