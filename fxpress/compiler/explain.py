"""``fxpress.explain``: compile a model once and report what fxpress did to it.

The report lists the graphs Dynamo captured and why it broke between them, each pass with its
time and what fired, the op histogram before and after the pipeline, nodes left to fallback, and
how far the compiled outputs are from eager's on the given inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fxpress.compiler.backend import Backend
from fxpress.ir.options import Options
from fxpress.compiler.report import GraphReport
from fxpress.core.progress import stage_bar


@dataclass
class Report:
    graphs: list[GraphReport] = field(default_factory=list)
    graph_breaks: dict[str, int] = field(default_factory=dict)  # reason -> count
    max_abs_diff: float | None = None  # compiled vs eager on the explained inputs

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": [g.to_dict() for g in self.graphs],
            "graph_breaks": self.graph_breaks,
            "max_abs_diff": self.max_abs_diff,
        }

    def __str__(self) -> str:
        breaks = sum(self.graph_breaks.values())
        diff = "not compared" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        out = [f"fxpress: {len(self.graphs)} graph(s), {breaks} graph break(s), "
               f"max |compiled - eager| = {diff}"]
        out += [f"  break: {reason} (x{n})" for reason, n in self.graph_breaks.items()]
        for g in self.graphs:
            out.append(g.summary())
            out += [f"  {note}" for note in g.target_notes]
            if g.cuda_graphs:
                out.append(f"  CUDA graph replay: {g.cuda_graphs}")
            if g.fallback_reason:
                out += [f"  unsupported: {u}" for u in g.unsupported]
                continue
            out.append("  passes:")
            for p in g.passes:
                fired = "; ".join(f"{k}: {v}" for c in p.counters.values() for k, v in c.items())
                out.append(f"    {p.name:<24} {p.seconds * 1e3:8.1f} ms  {p.nodes_before:>5} -> "
                           f"{p.nodes_after:<5} {fired}")
            out.append("  ops (captured -> final):")
            for op in sorted(set(g.ops_before) | set(g.ops_after),
                             key=lambda o: -max(g.ops_before.get(o, 0), g.ops_after.get(o, 0))):
                out.append(f"    {op:<50} {g.ops_before.get(op, 0):>5} -> {g.ops_after.get(op, 0)}")
            out.extend(g.integer_summary())
            out.append(g.plan_summary())
            out.append("  left to fallback: none" if not g.unsupported else
                       "  left to fallback: " + ", ".join(map(str, g.unsupported)))
        return "\n".join(out)


def _max_abs_diff(a: Any, b: Any) -> float:
    left = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    right = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(left) != len(right):
        raise AssertionError(f"compiled returned {len(left)} tensors, eager {len(right)}")
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in zip(left, right) if x.numel()]
    return max(diffs, default=0.0)


def explain(
    model: Callable[..., Any], *args: Any, kwargs: dict[str, Any] | None = None, **options: Any
) -> Report:
    """Compile ``model`` with fxpress on ``args``/``kwargs`` and report what happened.

    Resets Dynamo's caches first (as ``torch._dynamo.explain`` does) so every graph is compiled
    afresh and seen. Eager runs on deep copies of the inputs, so a stateful call (a StaticCache
    passed in ``kwargs``) is advanced once, by the compiled run.
    """
    kwargs = kwargs or {}
    report = Report()
    backend = Backend(Options.create(**options), on_report=report.graphs.append)
    torch._dynamo.reset()
    breaks_before = dict(torch._dynamo.utils.counters["graph_break"])
    bar = stage_bar("explain", 2)
    step = bar or (lambda stage: None)
    try:
        with torch.no_grad():
            step("eager run")
            eager_args, eager_kwargs = copy.deepcopy((args, kwargs))
            expected = model(*eager_args, **eager_kwargs)
            step("compile and run")
            actual = torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    report.graph_breaks = {
        reason: n - breaks_before.get(reason, 0)
        for reason, n in torch._dynamo.utils.counters["graph_break"].items()
        if n != breaks_before.get(reason, 0)
    }
    report.max_abs_diff = _max_abs_diff(actual, expected)
    return report
