"""What a generated C++ kernel takes and how it reads: its tensors (a pointer and the tensor's
strides each, passed per call, so a tensor laid out unlike the example still reads right), the
sizes of its iteration shape, and the thread count; then the C++ that reads an element at an
iteration index, and the wrapper statement that launches the kernel.

The kernel's C++ names no node and bakes in no size, so kernels of the same structure (every
block's residual-add + LayerNorm, say) are one library, built once and shared by graphs of any
sizes. Whether a tensor broadcasts along a dimension is structure (a size-1 example dimension);
whether its last dimension is contiguous is checked per call: each loop is written twice, a fast
copy for unit strides that vectorises and a general one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxpress.codegen.render import code
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.codegen.targets.cpp.expressions import CPP_TYPES, OPS, conversion, literal, reads
from fxpress.ir.match import aten

# Fewer elements than this run on one thread: a parallel region costs microseconds to open.
PARALLEL_MIN = 1 << 15


@dataclass(frozen=True)
class Operand:
    """One tensor a kernel reads or writes, as seen from the kernel's iteration shape."""

    node: fx.Node
    name: str  # the C++ pointer: in0, out1, ...
    rank: int
    # Per tensor dimension, the iteration dimension it runs along, None where it broadcasts.
    dims: tuple[int | None, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.node.meta["val"].dtype

    @property
    def ctype(self) -> str:
        return CPP_TYPES[self.dtype]

    def _inner(self, last_dim: int) -> int | None:
        """The tensor dimension that runs along the iteration's last one, None where it broadcasts."""
        return next((k for k, d in enumerate(self.dims) if d == last_dim), None)

    def parameters(self, writes: bool) -> list[str]:
        pointer = f"void* p_{self.name}" if writes else f"const void* p_{self.name}"
        return [pointer] + [f"int64_t {self.name}_s{k}" for k in range(self.rank)]

    def typed_pointer(self, writes: bool) -> str:
        const = "" if writes else "const "
        return f"{const}{self.ctype}* {self.name} = static_cast<{const}{self.ctype}*>(p_{self.name});"

    def row_offset(self, last_dim: int) -> str:
        """Offset of the row (all iteration indices but the last) the loop is on."""
        terms = [f"i{d} * {self.name}_s{k}" for k, d in enumerate(self.dims) if d is not None and d != last_dim]
        return " + ".join(terms) or "0"

    def column(self, last_dim: int) -> str:
        """The index within the row of column ``j``: ``U`` (the unit-stride copy of the loop) makes it ``j``."""
        k = self._inner(last_dim)
        if k is None:
            return "0"
        return f"(U ? j : j * {self.name}_s{k})"

    def unit_check(self, last_dim: int) -> str | None:
        k = self._inner(last_dim)
        if k is None:
            return None
        return f"{self.name}_s{k} == 1"

    def launch_arguments(self) -> list[str]:
        return [f"{self.node.name}.data_ptr()"] + [f"{self.node.name}.stride({k})" for k in range(self.rank)]


def operand(node: fx.Node, name: str, iteration: tuple) -> Operand:
    """``node``'s tensor broadcast (from the right) over ``iteration``: a size-1 dimension where the
    iteration's is not statically 1 broadcasts."""
    shape = tuple(node.meta["val"].shape)
    lead = len(iteration) - len(shape)
    dims = []
    for k, size in enumerate(shape):
        d = lead + k
        broadcast = isinstance(size, int) and size == 1 and not (isinstance(iteration[d], int) and iteration[d] == 1)
        dims.append(None if broadcast else d)
    return Operand(node, name, len(shape), tuple(dims))


def dtype_refusal(node: fx.Node) -> str | None:
    """Why one elementwise node cannot be C++ here (its op, dtypes or literals), or None."""
    target = node.target
    if target not in OPS and target is not aten._to_copy.default:
        return f"{target} has no C++ form"
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float32, torch.bool):
        return f"{node.name}: result is not float32 or bool"
    for position, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            if not isinstance(a.meta.get("val"), torch.Tensor):
                return f"{node.name}: reads {a.name}, a size computed at run time"
            dtype = a.meta["val"].dtype
            if not reads(target, position, dtype):
                return f"{node.name}: reads {dtype} ({a.name}), which the C++ kernels do not compute on"
        elif isinstance(a, (list, tuple, torch.SymInt, torch.SymFloat)):
            return f"{node.name}: non-scalar literal argument"
    try:
        expression(node, {a: "t" for a in node.all_input_nodes})
    except NotImplementedError as e:
        return f"{node.name}: {e}"
    except TypeError as e:  # an argument the renderer does not take (a keyword of another overload)
        return f"{node.name}: {e}"
    return None


def expression(node: fx.Node, names: dict[fx.Node, str]) -> str:
    """The C++ expression of one elementwise node over its operands' names."""
    args = [names[a] if isinstance(a, fx.Node) else a for a in node.args]
    if node.target is aten._to_copy.default:
        kwargs = {k: v for k, v in node.kwargs.items() if k not in ("pin_memory", "layout", "device")}
        dtype = kwargs.pop("dtype", node.args[0].meta["val"].dtype)
        if kwargs:
            raise NotImplementedError(f"_to_copy with {sorted(kwargs)}")
        return conversion(args[0], dtype)
    for a in args:
        if not isinstance(a, str):
            literal(a)  # refuses a non-finite one
    kwargs = {k: v for k, v in node.kwargs.items() if k != "pin_memory"}
    return OPS[node.target](*args, **kwargs)


def load(op: Operand, last_dim: int) -> str:
    return f"const {op.ctype} v_{op.name} = {op.name}_row[{op.column(last_dim)}];"


def cpp_value_type(node: fx.Node) -> str:
    return CPP_TYPES[node.meta["val"].dtype]


def signature(inputs: list[Operand], outputs: list[Operand], rank: int) -> tuple[str, list[str]]:
    """The C++ parameter list and the ctypes type of each parameter."""
    params, types = [], []
    for op, writes in [(o, False) for o in inputs] + [(o, True) for o in outputs]:
        params += op.parameters(writes)
        types += ["POINTER"] + ["LONG"] * op.rank
    params += [f"int64_t n{d}" for d in range(rank)] + ["int threads"]
    types += ["LONG"] * rank + ["INT"]
    return ", ".join(params), types


def index_lines(rank: int) -> list[str]:
    """Indices i0..i{rank-2} of row ``row`` over the leading iteration sizes."""
    lines = ["int64_t rest = row;"]
    for d in range(rank - 2, 0, -1):
        lines.append(f"const int64_t i{d} = rest % n{d}; rest /= n{d};")
    if rank >= 2:
        lines.append("const int64_t i0 = rest;")
    lines.append("(void)rest;")
    return lines


def unit_condition(operands: list[Operand], last_dim: int) -> str:
    checks = [c for c in (op.unit_check(last_dim) for op in operands) if c is not None]
    return " && ".join(checks) or "true"


def generated_kernel(name: str, title: str, body: str, argument_types: list[str], inputs: list[Operand],
                     outputs: list[Operand], iteration: tuple) -> GeneratedKernel:
    """The wrapper's side: the library built from ``body`` when the wrapper loads, and the launch."""
    types = ", ".join(argument_types)
    source = f"# {title}\n{name} = native_kernel(r'''\n{body}''', [{types}])\n"
    arguments = [a for op in inputs + outputs for a in op.launch_arguments()]
    arguments += [code(s) for s in iteration] + ["torch.get_num_threads()"]
    return GeneratedKernel(name, source, tuple(op.node.name for op in inputs), tuple(op.node.name for op in outputs),
                           launch=f"{name}({', '.join(arguments)})",
                           imports=("from fxpress.runtime.native_kernels import INT, LONG, POINTER, native_kernel",))
