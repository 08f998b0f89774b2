"""The program a compiled graph becomes: a generated wrapper module, loaded once.

Every target runs the same schedule and memory plan through a wrapper. On the cpu target each
kernel runs with torch's own kernels (fxpress ops with their reference implementations), writing
into its arena slot; on the triton target, kernels the emitter can generate run as Triton kernels
(on CUDA, or under ``TRITON_INTERPRET=1`` on CPU) and the rest as on the cpu target.

Wrapper modules are written to ``FXPRESS_CACHE_DIR/wrappers/<content hash>.py`` and imported from
there: Triton reads kernel source through ``inspect``, and a file makes tracebacks readable.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxpress.codegen.schedule import Schedule
from fxpress.codegen.triton_pointwise import TritonKernel
from fxpress.codegen.wrapper import emit_wrapper
from fxpress.compiler import flags
from fxpress.passes.plan_memory import MemoryPlan


def load_wrapper(source: str, constants: dict[str, torch.Tensor], kv_handles: dict[int, int] | None = None) -> Any:
    """Import a wrapper module. ``kv_handles`` maps the KV-state handles written in its source to
    the states of this process (a loaded artifact makes new ones)."""
    folder = Path(flags.CACHE_DIR.get()) / "wrappers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"w{hashlib.sha256(source.encode()).hexdigest()[:20]}.py"
    if not path.exists():
        partial = path.with_suffix(".partial")
        partial.write_text(source)
        partial.replace(path)  # atomic: a concurrent compile never reads half a file
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    module.CONSTANTS = constants
    module.KV_HANDLES = kv_handles or {}
    spec.loader.exec_module(module)
    return module


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
