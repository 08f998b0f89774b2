"""The cpu target: run the rewritten ATen graph with torch's own kernels.

Every ATen op runs as in eager and every ``fxpress::*`` op runs its reference implementation, so
the result is correct on any graph the backend accepts, on whatever device the tensors live.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


class CpuProgram:
    """A boxed callable (AOTAutograd's calling convention): takes the flat argument list and
    clears it, so inputs can be freed as soon as the graph is done with them."""

    _boxed_call = True

    def __init__(self, gm: fx.GraphModule, runtime_inputs: tuple[int, ...]) -> None:
        self.gm = gm
        self.runtime_inputs = runtime_inputs

    def __call__(self, args: list[Any]) -> Any:
        inputs = [args[i] for i in self.runtime_inputs]
        args.clear()
        with torch.no_grad():
            return self.gm(*inputs)
