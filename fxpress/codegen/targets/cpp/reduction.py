"""The C++ emitter for row-reduction kernels: softmax, layer_norm, and sum/mean/amax over the last
dimension, each with its fused pointwise prologue and row-shaped epilogue.

Rows are spread over the threads. Each statistic is one vectorised pass over the row that
recomputes the prologue from the inputs (a row is in cache by then; a temporary row would cost
a store and a load per element): the max, then the sum of exponentials, for softmax; the mean,
then the variance about it, for layer_norm (as torch takes it, for accuracy). A last pass
applies the reduction's formula and the epilogue and stores the rows. Softmax's exponentials are
the exception: they cost more than a store and a load, so each thread keeps its row's in a
scratch row between the sum and the output.
"""

from __future__ import annotations


import torch
import torch.fx as fx

from fxpress.codegen.reductions import RowKernelParts, generation_refusal
from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.codegen.targets.cpp.operands import (PARALLEL_MIN, Operand, dtype_refusal, generated_kernel,
                                                  index_lines, load, operand, signature, unit_condition)
from fxpress.codegen.targets.cpp.pointwise import element_lines, external_inputs
from fxpress.ir.match import aten, is_op
from fxpress.runtime.native_kernels import ENTRY

def reduction_refusal(kernel: Kernel, nodes: dict[str, fx.Node]) -> str | None:
    return generation_refusal([nodes[n] for n in kernel.nodes], _values_refusal, dtype_refusal)


def _values_refusal(root: fx.Node) -> str | None:
    tensors = [a for a in root.all_input_nodes if isinstance(a.meta["val"], torch.Tensor)]
    values = [v for v in (root.meta["val"] if isinstance(root.meta["val"], tuple) else (root.meta["val"],))]
    if not all(t.meta["val"].dtype == torch.float32 for t in tensors) or \
            not all(v.dtype == torch.float32 for v in values):
        return f"{root.name}: the C++ row kernels reduce float32 only"
    return None


class RowKernel(RowKernelParts):
    """One reduction kernel being written: its parts, then its passes over a row (``emit``)."""

    def __init__(self, kernel: Kernel, nodes: dict[str, fx.Node]) -> None:
        super().__init__([nodes[n] for n in kernel.nodes])
        self.kernel = kernel
        self.iteration = tuple(self.x.meta["val"].shape)
        self.rank, self.last = len(self.iteration), len(self.iteration) - 1
        self.inputs = [operand(n, f"in{k}", self.iteration) for k, n in enumerate(external_inputs(self.members))
                       if isinstance(n.meta["val"], torch.Tensor)]
        statistics = self._statistic_names()
        self.outputs: list[Operand] = []
        self.statistics: dict[Operand, str] = {}
        for k, name in enumerate(kernel.writes):
            node = nodes[name]
            if node in statistics:
                op = self._statistic_operand(node, f"out{k}")
                self.statistics[op] = statistics[node]
            else:
                op = operand(node, f"out{k}", self.iteration)
            self.outputs.append(op)

    def _statistic_names(self) -> dict[fx.Node, str]:
        """The row statistics that are values of the graph, and the C++ variable holding each."""
        root = self.root
        if is_op(root, aten.sum):
            return {root: "row_sum"}
        if is_op(root, aten.mean):
            return {root: "row_mean"}
        if is_op(root, aten.amax):
            return {root: "row_max"}
        if is_op(root, aten.native_layer_norm):
            return {self.getitems[i]: v for i, v in ((1, "row_mean"), (2, "rstd")) if i in self.getitems}
        return {}

    def _statistic_operand(self, node: fx.Node, name: str) -> Operand:
        """A statistic has one value per row: kept dimensions line up with the row's, dropped ones
        with the leading dimensions."""
        if node.meta["val"].dim() == self.rank:
            return operand(node, name, self.iteration)
        return operand(node, name, self.iteration[:-1])

    def emit(self) -> GeneratedKernel:
        params, types = signature(self.inputs, self.outputs, self.rank)
        rows = " * ".join(f"n{d}" for d in range(self.rank - 1)) or "1"
        row_outputs = [op for op in self.outputs if op not in self.statistics]
        body = [*self._statistics(), *self._store_statistics()]
        if row_outputs:
            body += self._row_pass(row_outputs)
        lines = [
            "#include <type_traits>",
            "#include <vector>",
            f'extern "C" void {ENTRY}({params}) {{',
            *[f"  {op.typed_pointer(False)}" for op in self.inputs],
            *[f"  {op.typed_pointer(True)}" for op in self.outputs],
            f"  const int64_t rows = {rows}, width = n{self.last};",
            f"  const bool unit = {unit_condition(self.inputs + row_outputs, self.last)};",
            "  auto run = [&](auto unit_tag) {",
            "    constexpr bool U = decltype(unit_tag)::value;",
            f"#pragma omp parallel num_threads(threads) if (rows * width >= {PARALLEL_MIN})",
            "    {",
            # softmax keeps a row's exponentials here between its sum and its output
            f"    std::vector<float> scratch({'width' if is_op(self.root, aten._softmax) else 0});",
            "    float* exps = scratch.data();",
            "    (void)exps;",
            "#pragma omp for schedule(static)",
            "    for (int64_t row = 0; row < rows; ++row) {",
            *[f"      {line}" for line in index_lines(self.rank)],
            *[f"      const {op.ctype}* {op.name}_row = {op.name} + ({op.row_offset(self.last)});"
              for op in self.inputs],
            *[f"      {op.ctype}* {op.name}_row = {op.name} + ({op.row_offset(self.last)});" for op in self.outputs],
            *[f"      {line}" for line in body],
            "    }",
            "    }",
            "  };",
            "  if (unit) run(std::true_type{}); else run(std::false_type{});",
            "}",
        ]
        title = f"{self.kernel.name}: {', '.join(self.kernel.nodes)}; rows of {list(self.iteration)}"
        return generated_kernel(self.kernel.name, title, "\n".join(lines) + "\n", types, self.inputs, self.outputs,
                                self.iteration)

    def _column(self) -> tuple[list[str], dict[fx.Node, str]]:
        """Statements computing column ``j``'s values (loads, prologue, then ``x``, the reduced
        input), and the names of those values."""
        names = {op.node: f"v_{op.name}" for op in self.inputs}
        lines = [load(op, self.last) for op in self.inputs] + element_lines(self.prologue, names)
        lines.append(f"const float x = {names[self.x]};")
        return lines, names

    def _loop(self, statements: list[str], reduction: str = "") -> list[str]:
        """A vectorised loop over the row's columns (a reduction into the named accumulator)."""
        pragma = f"#pragma omp simd reduction({reduction})" if reduction else "#pragma omp simd"
        return [pragma, "for (int64_t j = 0; j < width; ++j) {", *[f"  {line}" for line in statements], "}"]

    def _accumulate(self, start: str, steps: list[str], accumulator: str, how: str) -> list[str]:
        """``float accumulator = start;`` then a pass over the row applying ``steps`` to it."""
        column, _ = self._column()
        return [f"float {accumulator} = {start};", *self._loop(column + steps, f"{how}:{accumulator}")]

    def _statistics(self) -> list[str]:
        root, lines = self.root, []
        if is_op(root, aten._softmax, aten.amax):
            lines += self._accumulate("-INFINITY", ["row_max = row_max < x ? x : row_max;"], "row_max", "max")
        if is_op(root, aten._softmax):
            lines += self._accumulate("0.f", ["const float e = fxpress_math::exp_nonpositive(x - row_max);",
                                              "exps[j] = e;", "row_sum += e;"], "row_sum", "+")
            lines.append("const float inverse_sum = 1.f / row_sum;")
        if is_op(root, aten.sum, aten.mean, aten.native_layer_norm):
            lines += self._accumulate("0.f", ["row_sum += x;"], "row_sum", "+")
            lines.append("const float row_mean = row_sum / static_cast<float>(width);")
        if is_op(root, aten.native_layer_norm):
            lines += self._accumulate("0.f", ["const float d = x - row_mean;", "squares += d * d;"], "squares", "+")
            eps = float(root.args[4])
            lines.append(f"const float rstd = 1.f / std::sqrt(squares / static_cast<float>(width) + {eps!r}f);")
        return lines

    def _store_statistics(self) -> list[str]:
        return [f"{op.name}_row[0] = {value};" for op, value in self.statistics.items()]

    def _row_pass(self, row_outputs: list[Operand]) -> list[str]:
        root = self.root
        statements, names = self._column()
        names.update(self._statistic_names())  # an epilogue may read a statistic, one per row
        if is_op(root, aten._softmax):
            statements.append("const float y = exps[j] * inverse_sum;")
            names[root] = "y"
        elif is_op(root, aten.native_layer_norm) and 0 in self.getitems:
            value = "(x - row_mean) * rstd"
            weight, bias = root.args[2], root.args[3]
            if weight is not None:
                value = f"{value} * {names[weight]}"
            if bias is not None:
                value = f"{value} + {names[bias]}"
            statements.append(f"const float y = {value};")
            names[self.getitems[0]] = "y"
        statements += element_lines(self.epilogue, names)
        statements += [f"{op.name}_row[{op.column(self.last)}] = {names[op.node]};" for op in row_outputs]
        return self._loop(statements)
