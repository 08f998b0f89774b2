"""Running compiled graphs: the program each target builds from a scheduled, planned graph."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpress.codegen.schedule import Schedule
from fxpress.codegen.triton_pointwise import TritonKernel, emit_pointwise, lowering_refusal
from fxpress.codegen.op_kernels import lower_op
from fxpress.codegen.triton_reduction import emit_reduction, reduction_refusal
from fxpress.compiler import flags
from fxpress.compiler.errors import UnsupportedGraphError
from fxpress.passes.plan_memory import MemoryPlan
from fxpress.runtime.program import WrapperProgram


def triton_kernels(gm: fx.GraphModule, schedule: Schedule) -> tuple[dict[str, TritonKernel], dict[str, str]]:
    """Generated kernels for the kernels the emitter can lower, and why the others stay torch."""
    nodes = {n.name: n for n in gm.graph.nodes}
    made, refused = {}, {}
    for kernel in schedule.kernels:
        if kernel.kind == "view":
            continue
        if kernel.kind == "op":
            lowered = lower_op(kernel, nodes)
            if isinstance(lowered, str):
                refused[kernel.name] = lowered
            else:
                made[kernel.name] = lowered
            continue
        if kernel.kind == "reduction":
            reason = reduction_refusal(kernel, nodes)
            emit = emit_reduction
        else:
            reason = lowering_refusal(kernel, nodes)
            emit = emit_pointwise
        if reason is None:
            made[kernel.name] = emit(kernel, nodes)
        else:
            refused[kernel.name] = reason
    return made, refused


def _check_triton_device(gm: fx.GraphModule) -> None:
    devices = {n.meta["val"].device.type for n in gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor)}
    if devices - {"cuda"} and not flags.TRITON_INTERPRET.get():
        raise UnsupportedGraphError(
            f"target='triton' needs CUDA tensors (this graph has {sorted(devices)}); set "
            "TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter on CPU")


def target_kernels(gm: fx.GraphModule, schedule: Schedule, target: str
                   ) -> tuple[dict[str, TritonKernel], dict[str, str]]:
    """The target's generated kernels, and why the kernels left to torch are not generated."""
    if target != "triton":
        return {}, {}
    _check_triton_device(gm)
    return triton_kernels(gm, schedule)


def build_program(gm: fx.GraphModule, schedule: Schedule, plan: MemoryPlan,
                  runtime_inputs: tuple[int, ...], target: str, title: str) -> WrapperProgram:
    kernels, refused = target_kernels(gm, schedule, target)
    program = WrapperProgram(gm, schedule, plan, runtime_inputs, title, kernels)
    program.not_generated = refused
    return program
