"""The Triton emitter for row-reduction kernels: softmax, layer_norm, sum/mean/amax over the last
dimension, each with its fused pointwise prologue and row-shaped epilogue.

One program per row. Statistics are accumulated over the row in blocks of ``BLOCK`` columns (a
loop when the row is longer than one block), then a last pass recomputes the prologue, applies the
reduction's output formula and the epilogue, and stores. Softmax subtracts the row max; layer_norm
takes the variance about the mean in a second pass, as torch does, for accuracy.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.fx as fx

from fxpress.codegen.schedule import Kernel
from fxpress.codegen.triton_ops import TL_DTYPES
from fxpress.codegen.triton_pointwise import TritonKernel, _index, _render, _static, load, pointwise_refusal
from fxpress.passes._match import aten, is_op

MAX_BLOCK = 1024
_ROOTS = (aten._softmax, aten.native_layer_norm, aten.sum, aten.mean, aten.amax)


def _root(kernel: Kernel, nodes: dict[str, fx.Node]) -> fx.Node | None:
    roots = [nodes[n] for n in kernel.nodes if is_op(nodes[n], *_ROOTS)]
    return roots[0] if len(roots) == 1 else None


def reduction_refusal(kernel: Kernel, nodes: dict[str, fx.Node]) -> str | None:
    root = _root(kernel, nodes)
    if root is None:
        return "no single softmax/layer_norm/sum/mean/amax root"
    if is_op(root, aten._softmax) and root.args[2]:
        return "softmax with half-to-float"
    if is_op(root, aten.sum) and root.kwargs.get("dtype") is not None:
        return "sum with a dtype"
    values = [root.meta["val"][0] if is_op(root, aten.native_layer_norm) else root.meta["val"]]
    values += [a.meta["val"] for a in root.all_input_nodes]
    if not all(_static(v) and v.dtype in TL_DTYPES for v in values):
        return f"{root.name}: symbolic shape or dtype outside {sorted(map(str, TL_DTYPES))}"
    row_shape = tuple(root.args[0].meta["val"].shape)
    after_root = False
    for name in kernel.nodes:
        node = nodes[name]
        if node is root or node.target is operator.getitem:
            after_root = after_root or node is root
            continue
        reason = pointwise_refusal(node)
        if reason is not None:
            return reason
        if after_root and tuple(node.meta["val"].shape) != row_shape:
            return f"{name}: epilogue over a row statistic is not generated yet"
    return None


class _Body:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.level = 1

    def add(self, line: str) -> None:
        self.lines.append("    " * self.level + line)


def emit_reduction(kernel: Kernel, nodes: dict[str, fx.Node]) -> TritonKernel:
    root = _root(kernel, nodes)
    members = [nodes[n] for n in kernel.nodes]
    member_set = set(members)
    x_node = root.args[0]
    row_shape = tuple(int(s) for s in x_node.meta["val"].shape)
    lead, width = row_shape[:-1], row_shape[-1]
    rows = math.prod(lead)
    block = min(MAX_BLOCK, 1 << max(width - 1, 0).bit_length())
    prologue = [n for n in members[: members.index(root)]]
    epilogue = [n for n in members[members.index(root) + 1:] if n.target is not operator.getitem]
    getitems = {n.args[1]: n for n in members if n.target is operator.getitem}

    inputs: list[fx.Node] = []
    for node in members:
        for a in node.all_input_nodes:
            if a not in member_set and a not in inputs and isinstance(a.meta["val"], torch.Tensor):
                inputs.append(a)
    outputs = [nodes[w] for w in kernel.writes]
    arg = {n: f"in{k}" for k, n in enumerate(inputs)} | {n: f"out{k}" for k, n in enumerate(outputs)}

    idx = [sympy.Symbol(f"i{d}") for d in range(len(row_shape) - 1)] + [sympy.Symbol("cols")]
    b = _Body()
    b.add("row = tl.program_id(0)")
    for d in range(len(lead)):
        inner = math.prod(lead[d + 1:])
        term = f"row // {inner}" if inner != 1 else "row"
        b.add(f"i{d} = ({term}) % {lead[d]}" if d else f"i{d} = {term}")

    def row_values() -> dict[fx.Node, str]:
        """Loads and prologue for the current block of columns; returns value names."""
        names: dict[fx.Node, str] = {}
        for node in inputs:
            value = node.meta["val"]
            b.add(f"v_{node.name} = {load(arg[node], value, idx, 'mask=mask, other=0.0')}" + (".to(tl.float32)" if value.dtype != torch.bool else ""))
            names[node] = f"v_{node.name}"
        for node in prologue:
            b.add(f"v_{node.name} = {_render(node, names)}")
            names[node] = f"v_{node.name}"
        return names

    def block_loop() -> dict[fx.Node, str]:
        b.add(f"for start in range(0, {width}, BLOCK):")
        b.level += 1
        b.add("cols = start + tl.arange(0, BLOCK)")
        b.add(f"mask = cols < {width}")
        return row_values()

    # Statistics.
    if is_op(root, aten._softmax, aten.amax):
        b.add("acc = tl.full([BLOCK], float('-inf'), tl.float32)")
        names = block_loop()
        b.add(f"acc = tl.maximum(acc, tl.where(mask, {names[x_node]}, float('-inf')))")
        b.level -= 1
        b.add("row_max = tl.max(acc, 0)")
    if is_op(root, aten._softmax):
        b.add("acc = tl.zeros([BLOCK], tl.float32)")
        names = block_loop()
        b.add(f"acc += tl.where(mask, tl.exp({names[x_node]} - row_max), 0.0)")
        b.level -= 1
        b.add("row_sum = tl.sum(acc, 0)")
    if is_op(root, aten.sum, aten.mean, aten.native_layer_norm):
        b.add("acc = tl.zeros([BLOCK], tl.float32)")
        names = block_loop()
        b.add(f"acc += tl.where(mask, {names[x_node]}, 0.0)")
        b.level -= 1
        b.add("row_sum = tl.sum(acc, 0)")
        b.add(f"row_mean = row_sum / {width}")
    if is_op(root, aten.native_layer_norm):
        b.add("acc = tl.zeros([BLOCK], tl.float32)")
        names = block_loop()
        b.add(f"d = tl.where(mask, {names[x_node]} - row_mean, 0.0)")
        b.add("acc += d * d")
        b.level -= 1
        b.add(f"rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / {width} + {float(root.args[4])!r})")

    def store(node: fx.Node, value: str, last_index: object) -> None:
        v = node.meta["val"]
        at = [*idx[:-1], last_index]
        offset = _index(tuple(v.shape), tuple(v.stride()), at) if v.dim() else "0"
        b.add(f"tl.store({arg[node]} + ({offset}), ({value}).to({TL_DTYPES[v.dtype]})"
              + (", mask=mask)" if last_index is idx[-1] else ")"))

    # Row statistics as outputs: keepdim reductions, layer_norm's mean and rstd.
    scalar_results = {}
    if is_op(root, aten.sum):
        scalar_results[root] = "row_sum"
    elif is_op(root, aten.mean):
        scalar_results[root] = "row_mean"
    elif is_op(root, aten.amax):
        scalar_results[root] = "row_max"
    elif is_op(root, aten.native_layer_norm):
        scalar_results.update({getitems[i]: v for i, v in ((1, "row_mean"), (2, "rstd")) if i in getitems})
    for node, value in scalar_results.items():
        if node in arg:
            store(node, value, sympy.Integer(0))

    # Full rows: softmax / layer_norm output, then the epilogue.
    row_out = getitems.get(0) if is_op(root, aten.native_layer_norm) else root if is_op(root, aten._softmax) else None
    row_outputs = [n for n in outputs if n not in scalar_results]
    if row_outputs:
        names = block_loop()
        x = names[x_node]
        if is_op(root, aten._softmax):
            b.add(f"v_{root.name} = tl.exp({x} - row_max) / row_sum")
            names[root] = f"v_{root.name}"
        elif row_out is not None:
            weight, bias = root.args[2], root.args[3]
            value = f"({x} - row_mean) * rstd"
            if weight is not None:
                value = f"{value} * {names[weight]}"
            if bias is not None:
                value = f"{value} + {names[bias]}"
            b.add(f"v_{row_out.name} = {value}")
            names[row_out] = f"v_{row_out.name}"
        for node in epilogue:
            b.add(f"v_{node.name} = {_render(node, names)}")
            names[node] = f"v_{node.name}"
        for node in row_outputs:
            store(node, names[node], idx[-1])
        b.level -= 1

    params = [arg[n] for n in inputs] + [arg[n] for n in outputs]
    header = [f"# {kernel.name}: {', '.join(kernel.nodes)}; {rows} rows of {width}"]
    header += [f"#   {arg[n]} = {n.name}: {n.meta['val'].dtype}{list(n.meta['val'].shape)}" for n in inputs + outputs]
    source = "\n".join(header + ["@triton.jit", f"def {kernel.name}({', '.join(params)}, BLOCK: tl.constexpr):"]
                       + b.lines) + "\n"
    return TritonKernel(kernel.name, source, tuple(n.name for n in inputs),
                        tuple(n.name for n in outputs), numel=rows, block=block, grid=f"({rows},)")
