"""plan_memory's invariants on random schedules, static and symbolic, and on real graphs."""

from __future__ import annotations

import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpress.codegen.schedule import Buffer, Kernel, Schedule, build_schedule, size_hints
from fxpress.codegen.plan_memory import ALIGN, check_plan, plan_memory

S0 = sympy.Symbol("s0", integer=True, positive=True)


@st.composite
def schedules(draw, symbolic: bool = False) -> Schedule:
    """A random DAG of kernels: each writes one buffer, reads some earlier ones; some are views."""
    n = draw(st.integers(1, 40))
    kernels, buffers = [], {"in": Buffer("in", sympy.Integer(256), torch.float32, "input")}
    names = ["in"]
    for i in range(n):
        reads = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
        name = f"b{i}"
        size = draw(st.integers(1, 5000))
        nbytes = size * S0 if symbolic and draw(st.booleans()) else sympy.Integer(size)
        if reads and draw(st.integers(0, 4)) == 0:  # a view of the first buffer it reads
            base = buffers[reads[0]].alias_of or reads[0]
            buffers[name] = Buffer(name, nbytes, torch.float32, "view", alias_of=base)
            kind = "view"
        else:
            buffers[name] = Buffer(name, nbytes, torch.float32, "arena")
            kind = "pointwise"
        kernels.append(Kernel(f"k{i}", kind, (name,), tuple(reads), (name,)))
        names.append(name)
    return Schedule(tuple(kernels), buffers)


def _bounds_hold(plan, values=None) -> None:
    check_plan(plan, values)
    arena, lower, naive = (plan.evaluate(e, values) for e in
                           (plan.arena_bytes, plan.lower_bound_bytes, plan.naive_bytes))
    assert lower <= arena <= naive
    assert all(plan.evaluate(s.offset, values) % ALIGN == 0 for s in plan.slots.values())


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_static_plans_never_overlap_and_respect_bounds(schedule):
    plan = plan_memory(schedule)
    _bounds_hold(plan)
    assert set(plan.order) == {k.name for k in schedule.kernels}


@settings(max_examples=150, deadline=None)
@given(schedules(symbolic=True), st.integers(1, 64), st.lists(st.integers(1, 512), min_size=1, max_size=4))
def test_symbolic_plans_hold_for_every_size(schedule, hint, others):
    plan = plan_memory(schedule, hints={"s0": hint})
    for value in [hint, *others]:  # decided at the hint, valid everywhere
        _bounds_hold(plan, {"s0": value})


def test_plan_respects_dependencies():
    schedule = Schedule(
        (Kernel("a", "pointwise", ("x",), ("in",), ("x",)),
         Kernel("b", "pointwise", ("y",), ("x",), ("y",)),
         Kernel("c", "pointwise", ("z",), ("in",), ("z",)),
         Kernel("d", "pointwise", ("w",), ("y", "z"), ("w",))),
        {"in": Buffer("in", sympy.Integer(64), torch.float32, "input"),
         **{n: Buffer(n, sympy.Integer(1024), torch.float32, "arena") for n in "xyzw"}},
    )
    plan = plan_memory(schedule)
    position = {k: i for i, k in enumerate(plan.order)}
    assert position["a"] < position["b"] < position["d"] and position["c"] < position["d"]


def test_views_keep_their_base_alive():
    schedule = Schedule(
        (Kernel("a", "pointwise", ("x",), ("in",), ("x",)),
         Kernel("v", "view", ("xv",), ("x",), ("xv",)),
         Kernel("b", "pointwise", ("y",), ("in",), ("y",)),
         Kernel("c", "pointwise", ("z",), ("xv", "y"), ("z",))),
        {"in": Buffer("in", sympy.Integer(64), torch.float32, "input"),
         "x": Buffer("x", sympy.Integer(4096), torch.float32, "arena"),
         "xv": Buffer("xv", sympy.Integer(4096), torch.float32, "view", alias_of="x"),
         "y": Buffer("y", sympy.Integer(4096), torch.float32, "arena"),
         "z": Buffer("z", sympy.Integer(64), torch.float32, "arena")},
    )
    plan = plan_memory(schedule)
    check_plan(plan)
    assert plan.slots["x"].end == plan.order.index("c")  # read through the view by c
    assert plan.slots["x"].offset != plan.slots["y"].offset


def test_real_llama_plan_is_tight():
    from fxpress.compiler.pipeline import build_pipeline, run_pipeline
    from fxpress.ir.options import Options
    from tests.passes.graphs import capture
    from tests.tiny_models import tiny_llama, token_ids

    captured = capture(tiny_llama(), token_ids())
    gm, _ = run_pipeline(captured.gm, build_pipeline(Options()), Options())
    schedule = build_schedule(gm)
    plan = plan_memory(schedule, hints=size_hints(gm))
    check_plan(plan)
    figures = plan.figures()
    assert figures["arena_bytes"] <= 1.10 * figures["lower_bound_bytes"]
    assert not any(b.role == "arena" for name, b in schedule.buffers.items()
                   if name in {n.name for n in gm.graph.find_nodes(op="output")[0].all_input_nodes})
