"""The program a compiled graph becomes: the target's kernels, a generated wrapper module, loaded once.

Every target runs the same schedule and memory plan through a wrapper. Kernels the target
generates code for run that code; the rest run with torch's own kernels (fxpress ops with their
reference implementations), writing into their arena slots.

Wrapper modules run from the source generated here; a readable copy is kept in the cache folder
(``fxpress.runtime.wrapper_cache``), never imported from it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxpress.codegen.plan_memory import MemoryPlan
from fxpress.codegen.schedule import Schedule
from fxpress.codegen.targets import GeneratedKernel, Target
from fxpress.codegen.wrapper import emit_wrapper
from fxpress.runtime.cuda_graphs import CudaGraphRunner
from fxpress.runtime.wrapper_cache import load_wrapper


def generate_kernels(gm: fx.GraphModule, schedule: Schedule, target: Target
                     ) -> tuple[dict[str, GeneratedKernel], dict[str, str]]:
    """The target's code for the kernels it lowers, and why each kernel it refused stays torch calls."""
    target.check_graph(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    made, refused = {}, {}
    for kernel in schedule.kernels:
        if kernel.kind == "view":
            continue
        lowered = target.lower(kernel, nodes)
        if isinstance(lowered, str):
            refused[kernel.name] = lowered
        elif lowered is not None:
            made[kernel.name] = lowered
    return made, refused


def wrapper_source(gm: fx.GraphModule, schedule: Schedule, plan: MemoryPlan, title: str, target: Target
                   ) -> tuple[str, dict[str, GeneratedKernel], dict[str, str]]:
    """The wrapper module's source, the generated kernels in it, and why the others were not generated."""
    generated, refused = generate_kernels(gm, schedule, target)
    return emit_wrapper(gm, schedule, plan, title, generated, target.preamble()), generated, refused


class WrapperProgram:
    """A boxed callable (AOTAutograd's calling convention): takes the flat argument list and
    clears it, so inputs can be freed as soon as the graph is done with them. With ``cuda_graphs``
    each input layout is captured once and replayed (``fxpress.runtime.cuda_graphs``)."""

    _boxed_call = True

    def __init__(self, gm: fx.GraphModule, schedule: Schedule, plan: MemoryPlan,
                 runtime_inputs: tuple[int, ...], title: str, target: Target, cuda_graphs: bool = False) -> None:
        constants = {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        self.source, self.generated, self.not_generated = wrapper_source(gm, schedule, plan, title, target)
        module = load_wrapper(self.source, constants)
        self._call = CudaGraphRunner(module.call, module._arenas, title) if cuda_graphs else module.call
        self.runtime_inputs = runtime_inputs

    def __call__(self, args: list[Any]) -> Any:
        inputs = [args[i] for i in self.runtime_inputs]
        args.clear()
        with torch.no_grad():
            return self._call(inputs)
