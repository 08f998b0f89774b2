"""Schedule: group the nodes of an ATen graph into kernels and name the buffers between them.

Kernel kinds:

- ``pointwise``: a run of elementwise ops over one iteration shape, fused so only the values
  needed outside the run are written to memory;
- ``reduction``: one row reduction (softmax, layer_norm, rms_norm, sum/mean/amax over the last
  dimension) with the elementwise prologue feeding it and the epilogue it feeds;
- ``op``: one ``fxpress::*`` op (a hand-written kernel family each);
- ``extern``: anything left to torch (mm/addmm/bmm, SDPA, embedding, cat, ...);
- ``view``: a view of a buffer; no data moves, the result aliases the buffer it views.

A functional collective (``ir/collectives.py``) is an extern call whose output stays torch's
memory (role ``collective``) until its ``wait_tensor``, a view of it; the wait reads the
collective's inputs too, so they stay live until the communication is over.

Fusion only joins nodes that are consecutive in graph order (views aside), so kernels keep the
graph's topological order and a fused kernel can never depend on itself through another kernel.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import sympy
import torch
import torch.fx as fx

from fxpress.codegen.reductions import is_row_reduction
from fxpress.ir.collectives import held_until_wait, is_collective, is_wait
from fxpress.ir.match import aten, is_op, same_size, val

# Elementwise copies: fusible like pointwise ops although ATen does not tag them so.
_COPIES = (aten._to_copy, aten.clone)


@dataclass(frozen=True)
class Buffer:
    """A value some kernel writes to memory. ``nbytes`` is a sympy expression in the graph's
    size symbols; ``role`` says who owns the memory: ``arena`` (planned), ``output`` (returned to
    the caller, allocated per call), ``input``/``constant`` (owned by the caller or the graph),
    ``collective`` (allocated by a functional collective, per call)."""

    name: str
    nbytes: sympy.Expr
    dtype: torch.dtype
    role: str
    alias_of: str | None = None  # views: the buffer whose memory they show


@dataclass(frozen=True)
class Kernel:
    name: str
    kind: str
    nodes: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    mutates: bool = False  # writes one of its inputs in place (a cache update, a copy_ back)
    # Reads whose memory the kernel's one output may take when they die here: each element (or
    # row) of them is read before the same element (or row) of the output is written.
    overwritable: tuple[str, ...] = ()
    # Other values it reads that a kernel computes (sizes: ``sym_size`` nodes, SymInt arithmetic):
    # no memory, but an order all the same.
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schedule:
    kernels: tuple[Kernel, ...]
    buffers: dict[str, Buffer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernels": [k.__dict__ for k in self.kernels],
            "buffers": {n: {"nbytes": str(b.nbytes), "dtype": str(b.dtype), "role": b.role,
                            "alias_of": b.alias_of} for n, b in self.buffers.items()},
        }


def classify(node: fx.Node) -> str:
    target = node.target
    if is_op(node, aten._unsafe_view) or getattr(target, "is_view", False) or is_wait(node):
        return "view"  # a wait returns the collective's own output tensor
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "fxpress":
        return "op"
    if is_row_reduction(node):
        return "reduction"
    single_tensor = isinstance(val(node), torch.Tensor)
    pointwise = isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
    if single_tensor and (pointwise or is_op(node, *_COPIES)) and not _writes_an_argument(target):
        return "pointwise"
    return "extern"


def _writes_an_argument(target: Any) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments)


def storage_nbytes(value: torch.Tensor) -> sympy.Expr:
    """Bytes spanned by a tensor's sizes and strides, as a sympy expression."""
    extent = sympy.Integer(1)
    for size, stride in zip(value.shape, value.stride()):
        extent += (_expr(size) - 1) * _expr(stride)
    numel = sympy.Mul(*[_expr(s) for s in value.shape])
    # An empty tensor spans nothing. Symbolic sizes are never 0: Dynamo specialises sizes 0 and 1.
    if numel.is_number and numel == 0:
        return sympy.Integer(0)
    return sympy.expand(extent * value.element_size())


def _expr(x: Any) -> sympy.Expr:
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


@dataclass
class _Group:
    kind: str
    nodes: list[fx.Node]
    shape: Any
    members: set[fx.Node] = field(default_factory=set)

    def add(self, node: fx.Node) -> None:
        self.nodes.append(node)
        self.members.add(node)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(val(a), torch.Tensor)]


def _can_join(group: _Group | None, node: fx.Node, kind: str) -> bool:
    if group is None or kind not in ("pointwise", "reduction"):
        return False
    if not any(i in group.members for i in node.all_input_nodes):
        return False
    if kind == "reduction":  # a reduction takes a pointwise prologue over its input rows
        return group.kind == "pointwise" and same_size(val(node.args[0]).shape, group.shape)
    out = val(node).shape
    return same_size(out, group.shape) or (group.kind == "reduction" and same_size(out, val(group.nodes[-1]).shape))


def group_nodes(gm: fx.GraphModule) -> list[tuple[str, list[fx.Node]]]:
    """(kind, nodes) per kernel, in execution order."""
    out: list[tuple[str, list[fx.Node]]] = []
    kernel_of: dict[fx.Node, list[fx.Node]] = {}  # node -> the node list of its kernel
    current: _Group | None = None

    def emit(kind: str, nodes: list[fx.Node]) -> None:
        out.append((kind, nodes))

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            # A tuple element is an output of the kernel that made the tuple.
            kernel_of[node.args[0]].append(node)
            kernel_of[node] = kernel_of[node.args[0]]
            if current is not None and kernel_of[node] is current.nodes:
                current.members.add(node)
            continue
        kind = classify(node)
        if kind == "view":
            if current is not None and any(i in current.members for i in node.all_input_nodes):
                emit(current.kind, current.nodes)  # the viewed value must be in memory first
                current = None
            emit("view", [node])
        elif _can_join(current, node, kind):
            current.add(node)
            if kind == "reduction":
                current.kind = "reduction"
        else:
            if current is not None:
                emit(current.kind, current.nodes)
                current = None
            if kind in ("pointwise", "reduction"):
                current = _Group(kind, [], val(node.args[0] if kind == "reduction" else node).shape)
                current.add(node)
            else:
                emit(kind, [node])
        kernel_of[node] = current.nodes if current is not None and node in current.members else out[-1][1]
    if current is not None:
        emit(current.kind, current.nodes)
    return out


def _kernel_name(kind: str, nodes: Iterable[fx.Node], index: int) -> str:
    ops = []
    for n in nodes:
        if n.target is operator.getitem:
            continue
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0].lstrip("_")
        if name not in ops:
            ops.append(name)
    return f"{kind}_{'_'.join(ops[:4])}_{index}"


def build_schedule(gm: fx.GraphModule) -> Schedule:
    """Group ``gm`` into kernels and describe every buffer they exchange."""
    groups = group_nodes(gm)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    returned = {a for a in torch.utils._pytree.tree_leaves(output_node.args) if isinstance(a, fx.Node)}

    buffers: dict[str, Buffer] = {}
    for node in gm.graph.nodes:
        value = val(node)
        if node.op in ("placeholder", "get_attr") and isinstance(value, torch.Tensor):
            role = "input" if node.op == "placeholder" else "constant"
            buffers[node.name] = Buffer(node.name, storage_nbytes(value), value.dtype, role)

    def base_of(node: fx.Node) -> str | None:
        """The buffer whose memory ``node``'s value lives in (itself unless it is a view)."""
        if node.name not in buffers:
            return None
        return buffers[node.name].alias_of or node.name

    kernels = []
    for index, (kind, nodes) in enumerate(groups):
        members = set(nodes)
        held = [i for n in nodes if is_wait(n) for i in held_until_wait(n)]
        reads = sorted({i.name for n in nodes for i in [*_tensor_inputs(n), *held]
                        if i not in members and i.name in buffers})
        writes = []
        for n in nodes:
            value = val(n)
            if not isinstance(value, torch.Tensor):
                continue
            escapes = any(u not in members for u in n.users) or n in returned
            if not escapes:
                continue
            if kind == "view" or _aliases_input(n):
                # Tuple elements of a view op (split) view what the op viewed.
                source = nodes[0].args[0] if kind == "view" else n.args[0]
                buffers[n.name] = Buffer(n.name, storage_nbytes(value), value.dtype, "view",
                                         alias_of=base_of(source) if isinstance(source, fx.Node) else None)
            else:
                role = "collective" if is_collective(_producer(n)) else "arena"
                buffers[n.name] = Buffer(n.name, storage_nbytes(value), value.dtype, role)
            writes.append(n.name)
        mutates = any(isinstance(n.target, torch._ops.OpOverload) and _writes_an_argument(n.target)
                      for n in nodes)
        overwritable = _overwritable(kind, nodes, reads, writes, buffers) if not mutates else ()
        needs = sorted({i.name for n in nodes for i in n.all_input_nodes
                        if i not in members and i.name not in buffers and i.op == "call_function"})
        kernels.append(Kernel(_kernel_name(kind, nodes, index), kind, tuple(n.name for n in nodes),
                              tuple(reads), tuple(writes), mutates, overwritable, tuple(needs)))
    # Memory a returned value lives in belongs to the caller: outputs and whatever they view.
    for node in returned:
        base = base_of(node)
        if base is not None and buffers[base].role == "arena":
            buffers[base] = Buffer(base, buffers[base].nbytes, buffers[base].dtype, "output")
    return Schedule(tuple(kernels), buffers)


def _overwritable(kind: str, nodes: list[fx.Node], reads: list[str], writes: list[str],
                  buffers: dict[str, Buffer]) -> tuple[str, ...]:
    """Inputs the kernel's output may overwrite: pointwise and row-reduction kernels read each input
    at the output's own index (same sizes, strides and dtype required); row-local fxpress ops
    (``OpSpec.overwritable``) read a whole row before writing it (same row count and row bytes)."""
    if len(writes) != 1 or writes[0] != nodes[-1].name or kind not in ("pointwise", "reduction", "op"):
        return ()
    out = val(nodes[-1])
    bases = [buffers[r].alias_of for r in reads if buffers[r].alias_of]
    by_name = {i.name: i for n in nodes for i in n.all_input_nodes}
    if kind == "op":
        from fxpress.ops import op_spec  # the op registry; imported late to keep schedule import-light

        spec = op_spec(nodes[-1].target)
        arg = spec.overwritable if spec is not None else None
        x = nodes[-1].args[arg] if arg is not None else None
        if not isinstance(x, fx.Node) or x.name not in reads:
            return ()
        xv = val(x)
        rows_match = (out.dim() > 0 and xv.dim() > 0 and same_size(out.shape[:-1], xv.shape[:-1])
                      and same_size(out.shape[-1:], xv.shape[-1:]))
        if not (rows_match and out.is_contiguous() and xv.is_contiguous() and out.dtype == xv.dtype):
            return ()
        # x may be a view that spans all of its buffer (heads merged back into features).
        base = buffers[x.name].alias_of or x.name
        whole = sympy.expand(buffers[base].nbytes - buffers[x.name].nbytes) == 0
        others = [buffers[r].alias_of for r in reads if r != x.name and buffers[r].alias_of]
        return (base,) if whole and buffers[base].role == "arena" and base not in others else ()
    else:
        candidates = [r for r in reads if r in by_name and _same_layout(val(by_name[r]), out)]
    return tuple(c for c in candidates if buffers[c].role == "arena" and c not in bases)


def _producer(node: fx.Node) -> fx.Node:
    """The node that made ``node``'s value: itself, or the op whose tuple it is an element of."""
    return node.args[0] if node.target is operator.getitem else node


def _same_layout(a: Any, b: torch.Tensor) -> bool:
    return (isinstance(a, torch.Tensor) and a.dtype == b.dtype and same_size(a.shape, b.shape)
            and same_size(a.stride(), b.stride()))


def _aliases_input(node: fx.Node) -> bool:
    """In-place ops (``index_copy_`` into a cache) return the tensor they wrote."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and bool(target._schema.returns) and \
        target._schema.returns[0].alias_info is not None


def size_hints(gm: fx.GraphModule) -> dict[str, int]:
    """The example value of every size symbol in the graph (from its FakeTensor shape env)."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if "val" in n.meta])
    env = getattr(mode, "shape_env", None)
    if env is None:
        return {}
    # Renamed in torch 2.12; the old name still works there but warns.
    values = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
    return {str(sym): int(value) for sym, value in values.items()}
