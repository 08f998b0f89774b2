"""Capture a function to the ATen graph passes see, without running any pass."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from fxpress.compiler.capture import CapturedGraph, capture_and_compile
from fxpress.runtime import build_program


def capture(fn: Callable[..., Any], *args: Any) -> CapturedGraph:
    """The frozen ATen graph of ``fn(*args)`` as the pipeline receives it."""
    seen: list[CapturedGraph] = []

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Callable:
        def lower(captured: CapturedGraph) -> Callable:
            seen.append(captured)
            return build_program(captured.gm, captured.runtime_inputs, "cpu")

        return capture_and_compile(gm, example_inputs, lower)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (captured,) = seen
    return captured


def run(captured: CapturedGraph, *args: Any) -> Any:
    with torch.no_grad():
        return captured.gm(*args)
