"""The ``fxpress`` command line (also ``python -m fxpress``).

    fxpress compile examples.models:minilm -o minilm.fxpress --input "int64[2,seq=16:512]" --option target=cpu
    fxpress inspect minilm.fxpress [--graph] [--wrapper] [--kernels] [--json]
    fxpress run minilm.fxpress [--size seq=32] [--repeat 10]

``compile`` imports ``module:factory`` and calls the factory with no arguments. It returns the model,
or ``(model, args)`` / ``(model, args, kwargs)`` with example inputs; otherwise ``--input`` (one per
positional input) and ``--kwarg name=SPEC`` describe them. A SPEC is ``dtype[d0,d1,...]``; a
dimension written ``name=N`` is dynamic (``torch.export.Dim(name)``) with example size N;
``name=N:MAX`` bounds it (``Dim(name, max=MAX)``).
``--option key=value`` takes the options of ``fxpress.backend``: Python literals, or a KV policy /
integer-only config such as ``kv=KIVI(bits=2)``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fxpress.core.version import VERSION

if TYPE_CHECKING:
    import torch

# torch and the rest of fxpress are imported by the commands that need them, so that --help and
# --version answer at once.

_SPEC = re.compile(r"^\s*(\w+)\s*\[(.*)\]\s*$")


class CliError(ValueError):
    """A command-line argument that cannot be used; the message says which and why."""


def parse_spec(text: str) -> tuple[torch.dtype, list[int], dict[int, tuple[str, int, int | None]]]:
    """``int64[2,seq=16:512]`` -> (torch.int64, [2, 16], {1: ("seq", 16, 512)}): a dimension is N,
    or name=N (dynamic, example size N), or name=N:MAX (dynamic up to MAX, which models with
    position tables need: export refuses an unbounded sequence length for them)."""
    import torch

    match = _SPEC.match(text)
    dtype = getattr(torch, match.group(1), None) if match else None
    if not isinstance(dtype, torch.dtype):
        raise CliError(f"input spec {text!r}: expected dtype[d0,d1,...] such as float32[1,128] or int64[2,seq=16:512]")
    sizes, dynamic = [], {}
    for i, part in enumerate(p.strip() for p in match.group(2).split(",") if p.strip()):
        name, _, size = part.rpartition("=")
        size, colon, maximum = size.partition(":")
        if not size.isdigit() or (name and not name.isidentifier()) or (colon and not (name and maximum.isdigit())):
            raise CliError(f"input spec {text!r}: dimension {part!r} is neither N, name=N nor name=N:MAX")
        sizes.append(int(size))
        if name:
            dynamic[i] = (name, int(size), int(maximum) if colon else None)
    return dtype, sizes, dynamic


def random_input(dtype: torch.dtype, sizes: Sequence[int], int_high: int) -> torch.Tensor:
    import torch

    if dtype.is_floating_point:
        return torch.randn(*sizes).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(sizes)).bool()
    return torch.randint(0, int_high, tuple(sizes), dtype=dtype)


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value``: a Python literal, a bare word (a string), or a call of one of fxpress's policy
    or config classes with literal arguments (or such calls). Nothing else is evaluated."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise CliError(f"--option {text!r}: expected key=value")
    try:
        tree = ast.parse(value, mode="eval").body
    except SyntaxError:
        return key, value
    if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name):
        return key, _construct(tree, text)
    if isinstance(tree, ast.Name):
        return key, value
    try:
        return key, ast.literal_eval(tree)
    except ValueError:
        raise CliError(f"--option {text!r}: {value!r} is not a literal") from None


_CONSTRUCTIBLE = ("KIVI", "FullKV", "StreamingKV", "DuoAttentionKV", "HeavyHitterKV", "ThinKV", "IntegerOnly")


def _construct(call: ast.Call, text: str) -> Any:
    """One of fxpress's policy or config classes, called with literals or with such calls
    (``ThinKV(kivi=KIVI(bits=2))``)."""
    import fxpress

    name = call.func.id if isinstance(call.func, ast.Name) else ast.unparse(call.func)
    if name not in _CONSTRUCTIBLE:
        raise CliError(f"--option {text!r}: {name} is not one of {sorted(_CONSTRUCTIBLE)}")

    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.Call):
            return _construct(node, text)
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise CliError(f"--option {text!r}: arguments must be literals") from None
    return getattr(fxpress, name)(*[value(a) for a in call.args], **{k.arg: value(k.value) for k in call.keywords})


class Progress:
    """Each stage on its own line with the seconds since the start; on a terminal the current
    line ticks while a long stage runs."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream, self.start, self.stage = stream, time.perf_counter(), ""
        self.done = threading.Event()
        self.live = stream.isatty()
        if self.live:
            threading.Thread(target=self._tick, daemon=True).start()

    def _line(self) -> str:
        return f"[{time.perf_counter() - self.start:7.1f}s] {self.stage}"

    def __call__(self, stage: str) -> None:
        if self.stage:
            self.stream.write(("\r" if self.live else "") + self._line() + "\n")
        self.stage = stage
        self.stream.flush()

    def _tick(self) -> None:
        while not self.done.wait(0.5):
            if self.stage:
                self.stream.write("\r" + self._line() + " ...")
                self.stream.flush()

    def finish(self) -> None:
        self("")
        self.done.set()


def _factory(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not attr:
        raise CliError(f"model {target!r}: expected module:factory, e.g. mypackage.models:build")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"model {target!r}: cannot import {module_name}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"model {target!r}: {module_name} has no callable {attr}")
    return factory()


def _examples(made: Any, inputs: list[str], kwargs: list[str]) -> tuple[Any, tuple, dict, Any]:
    """The model, example args and kwargs, and export's dynamic_shapes (or None)."""
    import torch
    from torch.export import Dim

    model, args, kw = made, None, {}
    if isinstance(made, tuple):
        model, args, kw = (*made, {})[:3]
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
    if args is not None and (inputs or kwargs):
        raise CliError("the factory returned example inputs; drop --input / --kwarg")
    if args is not None:
        return model, tuple(args), dict(kw), None
    if not inputs and not kwargs:
        raise CliError("no example inputs: give --input SPEC (one per positional input) or --kwarg name=SPEC")
    dims: dict[str, Any] = {}  # one Dim per name: inputs sharing a name share the size

    def build(spec: str) -> tuple[torch.Tensor, dict[int, Any] | None]:
        dtype, sizes, dynamic = parse_spec(spec)
        return random_input(dtype, sizes, 100), {i: dims.setdefault(name, Dim(name, max=maximum) if maximum else Dim(name))
                                                 for i, (name, _, maximum) in dynamic.items()} or None

    built_args = [build(s) for s in inputs]
    built_kwargs = {}
    for item in kwargs:
        name, sep, spec = item.partition("=")
        if not sep:
            raise CliError(f"--kwarg {item!r}: expected name=SPEC")
        built_kwargs[name] = build(spec)
    args = tuple(t for t, _ in built_args)
    kw = {k: t for k, (t, _) in built_kwargs.items()}
    # export takes one spec per input, positional ones first, then keywords in order
    shapes = tuple(d for _, d in built_args) + tuple(d for _, d in built_kwargs.values())
    return model, args, kw, shapes if dims else None


def cmd_compile(ns: argparse.Namespace) -> int:
    import fxpress

    options = dict(parse_option(o) for o in ns.option)
    progress = Progress()
    progress(f"building {ns.model}")
    model, args, kwargs, dynamic = _examples(_factory(ns.model), ns.input, ns.kwarg)
    if hasattr(model, "eval"):
        model.eval()
    try:
        fxpress.aot_compile(model, args, ns.output, dynamic_shapes=dynamic, example_kwargs=kwargs,
                            progress=progress, **options)
    finally:
        progress.finish()
    print(f"wrote {ns.output}")
    return 0


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def cmd_inspect(ns: argparse.Namespace) -> int:
    from fxpress.compiler import artifact

    folder = Path(ns.path)
    meta = artifact.read_meta(folder, check_versions=False)
    if ns.json:
        print(json.dumps(meta, indent=1))
        return 0
    try:
        artifact.verify(folder, meta)
        integrity = "every file matches meta.json"
    except artifact.ArtifactError as e:
        integrity = f"PROBLEM: {e}"
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    print(f"{folder}: fxpress artifact format {meta['format']}, compiled with {versions}")
    print(f"target {meta['target']} on {meta['device']}; files: {integrity}")
    print(f"pass sources sha256 {meta['pass_sources_sha256'][:16]}...")
    changed = {k: v for k, v in meta["options"].items() if v not in (None, False, [], "", "auto")}
    print(f"options: {json.dumps(changed)}")
    print("inputs:")
    names = meta["dim_names"]
    for spec in meta["inputs"]:
        print(f"  {spec['name']}: {spec['dtype']}[{', '.join(str(names.get(s, s)) for s in spec['shape'])}]")
    if meta["symbols"]:
        print(f"  example sizes: {({names.get(s, s): n for s, n in meta['symbols'].items()})}")
    state = [x for kind, x in meta["runtime_inputs"] if kind == "state"]
    if state:
        print(f"state the graph writes ({len(state)}): {', '.join(state[:6])}{' ...' if len(state) > 6 else ''}")
    for kv in meta["kv_states"]:
        print(f"KV state: {kv['where']}, {kv['policy']['class']}({kv['policy']['fields']}), max_len {kv['max_len']}")
    print("passes:")
    for record in meta["passes"]:
        fired = "; ".join(f"{rule}: {n}" for group in record["counters"].values() for rule, n in group.items())
        print(f"  {record['name']:<24} {'modified' if record['modified'] else '-':<9} {fired}")
    plan = meta["plan"]
    print(f"memory plan: arena {_size(plan['arena_bytes'])}, lower bound {_size(plan['lower_bound_bytes'])}, "
          f"naive {_size(plan['naive_bytes'])}, order {plan['order']}")
    kinds = Counter(k["kind"] for k in meta["kernels"])
    generated = sum(k["generated"] for k in meta["kernels"])
    print(f"kernels: {len(meta['kernels'])}, {generated} of them generated ({meta['target']} target); "
          + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()))
    if ns.kernels:
        for kernel in meta["kernels"]:
            how = meta["target"] if kernel["generated"] else (kernel["why_not_generated"] or "torch")
            print(f"  {kernel['name']:<40} {kernel['kind']:<10} {how}")
    print("files:")
    for name, record in meta["files"].items():
        print(f"  {name:<40} {_size(record['bytes'])}")
    for flag, names in (("graph", ["graph.txt"]), ("wrapper", ["wrapper.py"]),
                        ("kernels", [n for n in meta["files"] if n.startswith("kernels/")])):
        if getattr(ns, flag):
            for name in names:
                print(f"\n# ---- {name}\n{artifact.read_file(folder, meta, name).decode()}")
    return 0


def _run_sizes(meta: dict[str, Any], given: list[str]) -> dict[str, int]:
    """Each symbolic size: its example, or what ``--size name=N`` says (the name the dimension was
    given at compile time, or its symbol)."""
    sizes = dict(meta["symbols"])
    symbol_of = {name: symbol for symbol, name in meta["dim_names"].items()}
    for item in given:
        name, _, value = item.partition("=")
        symbol = symbol_of.get(name, name)
        if symbol not in sizes or not value.isdigit():
            known = sorted(meta["dim_names"].get(s, s) for s in sizes)
            raise CliError(f"--size {item!r}: expected NAME=N with NAME one of {known or 'none (no dynamic sizes)'}")
        sizes[symbol] = int(value)
    return sizes


def _run_input(spec: dict[str, Any], sizes: dict[str, int], int_high: int) -> torch.Tensor:
    """An input for ``fxpress run``: positions count from 0 (a prefill from an empty cache) and
    attention masks are all ones, so a KV-cache artifact runs as a model would; others are random."""
    import torch

    dtype = getattr(torch, spec["dtype"])
    shape = [sizes[s] if isinstance(s, str) else s for s in spec["shape"]]
    name = (re.findall(r"\w+", spec["name"]) or [""])[-1]  # input_ids, kwargs['cache_position'] -> the last word
    if not dtype.is_floating_point and name in ("cache_position", "position_ids") and shape:
        return torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
    if name == "attention_mask":
        return torch.ones(shape, dtype=dtype)
    return random_input(dtype, shape, int_high)


def cmd_run(ns: argparse.Namespace) -> int:
    import torch

    import fxpress

    model = fxpress.load(ns.path)
    sizes = _run_sizes(model.meta, ns.size)
    device = model.meta["device"]
    flat = [_run_input(spec, sizes, ns.int_high).to(device) for spec in model.meta["inputs"]]
    kwargs = dict(zip(model.meta["kwargs"], flat[len(flat) - len(model.meta["kwargs"]):]))
    args = flat[: len(flat) - len(kwargs)]
    times = []
    for _ in range(ns.repeat):
        start = time.perf_counter()
        out = model(*args, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    for i, leaf in enumerate(leaves):
        finite = bool(torch.isfinite(leaf).all()) if leaf.is_floating_point() else True
        print(f"output {i}: {str(leaf.dtype).removeprefix('torch.')}{list(leaf.shape)}"
              f"{'' if finite else ' (has non-finite values)'}")
    first, median = times[0], sorted(times)[len(times) // 2]
    print(f"{ns.repeat} call(s): first {first * 1e3:.2f} ms, median {median * 1e3:.2f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpress", description="Compile models ahead of time with fxpress, "
                                     "and inspect or run the artifacts.")
    parser.add_argument("--version", action="version", version=f"fxpress {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="export, compile and write an artifact folder")
    c.add_argument("model", help="module:factory returning the model (or (model, args[, kwargs]))")
    c.add_argument("-o", "--output", required=True, help="artifact folder to write")
    c.add_argument("--input", action="append", default=[], metavar="SPEC", help="a positional input, e.g. int64[1,seq=16:512]")
    c.add_argument("--kwarg", action="append", default=[], metavar="NAME=SPEC", help="a keyword input")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="an fxpress.backend option")
    c.set_defaults(run=cmd_compile)
    i = sub.add_parser("inspect", help="print an artifact's graph, passes, plan, kernels and versions")
    i.add_argument("path")
    for flag in ("graph", "wrapper", "kernels", "json"):
        i.add_argument(f"--{flag}", action="store_true", help={
            "graph": "also print graph.txt", "wrapper": "also print wrapper.py",
            "kernels": "also list every kernel and print the generated Triton sources",
            "json": "print meta.json instead"}[flag])
    i.set_defaults(run=cmd_inspect)
    r = sub.add_parser("run", help="load an artifact and run it on random inputs of its recorded specs")
    r.add_argument("path")
    r.add_argument("--size", action="append", default=[], metavar="NAME=N", help="a dynamic dimension's size")
    r.add_argument("--repeat", type=int, default=1, help="calls to time (the first is printed apart: it warms up)")
    r.add_argument("--int-high", type=int, default=100, help="integer inputs are drawn from [0, this)")
    r.set_defaults(run=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fxpress.core.errors import FxpressError

    ns = build_parser().parse_args(argv)
    try:
        return ns.run(ns)
    except (CliError, FxpressError) as e:
        print(f"fxpress {ns.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (| head): not an error
        sys.stderr.close()
        return 0
