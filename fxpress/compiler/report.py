"""What happened to one compiled graph, as data: explain() prints and serialises these."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxpress.compiler.pipeline import PassRecord
from fxpress.ir.support import Unsupported


def op_name(target: Any) -> str:
    """``aten.mm.default`` for ops, the function's name for Python callables."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def op_histogram(gm: fx.GraphModule) -> dict[str, int]:
    """How many times each op is called, most frequent first."""
    names = collections.Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return dict(names.most_common())


@dataclass
class GraphReport:
    index: int
    target: str
    target_notes: list[str] = field(default_factory=list)  # why target="auto" passed others over
    inputs: int = 0
    frozen_weights: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)
    fallback_reason: str | None = None  # set when the whole graph runs eagerly
    compile_seconds: float = 0.0
    code: str = ""
    kernels: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)  # name, kind, nodes
    plan: dict[str, Any] = field(default_factory=dict)  # arena/lower bound/naive bytes, order
    wrapper: str = ""  # the generated module's source
    memory_plan: Any = None  # the MemoryPlan itself, for fxpress.plot_memory
    generated: dict[str, str] = field(default_factory=dict)  # kernel -> generated Triton source
    not_generated: dict[str, str] = field(default_factory=dict)  # kernel -> why it stays torch
    integer_errors: list[dict[str, Any]] = field(default_factory=list)  # per integer-only site, measured
    cuda_graphs: str = ""  # with Options(cuda_graphs=True): "on", or "off: why"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "target": self.target,
            "target_notes": self.target_notes,
            "inputs": self.inputs,
            "frozen_weights": self.frozen_weights,
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "passes": [p.to_dict() for p in self.passes],
            "unsupported": [u.__dict__ for u in self.unsupported],
            "fallback_reason": self.fallback_reason,
            "compile_seconds": self.compile_seconds,
            "code": self.code,
            "kernels": [list(k) for k in self.kernels],
            "plan": self.plan,
            "wrapper": self.wrapper,
            "generated": self.generated,
            "not_generated": self.not_generated,
            "integer_errors": self.integer_errors,
            "cuda_graphs": self.cuda_graphs,
        }

    def plan_summary(self) -> str:
        if not self.plan:
            return "  no memory plan"
        kinds = collections.Counter(kind for _, kind, _ in self.kernels)
        arena, lower, naive = (self.plan[k] for k in ("arena_bytes", "lower_bound_bytes", "naive_bytes"))
        return (f"  kernels: {len(self.kernels)} ("
                + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")\n"
                f"  arena: {arena / 2**20:.2f} MiB = {arena / max(lower, 1):.3f} x lower bound, "
                f"{arena / max(naive, 1):.3f} x naive ({self.plan['order']} order)"
                + (f"\n  {self.target} kernels generated: {len(self.generated)}, left to torch: "
                   f"{len(self.not_generated)}" if self.generated or self.not_generated else ""))

    def integer_summary(self) -> list[str]:
        lines = []
        for row in self.integer_errors:
            if "note" in row:
                lines.append(f"    {row['note']}")
                continue
            lines.append(f"    {row['key']:<48} {row['method']:<6} max |err| {row['max_abs_error']:.3g}, "
                         f"mean {row['mean_abs_error']:.3g} (float max |y| {row['max_abs_value']:.3g})")
        return ["  integer-only rewrites, error vs the float op on the same input:", *lines] if lines else []

    def summary(self) -> str:
        if self.fallback_reason:
            return f"graph {self.index}: ran eagerly ({self.fallback_reason})"
        return (
            f"graph {self.index}: {sum(self.ops_before.values())} -> {sum(self.ops_after.values())} "
            f"ops, {self.frozen_weights} frozen weights, {self.inputs} runtime inputs, "
            f"target {self.target}, compiled in {self.compile_seconds:.2f} s"
        )
