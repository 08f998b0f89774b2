"""The program a compiled graph becomes: a generated wrapper module, loaded once.

Every target runs the same schedule and memory plan through a wrapper. On the cpu target each
kernel runs with torch's own kernels (fxpress ops with their reference implementations), writing
into its arena slot; on the triton target, kernels the emitter can generate run as Triton kernels
(on CUDA, or under ``TRITON_INTERPRET=1`` on CPU) and the rest as on the cpu target.

Wrapper modules run from the source generated here; a readable copy is kept in the cache folder
(``fxpress.runtime.wrapper_cache``), never imported from it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxpress.codegen.schedule import Schedule
from fxpress.codegen.triton_pointwise import TritonKernel
from fxpress.codegen.wrapper import emit_wrapper
from fxpress.passes.plan_memory import MemoryPlan
from fxpress.runtime.wrapper_cache import load_module


def load_wrapper(source: str, constants: dict[str, torch.Tensor], kv_handles: dict[int, int] | None = None) -> Any:
    """Run a wrapper module from its source. ``kv_handles`` maps the KV-site handles written in its
    source to the sites of this process (a loaded artifact's)."""
    return load_module(source, {"CONSTANTS": constants, "KV_HANDLES": kv_handles or {}})


class WrapperProgram:
    """A boxed callable (AOTAutograd's calling convention): takes the flat argument list and
    clears it, so inputs can be freed as soon as the graph is done with them."""

    _boxed_call = True

    def __init__(self, gm: fx.GraphModule, schedule: Schedule, plan: MemoryPlan,
                 runtime_inputs: tuple[int, ...], title: str,
                 triton_kernels: dict[str, TritonKernel] | None = None) -> None:
        constants = {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        self.triton_kernels = triton_kernels or {}
        self.source = emit_wrapper(gm, schedule, plan, title, self.triton_kernels)
        self._call = load_wrapper(self.source, constants).call
        self.runtime_inputs = runtime_inputs
        self.not_generated: dict[str, str] = {}  # kernel -> why it runs as torch calls

    def __call__(self, args: list[Any]) -> Any:
        inputs = [args[i] for i in self.runtime_inputs]
        args.clear()
        with torch.no_grad():
            return self._call(inputs)
