"""The wrapper emitter: a Python module whose ``call(args)`` runs a scheduled, planned graph.

The module checks its inputs, binds the size symbols from them, carves every planned buffer from
one arena (taken from a pool per call, so concurrent calls never share one, and kept for the
next call while the sizes stay the same; views of its buffers with fixed sizes are made with it),
runs the kernels in the plan's order
and returns the outputs. Each kernel's result is written straight into its slot through the op's
``.out`` overload (an fxpress op: its ``out_impl``) where one exists, else computed and copied in. The source is deterministic and
readable: a comment per kernel names it and the nodes it came from.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from fxpress.codegen.plan_memory import MemoryPlan
from fxpress.codegen.render import allocation, call, code, render
from fxpress.codegen.row_blocked import emit_row_blocked
from fxpress.codegen.schedule import Schedule
from fxpress.codegen.source_writer import SourceWriter
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.ops import op_spec
from fxpress.runtime.wrapper_support import out_variant


def _symbol_bindings(gm: fx.GraphModule) -> list[str]:
    bound: set[sympy.Symbol] = set()
    lines = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol) and value.node.expr not in bound:
            bound.add(value.node.expr)
            lines.append(f"{value.node.expr} = {node.name}")
        elif isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol) \
                        and size.node.expr not in bound:
                    bound.add(size.node.expr)
                    lines.append(f"{size.node.expr} = {node.name}.size({d})")
    return lines


def _device(schedule: Schedule, gm: fx.GraphModule) -> torch.device:
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and node.name in schedule.buffers:
            return value.device
    return torch.device("cpu")


def _views_over(gm: fx.GraphModule, schedule: Schedule, plan: MemoryPlan, bases: set[str]) -> list[fx.Node]:
    """View kernels, in the plan's order, that read only ``bases`` or such views, with no symbolic
    argument (those stay in ``call``, where their sizes are bound). Views never copy, so one made
    ahead of time follows every later write to its base."""
    nodes = {n.name: n for n in gm.graph.nodes}
    kernels = {k.name: k for k in schedule.kernels}
    bases = set(bases)
    hoisted = []
    for kernel_name in plan.order:
        if kernels[kernel_name].kind != "view":
            continue
        for name in kernels[kernel_name].nodes:
            node = nodes[name]
            symbolic = any(isinstance(a, (torch.SymInt, torch.SymFloat)) for a in
                           torch.utils._pytree.tree_leaves((node.args, node.kwargs)))
            if name in plan.slots or symbolic or not node.all_input_nodes \
                    or not all(i.name in bases for i in node.all_input_nodes):
                continue
            bases.add(name)
            hoisted.append(node)
    return hoisted


def emit_wrapper(gm: fx.GraphModule, schedule: Schedule, plan: MemoryPlan, title: str,
                 generated: dict[str, GeneratedKernel] | None = None, preamble: tuple[str, ...] = ()) -> str:
    """Python source of a module defining ``call(args)``; constants come in as ``CONSTANTS``.
    ``generated``: the target's code for some kernels; ``preamble``: the target's imports."""
    nodes = {n.name: n for n in gm.graph.nodes}
    kernels = {k.name: k for k in schedule.kernels}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols = _symbol_bindings(gm)
    symbol_names = [line.split(" = ")[0] for line in symbols]
    graph_position = {name: i for i, name in enumerate(nodes)}
    slotted = sorted(plan.slots, key=graph_position.__getitem__)
    figures = plan.figures()

    w = SourceWriter()
    w.line(f"# fxpress wrapper for {title}: {len(schedule.kernels)} kernels, arena "
           f"{figures['arena_bytes']} bytes at the example sizes (lower bound "
           f"{figures['lower_bound_bytes']}, naive {figures['naive_bytes']}); order: {plan.order_chosen}")
    w.line("import math")
    w.line("import operator")
    w.line("import torch")
    w.line("from fxpress.ops import OPS as FXPRESS_OPS")
    w.line("from fxpress.runtime.wrapper_support import ArenaPool, allocate_arena, check_input, slot")
    generated = generated or {}
    if generated:
        for line in preamble:
            w.line(line)
        for line in sorted({i for kernel in generated.values() for i in kernel.imports}):
            w.line(line)
        for kernel in generated.values():
            if kernel.source:
                w.line()
                w.lines.extend(kernel.source.rstrip("\n").splitlines())
    w.line()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            w.line(f"{node.name} = CONSTANTS[{node.target!r}]")
    # Views of constants (a Linear's transposed weight): made once, when the wrapper loads.
    hoisted = _views_over(gm, schedule, plan, {n.name for n in gm.graph.nodes if n.op == "get_attr"})
    for node in hoisted:
        w.line(f"{node.name} = {call(node)}  # a view of a constant: made once")
    w.line(f"DEVICE = {render(_device(schedule, gm))}")
    w.line("_arenas = ArenaPool()")
    w.line()
    # Views of planned buffers (a GEMM's output seen as [batch, tokens, width], a head's permute):
    # made with each arena, whose slots are the same tensors on every call that takes it, instead
    # of a dispatcher call each per call (tens of microseconds for the first after a GEMM).
    slot_views = _views_over(gm, schedule, plan, set(plan.slots))
    w.line(f"def _slots({', '.join(symbol_names)}):")
    w.level += 1
    w.line(f"arena = allocate_arena({code(plan.arena_bytes)}, DEVICE)")
    for name in slotted:
        value = nodes[name].meta["val"]
        size = render(tuple(value.shape))
        stride = render(tuple(value.stride()))
        w.line(f"{name} = slot(arena, {code(plan.slots[name].offset)}, {value.dtype}, {size}, {stride})")
    for node in slot_views:
        w.line(f"{node.name} = {call(node)}")
    carved = slotted + [n.name for n in slot_views]
    w.line(f"return ({', '.join(carved)}{',' if len(carved) == 1 else ''})")
    w.level -= 1
    w.line()
    w.line("def call(args):")
    w.level += 1
    w.line(f"{', '.join(n.name for n in placeholders)}{',' if len(placeholders) == 1 else ''} = args"
           if placeholders else "pass")
    w.line("args.clear()")
    for node in placeholders:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            sizes = tuple(None if isinstance(s, torch.SymInt) else int(s) for s in value.shape)
            w.line(f"check_input({node.name}, {node.name!r}, {value.dtype}, {sizes!r}, {title!r})")
    for line in symbols:
        w.line(line)
    key = f"({', '.join(symbol_names)}{',' if len(symbol_names) == 1 else ''})"
    # Each call takes an arena of its own from the pool and gives it back at the end: concurrent
    # calls (threads of a server) never share buffers.
    w.line(f"key = {key}")
    w.line("slots = _arenas.take(key)")
    w.line("if slots is None:")
    w.line(f"    slots = _slots({', '.join(symbol_names)})")
    w.line("try:")
    w.level += 1
    if carved:
        w.line(f"({', '.join(carved)},) = slots")
    _emit_body(w, gm, schedule, plan, nodes, kernels, generated, {n.name for n in hoisted + slot_views})
    output = next(n for n in gm.graph.nodes if n.op == "output")
    w.line(f"return {render(tuple(output.args[0]) if isinstance(output.args[0], (list, tuple)) else output.args[0])}")
    w.level -= 1
    w.line("finally:")
    w.line("    _arenas.give_back(key, slots)")
    return w.text()


def _emit_body(w: SourceWriter, gm: fx.GraphModule, schedule: Schedule, plan: MemoryPlan,
               nodes: dict[str, fx.Node], kernels: dict[str, Any],
               generated: dict[str, GeneratedKernel], hoisted: set[str]) -> None:
    sequence = [nodes[n] for k in plan.order for n in kernels[k].nodes]
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(sequence):
        for inp in node.all_input_nodes:
            last_use[inp] = i
    output = next(n for n in gm.graph.nodes if n.op == "output")
    keep = set(output.all_input_nodes) | set(n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")) \
        | {nodes[name] for name in hoisted}
    dies_at: dict[int, list[str]] = {}
    for n, last in last_use.items():  # temporaries: freed right after their last reader
        if n not in keep and n.name not in plan.slots:
            dies_at.setdefault(last, []).append(n.name)
    position = 0
    for kernel_name in plan.order:
        kernel = kernels[kernel_name]
        if set(kernel.nodes) <= hoisted:  # made when the wrapper loaded, or with the arena
            position += len(kernel.nodes)
            continue
        w.line(f"# {kernel.name}: {', '.join(kernel.nodes)}")
        whole = kernel_name in generated
        if whole:
            _emit_launch(w, generated[kernel_name], nodes, plan)
        else:
            whole = kernel.kind == "reduction" and emit_row_blocked(w, kernel, nodes, set(plan.slots))
        if whole:
            # Values internal to the kernel lived in registers or inside its loop (freed there).
            internal = set(kernel.nodes) - set(kernel.writes)
            dead = [n for p in range(position, position + len(kernel.nodes))
                    for n in dies_at.get(p, []) if n not in internal]
            if dead:
                w.line(f"del {', '.join(sorted(dead))}")
            position += len(kernel.nodes)
            continue
        for name in kernel.nodes:
            node = nodes[name]
            if name not in hoisted:
                _emit_node(w, node, name in plan.slots, plan.reuses.get(name))
            dead = dies_at.get(position)
            if dead:
                w.line(f"del {', '.join(sorted(dead))}")
            position += 1


def _emit_launch(w: SourceWriter, kernel: GeneratedKernel, nodes: dict[str, fx.Node], plan: MemoryPlan) -> None:
    for name in kernel.outputs:
        if name not in plan.slots:  # a graph output: the caller's memory, allocated per call
            w.line(allocation(name, nodes[name].meta["val"]))
    w.line(kernel.launch)


def _emit_node(w: SourceWriter, node: fx.Node, in_arena: bool, overwrites: str | None = None) -> None:
    if node.target is operator.getitem:
        source, index = node.args
        if in_arena:
            w.line(f"{node.name}.copy_({source.name}[{index}])")
        else:
            w.line(f"{node.name} = {source.name}[{index}]")
        return
    if node.target is torch.ops.prims.convert_element_type.default:
        _emit_conversion(w, node, in_arena)
        return
    spec = op_spec(node.target)
    # An fxpress op is called as its Python function: torch's dispatcher and custom-op layers would
    # add tens of microseconds per call to reach the same function.
    reference = "" if spec is None else f"FXPRESS_OPS[{spec.name!r}].reference"
    if not in_arena:
        w.line(f"{node.name} = {call(node, callee=reference)}")
        return
    if spec is not None and spec.out_impl is not None:  # an fxpress op writing straight into its slot
        w.line(call(node, extra_kwargs=f"out={node.name}", callee=f"FXPRESS_OPS[{spec.name!r}].out_impl"))
        return
    if spec is not None:
        w.line(f"{node.name}.copy_({call(node, callee=reference)})")
        return
    out_op = out_variant(node.target)
    # An out= kernel that is not elementwise may read an element after writing over it: when the
    # slot is an input's memory, compute first, then copy.
    reads_own_slot = overwrites is not None and overwrites in {i.name for i in node.all_input_nodes}
    if reads_own_slot and torch.Tag.pointwise not in getattr(node.target, "tags", ()):
        out_op = None
    if out_op is not None:
        w.line(f"{call(node, extra_kwargs=f'out={node.name}', target=out_op)}")
    else:
        w.line(f"{node.name}.copy_({call(node)})")


def _emit_conversion(w: SourceWriter, node: fx.Node, in_arena: bool) -> None:
    """``prims.convert_element_type`` runs through Python (about 100 µs a call); ``copy_`` into the
    slot, or ATen's ``_to_copy``, convert with the same rounding in C++."""
    source, dtype = node.args
    if in_arena:
        w.line(f"{node.name}.copy_({render(source)})")
    else:
        w.line(f"{node.name} = torch.ops.aten._to_copy.default({render(source)}, dtype={render(dtype)})")
