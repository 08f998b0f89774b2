"""torch.export as the way in for ahead-of-time compiles.

``torch.export`` traces the whole model into one graph (no graph breaks, no guards left to check
at run time) with its inputs and outputs as pytrees. The unlifted module it gives back holds the
model's weights as attributes; fxpress then captures it exactly as it captures a Dynamo graph
(AOTAutograd, the same decompositions, weights frozen by name), so the pipeline sees the same
graphs either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpress.core.errors import UnsupportedGraphError


@dataclass
class ExportedModel:
    gm: fx.GraphModule  # flat inputs and outputs; the weights are its attributes
    user_inputs: list[Any]  # flat example inputs (fake with symbolic sizes where shapes are dynamic)
    input_names: list[str]  # ``input_ids``, ``args[0]``, ``args[1]['mask']``: how errors name them
    in_spec: pytree.TreeSpec  # of ``(args, kwargs)``
    out_spec: pytree.TreeSpec


def _name(path: tuple[Any, ...]) -> str:
    """A flat input's path in ``(args, kwargs)`` as the user wrote it: ``args[0]``, ``input_ids``."""
    if path[0].idx == 0:
        return "args" + pytree.keystr(path[1:])
    return str(path[1].key) + pytree.keystr(path[2:])


def _tensor_attributes_as_buffers(gm: fx.GraphModule) -> None:
    """Export lifts some module state to plain tensor attributes (a StaticCache's length counter);
    as buffers they are frozen, or fed as state when the graph writes them, like any other."""
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    params = dict(gm.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in buffers or node.target in params:
            continue
        owner_path, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, attr)
        if isinstance(value, torch.Tensor):
            delattr(owner, attr)
            owner.register_buffer(attr, value, persistent=False)
            buffers[node.target] = value


def _one_name_per_tensor(gm: fx.GraphModule) -> None:
    """A tensor reachable under two names (tied embeddings; a cache buffer the wrapper module and
    the cache both hold) keeps its first: AOTAutograd passes it once, and inputs map to names."""
    first: dict[int, str] = {}
    renamed: dict[str, str] = {}
    for name, value in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if id(value) in first:
            renamed[name] = first[id(value)]
        else:
            first[id(value)] = name
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in renamed:
            node.target = renamed[node.target]
    for name in renamed:
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path)
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
    gm.recompile()


def export_model(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
                 dynamic_shapes: Any = None) -> ExportedModel:
    kwargs = kwargs or {}
    try:
        with torch.no_grad():
            program = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # export's own message says which line of the model it could not trace
        raise UnsupportedGraphError(f"torch.export could not export {type(model).__name__}: "
                                    f"{type(e).__name__}: {e}") from e
    gm = program.module()
    # Export's input guards (a submodule) and dtype/device asserts: the artifact checks its inputs
    # itself, and an assert left in would run as a kernel on every call.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" or \
                node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    _tensor_attributes_as_buffers(gm)
    _one_name_per_tensor(gm)
    gm.graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs; the pytree specs are kept here
    gm.recompile()
    flat, _ = pytree.tree_flatten_with_path((tuple(args), kwargs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat):
        raise UnsupportedGraphError(f"the exported graph takes {len(placeholders)} inputs for {len(flat)} "
                                    "example inputs (an input the model ignores, or a non-tensor one?)")
    if dynamic_shapes is None:
        user_inputs = [value for _, value in flat]
    else:
        user_inputs = [node.meta["val"] for node in placeholders]
    return ExportedModel(gm, user_inputs, [_name(path) for path, _ in flat], program.call_spec.in_spec,
                         program.call_spec.out_spec)
