"""The Triton emitter for fused pointwise kernels.

One program handles ``BLOCK`` elements of the kernel's iteration shape, flattened row-major; each
input is loaded through its own strides (0 where it broadcasts), so non-contiguous and broadcast
inputs need no copies, and a mask covers the tail. Index arithmetic is built with sympy. Only static
shapes and the ops in ``expressions.OPS`` are lowered; anything else stays a torch call and
``pointwise_kernel_refusal`` says why.
"""

from __future__ import annotations

import math

import sympy
import torch
import torch.fx as fx

from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.codegen.targets.triton.expressions import OPS
from fxpress.core.triton_types import TL_DTYPES
from fxpress.ops.lowering import static

BLOCK = 1024
INTEGER_LOADS = {torch.int8, torch.uint8, torch.int16, torch.int32}


def pointwise_kernel_refusal(kernel: Kernel, nodes: dict[str, fx.Node]) -> str | None:
    """Why the pointwise ``kernel`` cannot become a Triton kernel, or None when it can."""
    for name in kernel.nodes:
        reason = pointwise_refusal(nodes[name])
        if reason is not None:
            return reason
    return None


def pointwise_refusal(node: fx.Node) -> str | None:
    """Why one elementwise node has no Triton expression here, or None when it has one."""
    if node.target not in OPS:
        return f"{node.target} has no Triton form"
    values = [node.meta["val"]] + [a.meta["val"] for a in node.all_input_nodes]
    # Integer codes may be read only to be converted (a dequantisation): other ops would compute
    # on them in float, where int32 loses bits.
    readable = TL_DTYPES.keys() | (INTEGER_LOADS if node.target is torch.ops.aten._to_copy.default else set())
    if not all(static(v) for v in values) or values[0].dtype not in TL_DTYPES or \
            not all(v.dtype in readable for v in values[1:]):
        return f"{node.name}: symbolic shape or dtype outside {sorted(map(str, TL_DTYPES))}"
    if any(isinstance(a, (list, tuple, torch.SymInt)) for a in node.args):
        return f"{node.name}: non-scalar literal argument"
    if any(isinstance(a, float) and not math.isfinite(a) for a in node.args):
        return f"{node.name}: non-finite literal"
    try:
        _render(node, {a: "t" for a in node.all_input_nodes})
    except NotImplementedError as e:
        return f"{node.name}: {e}"
    return None


def _render(node: fx.Node, names: dict[fx.Node, str]) -> str:
    """The node's Triton expression; literals go to the renderer as Python values."""
    args = [names[a] if isinstance(a, fx.Node) else a for a in node.args]
    kwargs = {k: v for k, v in node.kwargs.items() if k != "pin_memory"}
    return OPS[node.target](*args, **kwargs)


def load(pointer: str, value: torch.Tensor, idx: list[sympy.Symbol], masked: str = "mask=mask") -> str:
    """A load of ``value`` broadcast over the iteration. A tensor of size-1 dimensions only is one
    scalar load: compiled Triton refuses a block mask on a scalar pointer."""
    offset = _index(tuple(value.shape), tuple(value.stride()), idx)
    if sympy.sympify(offset).is_number:
        return f"tl.load({pointer} + ({offset}))"
    return f"tl.load({pointer} + ({offset}), {masked})"


def _index(shape: tuple[int, ...], strides: tuple[int, ...], idx: list[sympy.Symbol]) -> str:
    """Offset of element ``idx`` (over the iteration shape) in a tensor of ``shape``/``strides``
    broadcast to it from the right."""
    offset = sympy.Integer(0)
    lead = len(idx) - len(shape)
    for d, (size, stride) in enumerate(zip(shape, strides)):
        if size != 1:
            offset += idx[lead + d] * stride
    return str(offset)


def emit_pointwise(kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel:
    members = [nodes[n] for n in kernel.nodes]
    member_set = set(members)
    shape = tuple(int(s) for s in members[0].meta["val"].shape)
    numel = math.prod(shape)
    inputs: list[fx.Node] = []
    for node in members:
        for a in node.all_input_nodes:
            if a not in member_set and a not in inputs:
                inputs.append(a)
    outputs = [nodes[w] for w in kernel.writes]

    idx = [sympy.Symbol(f"i{d}") for d in range(len(shape))]
    body = ["pid = tl.program_id(0)", "x = pid * BLOCK + tl.arange(0, BLOCK)", f"mask = x < {numel}"]
    for d in range(len(shape)):
        inner = math.prod(shape[d + 1:])
        term = f"x // {inner}" if inner != 1 else "x"
        body.append(f"i{d} = ({term}) % {shape[d]}" if d else f"i{d} = {term}")
    names: dict[fx.Node, str] = {}
    for k, node in enumerate(inputs):
        value = node.meta["val"]
        body.append(f"tmp_{node.name} = {load(f'in{k}', value, idx)}" + (".to(tl.float32)" if value.dtype in (torch.float16, torch.bfloat16) else ""))
        names[node] = f"tmp_{node.name}"
    for node in members:
        body.append(f"tmp_{node.name} = {_render(node, names)}")
        names[node] = f"tmp_{node.name}"
    for k, node in enumerate(outputs):
        value = node.meta["val"]
        offset = _index(tuple(value.shape), tuple(value.stride()), idx)
        body.append(f"tl.store(out{k} + ({offset}), {names[node]}.to({TL_DTYPES[value.dtype]}), mask=mask)")

    params = [f"in{k}" for k in range(len(inputs))] + [f"out{k}" for k in range(len(outputs))]
    header = [f"# {kernel.name}: {', '.join(kernel.nodes)}; iteration shape {list(shape)}"]
    header += [f"#   in{k} = {n.name}: {n.meta['val'].dtype}{list(n.meta['val'].shape)}" for k, n in enumerate(inputs)]
    header += [f"#   out{k} = {n.name}: {n.meta['val'].dtype}{list(n.meta['val'].shape)}" for k, n in enumerate(outputs)]
    source = "\n".join(header + ["@triton.jit", f"def {kernel.name}({', '.join(params)}, BLOCK: tl.constexpr):"]
                       + [f"    {line}" for line in body]) + "\n"
    return triton_kernel(kernel.name, source, [n.name for n in inputs], [n.name for n in outputs],
                         grid=f"(triton.cdiv({numel}, {BLOCK}),)", block=BLOCK)


def triton_kernel(name: str, source: str, inputs: list[str], outputs: list[str], grid: str,
                  block: int) -> GeneratedKernel:
    """A generated ``@triton.jit`` kernel taking its buffers in order, then ``BLOCK``."""
    launch = f"{name}[{grid}]({', '.join(inputs + outputs)}, BLOCK={block})"
    return GeneratedKernel(name, source, tuple(inputs), tuple(outputs), launch)
