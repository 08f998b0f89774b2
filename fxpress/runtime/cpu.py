"""The cpu target: the generated wrapper runs each kernel with torch's own kernels.

Every ATen op runs as in eager and every ``fxpress::*`` op runs its reference implementation, each
writing its result into the buffer the memory plan gave it. The program is correct on any graph
the backend accepts, on whatever device the tensors live.
"""

from __future__ import annotations

import linecache
from typing import Any

import torch
import torch.fx as fx

from fxpress.codegen.schedule import Schedule
from fxpress.codegen.wrapper import emit_wrapper
from fxpress.passes.plan_memory import MemoryPlan


def load_wrapper(source: str, constants: dict[str, torch.Tensor], filename: str) -> dict[str, Any]:
    """Execute generated wrapper source; registered with linecache so tracebacks show it."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"CONSTANTS": constants, "__name__": filename}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


class CpuProgram:
    """A boxed callable (AOTAutograd's calling convention): takes the flat argument list and
    clears it, so inputs can be freed as soon as the graph is done with them."""

    _boxed_call = True

    def __init__(self, gm: fx.GraphModule, schedule: Schedule, plan: MemoryPlan,
                 runtime_inputs: tuple[int, ...], title: str) -> None:
        constants = {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        self.source = emit_wrapper(gm, schedule, plan, title)
        self._call = load_wrapper(self.source, constants, f"<fxpress wrapper: {title}>")["call"]
        self.runtime_inputs = runtime_inputs

    def __call__(self, args: list[Any]) -> Any:
        inputs = [args[i] for i in self.runtime_inputs]
        args.clear()
        with torch.no_grad():
            return self._call(inputs)
