"""The Triton emitter for row-reduction kernels: softmax, layer_norm, sum/mean/amax over the last
dimension, each with its fused pointwise prologue and row-shaped epilogue.

One program per row. Statistics are accumulated over the row in blocks of ``BLOCK`` columns (a
loop when the row is longer than one block), then a last pass recomputes the prologue, applies the
reduction's output formula and the epilogue, and stores. Softmax subtracts the row max; layer_norm
takes the variance about the mean in a second pass, as torch does, for accuracy.
"""

from __future__ import annotations

import math

import sympy
import torch
import torch.fx as fx

from fxpress.codegen.reductions import RowKernelParts, generation_refusal
from fxpress.codegen.schedule import Kernel
from fxpress.codegen.source_writer import SourceWriter
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.codegen.targets.triton.pointwise import _index, _render, load, pointwise_refusal, triton_kernel
from fxpress.core.triton_types import TL_DTYPES
from fxpress.ir.match import aten, is_op
from fxpress.ops.lowering import static

MAX_BLOCK = 1024


def reduction_refusal(kernel: Kernel, nodes: dict[str, fx.Node]) -> str | None:
    return generation_refusal([nodes[n] for n in kernel.nodes], _values_refusal, pointwise_refusal)


def _values_refusal(root: fx.Node) -> str | None:
    values = [root.meta["val"][0] if is_op(root, aten.native_layer_norm) else root.meta["val"]]
    values += [a.meta["val"] for a in root.all_input_nodes]
    if not all(static(v) and v.dtype in TL_DTYPES for v in values):
        return f"{root.name}: symbolic shape or dtype outside {sorted(map(str, TL_DTYPES))}"
    return None


def emit_reduction(kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel:
    return _RowKernel(kernel, nodes).emit()


class _RowKernel(RowKernelParts):
    """One reduction kernel being written: its parts, then the steps of :meth:`emit`."""

    def __init__(self, kernel: Kernel, nodes: dict[str, fx.Node]) -> None:
        super().__init__([nodes[n] for n in kernel.nodes])
        self.kernel = kernel
        row_shape = tuple(int(s) for s in self.x.meta["val"].shape)
        self.lead, self.width = row_shape[:-1], row_shape[-1]
        self.rows = math.prod(self.lead)
        self.block = min(MAX_BLOCK, 1 << max(self.width - 1, 0).bit_length())
        member_set = set(self.members)
        self.inputs: list[fx.Node] = []
        for node in self.members:
            for a in node.all_input_nodes:
                if a not in member_set and a not in self.inputs and isinstance(a.meta["val"], torch.Tensor):
                    self.inputs.append(a)
        self.outputs = [nodes[w] for w in kernel.writes]
        self.arg = {n: f"in{k}" for k, n in enumerate(self.inputs)} | {n: f"out{k}" for k, n in enumerate(self.outputs)}
        self.idx = [sympy.Symbol(f"i{d}") for d in range(len(row_shape) - 1)] + [sympy.Symbol("cols")]
        self.w = SourceWriter(level=1)

    def emit(self) -> GeneratedKernel:
        self._row_indices()
        self._statistics()
        stored = self._store_row_statistics()
        self._store_rows([n for n in self.outputs if n not in stored])
        params = [self.arg[n] for n in self.inputs + self.outputs]
        header = [f"# {self.kernel.name}: {', '.join(self.kernel.nodes)}; {self.rows} rows of {self.width}"]
        header += [f"#   {self.arg[n]} = {n.name}: {n.meta['val'].dtype}{list(n.meta['val'].shape)}"
                   for n in self.inputs + self.outputs]
        signature = f"def {self.kernel.name}({', '.join(params)}, BLOCK: tl.constexpr):"
        source = "\n".join(header + ["@triton.jit", signature] + self.w.lines) + "\n"
        return triton_kernel(self.kernel.name, source, [n.name for n in self.inputs],
                             [n.name for n in self.outputs], grid=f"({self.rows},)", block=self.block)

    def _row_indices(self) -> None:
        """The program's row, as indices over the leading dimensions."""
        self.w.line("row = tl.program_id(0)")
        for d in range(len(self.lead)):
            inner = math.prod(self.lead[d + 1:])
            term = f"row // {inner}" if inner != 1 else "row"
            self.w.line(f"i{d} = ({term}) % {self.lead[d]}" if d else f"i{d} = {term}")

    def _block_loop(self) -> dict[fx.Node, str]:
        """Open a loop over blocks of the row's columns; load the inputs and compute the prologue
        there. Returns the names of the values in the loop body (the caller closes the loop)."""
        w = self.w
        w.line(f"for start in range(0, {self.width}, BLOCK):")
        w.level += 1
        w.line("cols = start + tl.arange(0, BLOCK)")
        w.line(f"mask = cols < {self.width}")
        names: dict[fx.Node, str] = {}
        for node in self.inputs:
            value = node.meta["val"]
            w.line(f"v_{node.name} = {load(self.arg[node], value, self.idx, 'mask=mask, other=0.0')}"
                   + (".to(tl.float32)" if value.dtype != torch.bool else ""))
            names[node] = f"v_{node.name}"
        for node in self.prologue:
            w.line(f"v_{node.name} = {_render(node, names)}")
            names[node] = f"v_{node.name}"
        return names

    def _accumulate(self, init: str, step: str, result: str) -> None:
        """One pass over the row: ``acc`` starts at ``init``, each block applies ``step`` (a format
        string over ``{x}``, the block of the reduced input), then ``result`` reads ``acc``."""
        self.w.line(f"acc = {init}")
        names = self._block_loop()
        for line in step.format(x=names[self.x]).split("\n"):
            self.w.line(line)
        self.w.level -= 1
        self.w.line(result)

    def _statistics(self) -> None:
        """The row statistics the root needs: max, sum of exps, sum and mean, rstd."""
        root = self.root
        if is_op(root, aten._softmax, aten.amax):
            self._accumulate("tl.full([BLOCK], float('-inf'), tl.float32)",
                             "acc = tl.maximum(acc, tl.where(mask, {x}, float('-inf')))", "row_max = tl.max(acc, 0)")
        if is_op(root, aten._softmax):
            self._accumulate("tl.zeros([BLOCK], tl.float32)", "acc += tl.where(mask, tl.exp({x} - row_max), 0.0)",
                             "row_sum = tl.sum(acc, 0)")
        if is_op(root, aten.sum, aten.mean, aten.native_layer_norm):
            self._accumulate("tl.zeros([BLOCK], tl.float32)", "acc += tl.where(mask, {x}, 0.0)",
                             "row_sum = tl.sum(acc, 0)")
            self.w.line(f"row_mean = row_sum / {self.width}")
        if is_op(root, aten.native_layer_norm):
            self._accumulate("tl.zeros([BLOCK], tl.float32)", "d = tl.where(mask, {x} - row_mean, 0.0)\nacc += d * d",
                             f"rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / {self.width} + {float(root.args[4])!r})")

    def _store(self, node: fx.Node, value: str, last_index: object) -> None:
        v = node.meta["val"]
        at = [*self.idx[:-1], last_index]
        offset = _index(tuple(v.shape), tuple(v.stride()), at) if v.dim() else "0"
        self.w.line(f"tl.store({self.arg[node]} + ({offset}), ({value}).to({TL_DTYPES[v.dtype]})"
                    + (", mask=mask)" if last_index is self.idx[-1] else ")"))

    def _store_row_statistics(self) -> dict[fx.Node, str]:
        """Row statistics that are outputs (keepdim reductions, layer_norm's mean and rstd)."""
        root = self.root
        statistics: dict[fx.Node, str] = {}
        if is_op(root, aten.sum):
            statistics[root] = "row_sum"
        elif is_op(root, aten.mean):
            statistics[root] = "row_mean"
        elif is_op(root, aten.amax):
            statistics[root] = "row_max"
        elif is_op(root, aten.native_layer_norm):
            statistics.update({self.getitems[i]: v for i, v in ((1, "row_mean"), (2, "rstd")) if i in self.getitems})
        for node, value in statistics.items():
            if node in self.arg:
                self._store(node, value, sympy.Integer(0))
        return statistics

    def _store_rows(self, row_outputs: list[fx.Node]) -> None:
        """Full rows: the softmax / layer_norm output, then the epilogue, stored block by block."""
        if not row_outputs:
            return
        root, w = self.root, self.w
        names = self._block_loop()
        x = names[self.x]
        if is_op(root, aten._softmax):
            w.line(f"v_{root.name} = tl.exp({x} - row_max) / row_sum")
            names[root] = f"v_{root.name}"
        elif is_op(root, aten.native_layer_norm) and 0 in self.getitems:
            weight, bias = root.args[2], root.args[3]
            value = f"({x} - row_mean) * rstd"
            if weight is not None:
                value = f"{value} * {names[weight]}"
            if bias is not None:
                value = f"{value} + {names[bias]}"
            row_out = self.getitems[0]
            w.line(f"v_{row_out.name} = {value}")
            names[row_out] = f"v_{row_out.name}"
        for node in self.epilogue:
            w.line(f"v_{node.name} = {_render(node, names)}")
            names[node] = f"v_{node.name}"
        for node in row_outputs:
            self._store(node, names[node], self.idx[-1])
        w.level -= 1
