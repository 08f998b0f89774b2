"""Running compiled graphs: the program each target builds from a scheduled, planned graph."""

from __future__ import annotations

from typing import Any, Callable

from fxpress.runtime.cpu import CpuProgram

TARGET_PROGRAMS: dict[str, Callable[..., Callable[[list[Any]], Any]]] = {
    "cpu": CpuProgram,
}


def build_program(gm, schedule, plan, runtime_inputs, target: str, title: str) -> Callable:
    return TARGET_PROGRAMS[target](gm, schedule, plan, runtime_inputs, title)
