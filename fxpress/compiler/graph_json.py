"""The final graph of an artifact as data: JSON in, a GraphModule with FakeTensor metadata out.

``fxpress.load`` regenerates the wrapper and its kernels from this, never running code an artifact
carries. Each node is its op name (an ``aten``/``fxpress``/``prims`` overload, or one of a few
Python operators on sizes), its arguments (literals, other nodes, dtypes, devices, layouts) and the
metadata codegen reads: per tensor its dtype, device, sizes, strides and offset, with sizes as
expressions in the graph's size symbols. Symbols come back with their recorded names, value ranges
and example values, so the schedule and memory plan are decided exactly as at compile time.

Anything else (an unknown op, an argument of another kind) is refused with ``ArtifactError``,
naming the node and the field.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from fxpress.compiler.artifact import ArtifactError

FORMAT = 1
_OP_NAMESPACES = ("aten", "fxpress", "prims")
# Python operators that graphs apply to sizes and tuples; nothing else is callable from JSON.
_PYTHON_OPS = {f"operator.{name}": getattr(operator, name) for name in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge")}
_PYTHON_OPS.update({f"torch.{name}": getattr(torch, name) for name in ("sym_max", "sym_min", "sym_not", "sym_float",
                                                                          "sym_int", "sym_ite")})
_SPECIALS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


# writing ----------------------------------------------------------------------------------------

def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[1]}.{target._overloadname}"
    for name, fn in _PYTHON_OPS.items():
        if fn is target:
            return name
    raise ArtifactError(f"the graph calls {target!r}, which an artifact cannot store as data")


def _size_functions() -> dict[str, Any]:
    """The sympy functions size expressions are made of, by name: nothing else is rebuilt."""
    import torch.utils._sympy.functions as torch_sympy

    names = ("FloorDiv", "CeilDiv", "CleanDiv", "Mod", "PythonMod", "ModularIndexing", "PowByNatural", "Max", "Min",
             "Identity")
    functions = {name: getattr(torch_sympy, name) for name in names if hasattr(torch_sympy, name)}
    functions.update(Add=sympy.Add, Mul=sympy.Mul, Pow=sympy.Pow, Rational=sympy.Rational)
    return functions


def _tree(expr: sympy.Expr) -> Any:
    """A size expression as a tree: an int, a symbol's name, or ``{"f": function, "a": [args]}``."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return str(expr)
    if expr.is_Rational:
        return {"f": "Rational", "a": [int(expr.p), int(expr.q)]}
    name = type(expr).__name__
    if name not in _size_functions():
        raise ArtifactError(f"size expression {expr} uses {name}, which an artifact cannot store")
    return {"f": name, "a": [_tree(a) for a in expr.args]}


def _expr(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        return _tree(value.node.expr)
    return int(value)


def _value(value: Any) -> Any:
    """Arguments: JSON literals stay as they are; everything else is a one-key object."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_value(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ArtifactError(f"an argument of type {type(value).__name__} ({value!r}) cannot be stored as data")


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": {"dtype": str(value.dtype).removeprefix("torch."), "device": str(value.device),
                           "size": [_expr(s) for s in value.shape], "stride": [_expr(s) for s in value.stride()],
                           "offset": _expr(value.storage_offset())}}
    if isinstance(value, torch.SymInt):
        return {"symint": _expr(value)}
    if isinstance(value, (list, tuple)):
        return {"list": [_meta(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float)):
        return _value(value)
    return None  # metadata codegen does not read (SymFloat, SymBool, opaque objects)


def _symbols(gm: fx.GraphModule, hints: dict[str, int]) -> dict[str, dict[str, Any]]:
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if "val" in n.meta])
    env = getattr(mode, "shape_env", None)
    records = {}
    for sym, vr in (env.var_to_range.items() if env is not None else ()):
        name = str(sym)
        # Unbounded ends are torch's int_oo (or sympy's oo): stored as null.
        lower = int(vr.lower) if getattr(vr.lower, "is_Integer", False) else None
        upper = int(vr.upper) if getattr(vr.upper, "is_Integer", False) else None
        records[name] = {"positive": bool(sym.is_positive), "lower": lower, "upper": upper, "hint": hints.get(name)}
    return records


def dump(gm: fx.GraphModule, hints: dict[str, int]) -> dict[str, Any]:
    nodes = []
    for node in gm.graph.nodes:
        record: dict[str, Any] = {"name": node.name, "op": node.op, "meta": _meta(node.meta.get("val"))}
        if node.op == "call_function":
            record.update(target=_op_name(node.target), args=_value(tuple(node.args)),
                          kwargs={k: _value(v) for k, v in node.kwargs.items()})
        elif node.op == "get_attr":
            record["target"] = node.target
        elif node.op == "output":
            record["args"] = _value(tuple(node.args))
        elif node.op != "placeholder":
            raise ArtifactError(f"node {node.name} is a {node.op}; artifacts hold flat ATen graphs")
        nodes.append(record)
    return {"format": FORMAT, "symbols": _symbols(gm, hints), "nodes": nodes}


# reading ----------------------------------------------------------------------------------------

class _Reader:
    """Rebuilds one graph; every error names the node and the field being read."""

    def __init__(self, data: dict[str, Any], constants: dict[str, torch.Tensor], where: str) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.where, self.constants = where, constants
        self.env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=True)
        self.symbols = self._make_symbols(self._field(data, "symbols", dict))
        self.nodes: dict[str, fx.Node] = {}
        self.at = "graph.json"

    def fail(self, message: str) -> ArtifactError:
        return ArtifactError(f"{self.where}/graph.json: {self.at}: {message}")

    def _field(self, record: Any, key: str, kind: type | tuple[type, ...]) -> Any:
        if not isinstance(record, dict) or key not in record:
            raise self.fail(f"missing field {key!r}")
        if not isinstance(record[key], kind):
            raise self.fail(f"field {key!r} must be {getattr(kind, '__name__', kind)}, got {type(record[key]).__name__}")
        return record[key]

    def _make_symbols(self, records: dict[str, Any]) -> dict[str, sympy.Symbol]:
        from torch.utils._sympy.numbers import int_oo
        from torch.utils._sympy.value_ranges import ValueRanges

        # Renamed in torch 2.12; the old name still works there but warns.
        values = self.env.backed_var_to_val if hasattr(self.env, "backed_var_to_val") else self.env.var_to_val
        self.hints: dict[sympy.Symbol, int] = {}
        symbols = {}
        for name, record in records.items():
            self.at = f"symbol {name!r}"
            if not name.isidentifier() or not isinstance(record, dict):
                raise self.fail("a symbol is a name with a record")
            sym = sympy.Symbol(name, integer=True, positive=bool(record.get("positive")))
            lower, upper, hint = record.get("lower"), record.get("upper"), record.get("hint")
            if not all(v is None or isinstance(v, int) and not isinstance(v, bool) for v in (lower, upper, hint)):
                raise self.fail("lower, upper and hint must be ints or null")
            self.env.var_to_range[sym] = ValueRanges(sympy.Integer(lower) if lower is not None else -int_oo,
                                                     sympy.Integer(upper) if upper is not None else int_oo)
            if hint is not None:
                values[sym] = sympy.Integer(hint)
                self.hints[sym] = hint
            symbols[name] = sym
        return symbols

    def expr(self, tree: Any, depth: int = 0) -> sympy.Expr:
        if depth > 64:
            raise self.fail("a size expression nests too deeply")
        if isinstance(tree, int) and not isinstance(tree, bool):
            return sympy.Integer(tree)
        if isinstance(tree, str):
            if tree not in self.symbols:
                raise self.fail(f"a size names the unknown symbol {tree!r}")
            return self.symbols[tree]
        functions = _size_functions()
        if not isinstance(tree, dict) or set(tree) != {"f", "a"} or tree["f"] not in functions \
                or not isinstance(tree["a"], list):
            raise self.fail(f"a size must be an int, a symbol or a known function of them, got {tree!r}")
        args = [self.expr(a, depth + 1) for a in tree["a"]]
        try:
            return functions[tree["f"]](*args)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise self.fail(f"size {tree!r} cannot be rebuilt: {e}") from None

    def size(self, tree: Any) -> Any:
        expr = self.expr(tree)
        if expr.is_number:
            if not expr.is_Integer:
                raise self.fail(f"size {tree!r} is not an integer")
            return int(expr)
        hint = expr.subs({s: self.hints.get(s, 1) for s in expr.free_symbols})
        return self.env.create_symintnode(expr, hint=int(hint) if hint.is_number else None)

    def _torch_name(self, kind: str, name: Any, cls: type) -> Any:
        value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
        if not isinstance(value, cls):
            raise self.fail(f"{name!r} is not a torch {kind}")
        return value

    def value(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            raise self.fail(f"an argument must be a literal or a one-key object, got {value!r}")
        (kind, body), = value.items()
        if kind == "node":
            if body not in self.nodes:
                raise self.fail(f"refers to node {body!r} before it is defined")
            return self.nodes[body]
        if kind in ("list", "tuple"):
            if not isinstance(body, list):
                raise self.fail(f"{kind} must hold a list")
            items = [self.value(v) for v in body]
            return items if kind == "list" else tuple(items)
        if kind == "float" and body in _SPECIALS:
            return _SPECIALS[body]
        if kind == "dtype":
            return self._torch_name(kind, body, torch.dtype)
        if kind == "layout":
            return self._torch_name(kind, body, torch.layout)
        if kind == "memory_format":
            return self._torch_name(kind, body, torch.memory_format)
        if kind == "device":
            try:
                return torch.device(body)
            except (RuntimeError, TypeError):
                raise self.fail(f"{body!r} is not a device") from None
        raise self.fail(f"unknown argument kind {kind!r}")

    def target(self, name: Any) -> Any:
        if name in _PYTHON_OPS:
            return _PYTHON_OPS[name]
        parts = name.split(".") if isinstance(name, str) else []
        if len(parts) == 3 and parts[0] in _OP_NAMESPACES and all(p.isidentifier() for p in parts):
            try:
                op = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
            except (AttributeError, RuntimeError):
                op = None
            if isinstance(op, torch._ops.OpOverload):
                return op
        raise self.fail(f"op {name!r} is not an aten, fxpress or prims overload, nor a size operator")

    def meta(self, record: Any) -> Any:
        if record is None or isinstance(record, (bool, int, float)):
            return record
        if not isinstance(record, dict) or len(record) != 1:
            raise self.fail(f"meta must be a literal or a one-key object, got {record!r}")
        (kind, body), = record.items()
        if kind == "symint":
            return self.size(body)
        if kind == "list":
            return tuple(self.meta(v) for v in self._field(record, "list", list))
        if kind == "float" and body in _SPECIALS:
            return _SPECIALS[body]
        if kind != "tensor":
            raise self.fail(f"unknown meta kind {kind!r}")
        dtype = self._torch_name("dtype", self._field(body, "dtype", str), torch.dtype)
        device = self.value({"device": self._field(body, "device", str)})
        sizes = [self.size(s) for s in self._field(body, "size", list)]
        strides = [self.size(s) for s in self._field(body, "stride", list)]
        if len(sizes) != len(strides):
            raise self.fail("size and stride differ in length")
        offset = self.size(body.get("offset", 0))
        with self.mode:
            base = torch.empty_strided(sizes, strides, dtype=dtype, device=device)
            return base if offset == 0 else base.as_strided(sizes, strides, offset)

    def graph(self, data: dict[str, Any]) -> fx.GraphModule:
        root = torch.nn.Module()
        graph = fx.Graph()
        for index, record in enumerate(self._field(data, "nodes", list)):
            self.at = f"node {index}"
            name = self._field(record, "name", str)
            op = self._field(record, "op", str)
            self.at = f"node {index} ({name})"
            if not name.isidentifier():
                raise self.fail("a node name must be an identifier")
            if op == "placeholder":
                node = graph.create_node("placeholder", name, name=name)
            elif op == "get_attr":
                target = self._field(record, "target", str)
                if not target.isidentifier() or target not in self.constants:
                    raise self.fail(f"constant {target!r} is not in weights.safetensors")
                if not hasattr(root, target):
                    root.register_buffer(target, self.constants[target], persistent=False)
                node = graph.create_node("get_attr", target, name=name)
            elif op == "call_function":
                args = self.value(self._field(record, "args", dict))
                kwargs = {k: self.value(v) for k, v in self._field(record, "kwargs", dict).items()}
                if not isinstance(args, tuple):
                    raise self.fail("args must be a tuple")
                node = graph.create_node("call_function", self.target(record.get("target")), args, kwargs, name=name)
            elif op == "output":
                args = self.value(self._field(record, "args", dict))
                graph.output(args[0] if isinstance(args, tuple) and len(args) == 1 else args)
                continue
            else:
                raise self.fail(f"op must be placeholder, get_attr, call_function or output, got {op!r}")
            if node.name != name:
                raise self.fail(f"node name {name!r} is used twice")
            value = self.meta(record.get("meta"))
            if value is not None:
                node.meta["val"] = value
            self.nodes[name] = node
        return fx.GraphModule(root, graph)


def load(data: Any, constants: dict[str, torch.Tensor], where: str) -> fx.GraphModule:
    """The graph ``dump`` wrote, its constants bound; refuses anything else with ArtifactError."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{where}/graph.json is not graph format {FORMAT}")
    reader = _Reader(data, constants, where)
    return reader.graph(data)
