"""Capture: the Dynamo graph becomes an ATen-level functional graph with frozen weights.

AOTAutograd traces the Dynamo graph with our decomposition table into a functional ATen graph
whose nodes carry FakeTensor ``meta["val"]``. Inputs the graph mutates (a StaticCache's K/V
buffers) are kept as inputs and written at the end by ``copy_`` (``keep_inference_input_mutations``),
so the user's cache is updated in place as in eager.

Dynamo hands parameters and buffers to the backend as graph inputs. Freezing maps each one back to
the module state it came from and turns it into a ``get_attr`` constant, so passes can read,
factorise and repack weights. The constant *is* the user's tensor (detached, same storage): a later
in-place weight update stays visible, and no copy of the model is made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fxpress.compiler.decompositions import DECOMPOSITIONS


@dataclass
class CapturedGraph:
    gm: fx.GraphModule
    runtime_inputs: tuple[int, ...]  # positions, in the flat call arguments, of gm's placeholders
    frozen: dict[str, str]  # get_attr name -> the module state it came from


def _source_name(placeholder: fx.Node) -> str | None:
    grapharg = placeholder.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


def _state_path(source: str) -> str | None:
    """``L['self']._modules['lm_head']._parameters['weight']`` -> ``lm_head.weight``; None when
    the source is not a module's parameter or buffer."""
    if "._parameters[" not in source and "._buffers[" not in source:
        return None
    keys = re.findall(r"\[['\"]([^'\"]+)['\"]\]", source)
    if keys and keys[0] == "self":
        keys = keys[1:]
    return ".".join(keys)


def _mutated_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    mutated = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for arg, spec in zip(node.args, schema.arguments):
            if spec.alias_info is not None and spec.alias_info.is_write and isinstance(arg, fx.Node):
                mutated.add(arg)
    return mutated


def _dynamo_state_paths(dynamo_gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[str | None]:
    """Per graph input, the module state it is (``layers.0.weight``, or the source's own name for a
    parameter Dynamo reached otherwise), or None for a runtime input."""
    paths = []
    for source_node, value in zip((n for n in dynamo_gm.graph.nodes if n.op == "placeholder"), example_inputs):
        source = _source_name(source_node)
        path = _state_path(source) if source else None
        if path is None and isinstance(value, torch.nn.Parameter):
            path = source or source_node.name
        paths.append(path)
    return paths


def _flatten_subclasses(paths: Sequence[str | None], values: Sequence[Any]) -> tuple[list[str | None], list[Any]]:
    """Each tensor subclass input (a DTensor parameter) in the order AOTAutograd desugars it: its
    inner values by ``__tensor_flatten__``, recursively. The first inner tensor keeps the state
    path, so a DTensor weight freezes as its local shard; the others (its DeviceMesh) stay inputs."""
    flat_paths: list[str | None] = []
    flat_values: list[Any] = []

    def visit(path: str | None, value: Any) -> None:
        if not is_traceable_wrapper_subclass(value):
            flat_paths.append(path)
            flat_values.append(value)
            return
        attrs, _ = value.__tensor_flatten__()
        for attr in attrs:
            inner = getattr(value, attr)
            visit(path if isinstance(inner, torch.Tensor) else None, inner)
            path = None

    for path, value in zip(paths, values):
        visit(path, value)
    return flat_paths, flat_values


def _freeze(aten_gm: fx.GraphModule, paths: Sequence[str | None], detached: Sequence[Any]) -> CapturedGraph:
    """Inputs with a state path become ``get_attr`` constants, unless the graph writes them."""
    aten_inputs = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if len(aten_inputs) != len(paths):
        raise RuntimeError(
            f"capture: AOTAutograd produced {len(aten_inputs)} inputs for {len(paths)} "
            "graph inputs; fxpress cannot map weights back"
        )
    mutated = _mutated_inputs(aten_gm)
    runtime_inputs, frozen = [], {}
    for index, (node, path, value) in enumerate(zip(aten_inputs, paths, detached)):
        if path is None or not isinstance(value, torch.Tensor) or node in mutated:
            runtime_inputs.append(index)
            continue
        attr = re.sub(r"\W", "_", path)
        while hasattr(aten_gm, attr):
            attr += "_"
        # A non-persistent buffer: get_attr-visible, not part of any state_dict.
        aten_gm.register_buffer(attr, value, persistent=False)
        with aten_gm.graph.inserting_before(node):
            constant = aten_gm.graph.get_attr(attr)
        constant.meta.update(node.meta)
        node.replace_all_uses_with(constant)
        aten_gm.graph.erase_node(node)
        frozen[attr] = path
    aten_gm.recompile()
    return CapturedGraph(aten_gm, tuple(runtime_inputs), frozen)


def capture_and_compile(
    dynamo_gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    lower: Callable[[CapturedGraph], Callable[[list[Any]], Any]],
) -> Callable[..., Any]:
    """Trace to ATen, freeze weights, hand the graph to ``lower``; return AOTAutograd's callable.

    ``lower`` returns a boxed callable taking the full flat argument list. Tracing happens with
    autograd off: fxpress compiles inference graphs.
    """

    # Detached here, outside AOTAutograd's FakeTensorMode, which would turn them into fakes.
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in example_inputs]

    paths = _dynamo_state_paths(dynamo_gm, example_inputs)
    if len(paths) != len(example_inputs):
        raise RuntimeError(f"capture: {len(paths)} graph inputs for {len(example_inputs)} example inputs")
    paths, detached = _flatten_subclasses(paths, detached)

    def forward_compiler(aten_gm: fx.GraphModule, fake_inputs: Sequence[Any]) -> Callable:
        return lower(_freeze(aten_gm, paths, detached))

    with torch.no_grad():
        return aot_module_simplified(
            dynamo_gm,
            list(example_inputs),
            fw_compiler=forward_compiler,
            decompositions=DECOMPOSITIONS,
            keep_inference_input_mutations=True,
        )


def capture_module(
    gm: fx.GraphModule,
    user_inputs: Sequence[Any],
    lower: Callable[[CapturedGraph], Callable[[list[Any]], Any]],
) -> Callable[..., Any]:
    """The same for a module that holds its own weights (an exported program's): AOTAutograd passes
    its parameters, then its buffers, ahead of ``user_inputs``; those are frozen by name."""
    state = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    paths = list(state) + [None] * len(user_inputs)
    detached = [t.detach() for t in state.values()] + list(user_inputs)

    def forward_compiler(aten_gm: fx.GraphModule, fake_inputs: Sequence[Any]) -> Callable:
        return lower(_freeze(aten_gm, paths, detached))

    with torch.no_grad():
        return aot_module_simplified(gm, list(user_inputs), fw_compiler=forward_compiler,
                                     decompositions=DECOMPOSITIONS, keep_inference_input_mutations=True)
