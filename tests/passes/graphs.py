"""Capture a function to the ATen graph passes see, without running any pass."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from fxpress.compiler.capture import CapturedGraph, capture_and_compile


def capture(fn: Callable[..., Any], *args: Any) -> CapturedGraph:
    """The frozen ATen graph of ``fn(*args)`` as the pipeline receives it."""
    seen: list[CapturedGraph] = []

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Callable:
        def lower(captured: CapturedGraph) -> Callable:
            seen.append(captured)

            def run_graph_module(args: list) -> Any:
                inputs = [args[i] for i in captured.runtime_inputs]
                args.clear()
                return captured.gm(*inputs)

            run_graph_module._boxed_call = True
            return run_graph_module

        return capture_and_compile(gm, example_inputs, lower)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (captured,) = seen
    return captured


def run(captured: CapturedGraph, *args: Any) -> Any:
    with torch.no_grad():
        return captured.gm(*args)
