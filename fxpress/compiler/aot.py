"""Ahead-of-time compiles: ``fxpress.aot_compile`` writes an artifact (``fxpress.load`` runs it:
``fxpress.compiler.load``).

    fxpress.aot_compile(model, (x,), "minilm.fxpress", target="cpu")
    model = fxpress.load("minilm.fxpress")     # no export, no passes, no codegen: checks, then runs
    y = model(x)

The model is exported with torch.export, lowered by the same pipeline as torch.compile, and
written as text and safetensors (``fxpress.compiler.artifact``): the constants as the passes left
them (packed weights, low-rank factors), the initial value of the state the graph writes (a
StaticCache's buffers) and the layout of its compressed KV state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpress.compiler import artifact, graph_json
from fxpress.compiler.capture import CapturedGraph, capture_module
from fxpress.core.errors import UnsupportedGraphError
from fxpress.core.progress import stage_bar
from fxpress.compiler.export import ExportedModel, export_model
from fxpress.compiler.lower import Lowered, lower_captured
from fxpress.codegen.targets import get_target
from fxpress.ir.options import Options
from fxpress.compiler.pipeline import build_pipeline
from fxpress.compiler.report import GraphReport
from fxpress.kv import graph_state
from fxpress.ops import op_spec

Progress = Callable[[str], None]


# compile -------------------------------------------------------------------------------------------

def aot_compile(model: torch.nn.Module, example_args: tuple[Any, ...], path: str | Path,
                dynamic_shapes: Any = None, *, example_kwargs: dict[str, Any] | None = None,
                progress: Progress | None = None, **options: Any) -> Path:
    """Export ``model`` on the example inputs, compile it with ``options`` (those of
    ``fxpress.backend``) and write the artifact folder ``path``. ``dynamic_shapes`` is
    torch.export's. Returns the path."""
    opts = Options.create(**options)
    get_target(opts.target)  # refuses an unknown target before any work
    passes = build_pipeline(opts)
    if not isinstance(example_args, tuple):
        raise TypeError(f"fxpress.aot_compile: example_args must be a tuple of inputs, got {type(example_args).__name__}")
    bar = None if progress is not None else stage_bar("aot_compile", 3)
    try:
        return _compile(model, example_args, Path(path), dynamic_shapes, example_kwargs, progress or bar or
                        (lambda stage: None), opts, passes)
    finally:
        if bar is not None:
            bar.close()


def _compile(model: torch.nn.Module, example_args: tuple[Any, ...], folder: Path, dynamic_shapes: Any,
             example_kwargs: dict[str, Any] | None, step: Progress, opts: Options,
             passes: tuple[tuple[str, Callable[..., Any]], ...]) -> Path:
    step("export")
    _refuse_sharded(model)
    exported = export_model(model, example_args, example_kwargs, dynamic_shapes)
    for name, value in zip(exported.input_names, exported.user_inputs):
        if not isinstance(value, torch.Tensor):
            raise UnsupportedGraphError(f"fxpress.aot_compile: input {name} is a {type(value).__name__}; "
                                        "artifacts take tensor inputs only")
    step("capture and passes")
    report = GraphReport(index=0, target=opts.target)  # lowering resolves "auto"
    lowered: dict[str, Any] = {}

    def lower(captured: CapturedGraph) -> Callable[[list[Any]], Any]:
        lowered["captured"], lowered["lowered"] = captured, lower_captured(captured, opts, passes, report, None)
        return lowered["lowered"].program

    capture_module(exported.gm, exported.user_inputs, lower)
    step("write")
    state_names = list({**dict(exported.gm.named_parameters(remove_duplicate=False)),
                        **dict(exported.gm.named_buffers(remove_duplicate=False))})
    _write(folder, exported, lowered["captured"], lowered["lowered"], report, opts, passes, state_names,
           list(example_kwargs or {}), dynamic_shapes)
    return folder


def _refuse_sharded(model: torch.nn.Module) -> None:
    """An artifact holds one process's program and weights: a tensor-parallel model (DTensor
    state, its collectives bound to this run's process group) cannot be one."""
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        if is_traceable_wrapper_subclass(value):
            raise UnsupportedGraphError(
                f"fxpress.aot_compile: {name} is a {type(value).__name__}: tensor-parallel (or other "
                "tensor-subclass) models compile with torch.compile(backend='fxpress') on each rank, "
                "but cannot be saved as artifacts")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"class": type(value).__name__, "fields": {f.name: _jsonable(getattr(value, f.name))
                                                          for f in dataclasses.fields(value)}}
    return repr(value)


def _pass_sources_hash(passes: tuple[tuple[str, Callable[..., Any]], ...]) -> str:
    digest = hashlib.sha256()
    for name, fn in passes:
        module = inspect.getmodule(fn)
        try:
            source = inspect.getsource(module) if module is not None else inspect.getsource(fn)
        except (OSError, TypeError):
            source = repr(fn)
        digest.update(name.encode() + b"\0" + source.encode())
    return digest.hexdigest()


def _input_spec(name: str, value: torch.Tensor) -> dict[str, Any]:
    shape = [str(s.node.expr) if isinstance(s, torch.SymInt) else int(s) for s in value.shape]
    return {"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": shape}


def _symbol_examples(values: list[Any]) -> dict[str, int]:
    """An example size per symbolic dimension (what ``fxpress run`` feeds)."""
    examples = {}
    for value in values:
        for size in value.shape:
            if isinstance(size, torch.SymInt):
                examples[str(size.node.expr)] = int(size.node.hint) if size.node.has_hint() else 1
    return examples


def _dim_names(exported: ExportedModel, dynamic_shapes: Any) -> dict[str, str]:
    """``{symbol: name}`` for each dynamic dimension declared with a ``torch.export.Dim``, so that
    ``fxpress inspect`` and ``fxpress run --size`` speak of ``seq``, not ``s70``. Dynamic shapes
    given per input in order (a tuple or list) or by keyword name (a dict) are understood."""
    if dynamic_shapes is None:
        return {}
    by_name = isinstance(dynamic_shapes, dict)
    names = {}
    for position, (name, value) in enumerate(zip(exported.input_names, exported.user_inputs)):
        if by_name:
            spec = dynamic_shapes.get(name)
        else:
            spec = dynamic_shapes[position] if position < len(dynamic_shapes) else None
        dims = spec.items() if isinstance(spec, dict) else enumerate(spec) if isinstance(spec, (list, tuple)) else ()
        for index, dim in dims:
            size = value.shape[index] if isinstance(value, torch.Tensor) and index < value.dim() else None
            label = getattr(dim, "__name__", None)
            if isinstance(size, torch.SymInt) and isinstance(label, str):
                names.setdefault(str(size.node.expr), label)
    return names


def _kv_states(final: fx.GraphModule) -> list[dict[str, Any]]:
    """The layout of each compressed KV state the graph's stateful ops (``kv_attend``) reach."""
    records = []
    for node in final.graph.nodes:
        spec = op_spec(node.target) if node.op == "call_function" else None
        if spec is not None and spec.state_handle is not None:
            state = graph_state.state(node.args[spec.state_handle])
            records.append({"handle": state.handle, "policy": _jsonable(state.policy), "layer": state.layer,
                            "max_len": state.max_len, "where": state.where})
    return records


def _constants(final: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Tensors to store, and per constant its stored key and layout. Constants sharing memory (a
    tied embedding) are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for node in final.graph.nodes:
        if node.op != "get_attr" or node.target in records:
            continue
        value = getattr(final, node.target)
        if not isinstance(value, torch.Tensor):
            raise UnsupportedGraphError(f"constant {node.target} is a {type(value).__name__}, not a tensor")
        identity = (value.data_ptr(), value.dtype, tuple(value.shape), tuple(value.stride()), value.storage_offset())
        key = seen.get(identity) if value.numel() else None
        if key is None:
            key = seen[identity] = f"const/{node.target}"
            tensors[key] = value.detach().contiguous().cpu()
        records[node.target] = {"key": key, "size": list(value.shape), "stride": list(value.stride())}
    return tensors, records


def _write(folder: Path, exported: ExportedModel, captured: CapturedGraph, lowered: Lowered, report: GraphReport,
           opts: Options, passes: tuple[tuple[str, Callable[..., Any]], ...], state_names: list[str],
           kwarg_names: list[str], dynamic_shapes: Any) -> None:
    from safetensors.torch import save

    final, program = lowered.final, lowered.program
    n_state = len(state_names)
    outputs = next(n for n in final.graph.nodes if n.op == "output").args[0]
    if len(outputs) != exported.out_spec.num_leaves:
        raise UnsupportedGraphError(f"the compiled graph returns {len(outputs)} values for the model's "
                                    f"{exported.out_spec.num_leaves} outputs (an output aliasing an input?)")
    tensors, constants = _constants(final)
    runtime = []
    for index in captured.runtime_inputs:
        if index < n_state:  # state the graph writes: the artifact keeps its initial value
            name = state_names[index]
            tensors[f"state/{name}"] = exported.gm.get_buffer(name).detach().contiguous().cpu()
            runtime.append(["state", name])
        else:
            runtime.append(["input", index - n_state])
    device = next((str(n.meta["val"].device) for n in final.graph.nodes
                   if isinstance(n.meta.get("val"), torch.Tensor)), "cpu")
    files = {
        "graph.txt": final.code.encode(),
        "graph.json": json.dumps(graph_json.dump(final, lowered.plan.hints)).encode(),
        "wrapper.py": program.source.encode(),
        "plan.json": json.dumps(lowered.plan.to_dict(), indent=1).encode(),
        "weights.safetensors": save(tensors),
    }
    files.update({f"kernels/{name}.py": kernel.source.encode()
                  for name, kernel in program.generated.items() if kernel.source})
    meta = {
        "target": report.target,
        "device": device,
        "options": {f.name: _jsonable(getattr(opts, f.name)) for f in dataclasses.fields(opts)},
        "pass_sources_sha256": _pass_sources_hash(passes),
        "passes": [{"name": r.name, "modified": r.modified, "seconds": round(r.seconds, 4), "counters": r.counters}
                   for r in report.passes],
        "ops": report.ops_after,
        "plan": report.plan,
        "kernels": [{"name": name, "kind": kind, "nodes": list(nodes), "generated": name in program.generated,
                     "why_not_generated": program.not_generated.get(name)} for name, kind, nodes in report.kernels],
        "inputs": [_input_spec(n, v) for n, v in zip(exported.input_names, exported.user_inputs)],
        "symbols": _symbol_examples(exported.user_inputs),
        "dim_names": _dim_names(exported, dynamic_shapes),
        "kwargs": kwarg_names,
        "in_spec": pytree.treespec_dumps(exported.in_spec),
        "out_spec": pytree.treespec_dumps(exported.out_spec),
        "runtime_inputs": runtime,
        "constants": constants,
        "kv_states": _kv_states(final),
    }
    artifact.write_files(folder, files, meta)
