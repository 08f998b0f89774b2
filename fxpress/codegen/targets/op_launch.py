"""How a target launches an fxpress op: the op's own :class:`~fxpress.ops.lowering.Launcher` for that
target, declared beside the op (``define_op(..., lowerings={target: Launcher(...)})``)."""

from __future__ import annotations

import torch.fx as fx

from fxpress.codegen.render import render
from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.ops import op_spec
from fxpress.ops.lowering import tensor_arguments


def schema_ordered_arguments(node: fx.Node) -> list:
    """Every argument of the op in schema order, keywords and defaults filled in: launchers take
    ``out`` after the op's last argument, so a graph that leaves trailing defaults out (an artifact
    saved before the op grew an argument) must not have ``out`` land in an optional's place."""
    arguments = list(node.args)
    for argument in node.target._schema.arguments[len(arguments):]:
        arguments.append(node.kwargs.get(argument.name, argument.default_value))
    return arguments


def launch_op(kernel: Kernel, nodes: dict[str, fx.Node], target: str) -> GeneratedKernel | str:
    """A call of the op's kernel for ``target``, or why the op keeps its reference implementation."""
    (node,) = [nodes[n] for n in kernel.nodes]
    spec = op_spec(node.target)
    launcher = spec.lowerings.get(target) if spec is not None else None
    if launcher is None:
        return f"{node.target} has no {target} kernel"
    reason = launcher.refuses(node)
    if reason is not None:
        return reason
    args = ", ".join([render(a) for a in schema_ordered_arguments(node)] + [node.name])
    return GeneratedKernel(kernel.name, "", tuple(a.name for a in tensor_arguments(node)), (node.name,),
                           launch=f"{launcher.function}({args})",
                           imports=(f"from {launcher.module} import {launcher.function}",))
