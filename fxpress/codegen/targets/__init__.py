"""The targets a compiled graph can run on, by name; ``cpu``, ``cpp`` and ``triton`` are built in.

    from fxpress.codegen.targets import Target, register_target
    register_target(MyTarget())          # then fxpress.backend(target="mine")
"""

from fxpress.codegen.targets.base import GeneratedKernel, Target
from fxpress.codegen.targets.cpp import CppTarget
from fxpress.codegen.targets.cpu import CpuTarget
from fxpress.codegen.targets.registry import (get_target, graph_devices, register_target, resolve_target, target_names,
                                              unregister_target)
from fxpress.codegen.targets.triton import TritonTarget

register_target(CpuTarget())
register_target(CppTarget())
register_target(TritonTarget())

__all__ = ["GeneratedKernel", "Target", "get_target", "graph_devices", "register_target", "resolve_target",
           "target_names", "unregister_target"]
