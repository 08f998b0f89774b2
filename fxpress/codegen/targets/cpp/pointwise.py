"""The C++ emitter for fused pointwise kernels.

The iteration shape is walked as rows (every dimension but the last) times the last dimension,
cut into chunks of ``CHUNK`` columns so that a long 1-D run still spreads over the threads. Each
input is read through its own strides (no index where it broadcasts), every value stays in a
register, and only the kernel's outputs are stored.
"""

from __future__ import annotations

import torch.fx as fx

from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.codegen.targets.cpp.operands import (PARALLEL_MIN, cpp_value_type, dtype_refusal, expression,
                                                  generated_kernel, index_lines, load, operand, signature,
                                                  unit_condition)
from fxpress.runtime.native_kernels import ENTRY

CHUNK = 4096  # columns per task


def pointwise_refusal(kernel: Kernel, nodes: dict[str, fx.Node]) -> str | None:
    for name in kernel.nodes:
        reason = dtype_refusal(nodes[name])
        if reason is not None:
            return reason
    return None


def external_inputs(members: list[fx.Node]) -> list[fx.Node]:
    """The tensors ``members`` read that none of them computes, in first-use order."""
    inside, found = set(members), []
    for node in members:
        for a in node.all_input_nodes:
            if a not in inside and a not in found:
                found.append(a)
    return found


def element_lines(members: list[fx.Node], names: dict[fx.Node, str]) -> list[str]:
    """One C++ statement per member, each a named value; ``names`` gains them."""
    lines = []
    for node in members:
        value = f"t{len(names)}"  # numbered, not named after nodes: the C++ depends on structure only
        lines.append(f"const {cpp_value_type(node)} {value} = {expression(node, names)};")
        names[node] = value
    return lines


def emit_pointwise(kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel:
    members = [nodes[n] for n in kernel.nodes]
    iteration = tuple(members[0].meta["val"].shape) or (1,)
    rank, last = len(iteration), len(iteration) - 1
    inputs = [operand(n, f"in{k}", iteration) for k, n in enumerate(external_inputs(members))]
    outputs = [operand(nodes[w], f"out{k}", iteration) for k, w in enumerate(kernel.writes)]
    params, types = signature(inputs, outputs, rank)

    names = {op.node: f"v_{op.name}" for op in inputs}
    body = [load(op, last) for op in inputs] + element_lines(members, names)
    body += [f"{op.name}_row[{op.column(last)}] = {names[op.node]};" for op in outputs]
    rows = " * ".join(f"n{d}" for d in range(rank - 1)) or "1"
    lines = [
        "#include <type_traits>",
        f'extern "C" void {ENTRY}({params}) {{',
        *[f"  {op.typed_pointer(False)}" for op in inputs],
        *[f"  {op.typed_pointer(True)}" for op in outputs],
        f"  const int64_t rows = {rows}, inner = n{last};",
        f"  const int64_t chunks = (inner + {CHUNK} - 1) / {CHUNK};",
        f"  const bool unit = {unit_condition(inputs + outputs, last)};",
        "  auto run = [&](auto unit_tag) {",
        "    constexpr bool U = decltype(unit_tag)::value;",
        f"#pragma omp parallel for num_threads(threads) if (rows * inner >= {PARALLEL_MIN}) schedule(static)",
        "    for (int64_t task = 0; task < rows * chunks; ++task) {",
        f"      const int64_t row = task / chunks, begin = (task % chunks) * {CHUNK};",
        f"      const int64_t end = std::min(inner, begin + {CHUNK});",
        *[f"      {line}" for line in index_lines(rank)],
        *[f"      const {op.ctype}* {op.name}_row = {op.name} + ({op.row_offset(last)});" for op in inputs],
        *[f"      {op.ctype}* {op.name}_row = {op.name} + ({op.row_offset(last)});" for op in outputs],
        "#pragma omp simd",
        "      for (int64_t j = begin; j < end; ++j) {",
        *[f"        {line}" for line in body],
        "      }",
        "    }",
        "  };",
        "  if (unit) run(std::true_type{}); else run(std::false_type{});",
        "}",
    ]
    title = f"{kernel.name}: {', '.join(kernel.nodes)}; iteration shape {list(iteration)}"
    return generated_kernel(kernel.name, title, "\n".join(lines) + "\n", types, inputs, outputs, iteration)

