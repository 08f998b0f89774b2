"""Running compiled graphs: target selection and the programs each target builds."""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

from fxpress.runtime.cpu import CpuProgram

TARGET_PROGRAMS: dict[str, Callable[[fx.GraphModule, tuple[int, ...]], Callable[[list[Any]], Any]]] = {
    "cpu": CpuProgram,
}


def build_program(gm: fx.GraphModule, runtime_inputs: tuple[int, ...], target: str) -> Callable:
    return TARGET_PROGRAMS[target](gm, runtime_inputs)
