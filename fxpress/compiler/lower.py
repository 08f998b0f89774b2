"""Lowering a captured ATen graph: the pipeline, the schedule, the memory plan and the program.

Both ways in share it: the torch.compile backend (a Dynamo graph) and ``fxpress.aot_compile`` (a
torch.export program). It fills the :class:`GraphReport` as it goes, so explain() and an artifact's
meta.json describe the same thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.fx as fx

from fxpress.codegen.plan_memory import MemoryPlan, plan_memory
from fxpress.codegen.program import WrapperProgram, wrapper_source
from fxpress.codegen.schedule import Schedule, build_schedule, size_hints
from fxpress.codegen.targets import Target, get_target, graph_devices, resolve_target
from fxpress.compiler.capture import CapturedGraph
from fxpress.compiler.pipeline import PassFn, run_pipeline
from fxpress.compiler.report import GraphReport, op_histogram
from fxpress.core.errors import UnsupportedGraphError
from fxpress.core.logs import kernel_log
from fxpress.ir.options import Options
from fxpress.ir.replay import replay_refusal
from fxpress.ir.support import find_unsupported


@dataclass
class Lowered:
    program: WrapperProgram
    final: fx.GraphModule  # the graph after every pass
    schedule: Schedule
    plan: MemoryPlan


def lower_captured(captured: CapturedGraph, opts: Options, passes: tuple[tuple[str, PassFn], ...],
                   report: GraphReport, dump: Path | None) -> Lowered:
    report.inputs, report.frozen_weights = len(captured.runtime_inputs), len(captured.frozen)
    report.ops_before = op_histogram(captured.gm)
    unsupported = find_unsupported(captured.gm)
    if unsupported:
        report.unsupported = unsupported
        raise UnsupportedGraphError(f"{unsupported[0]}" + (
            f" and {len(unsupported) - 1} more unsupported node(s)" if len(unsupported) > 1 else ""))
    final, report.passes = run_pipeline(captured.gm, passes, opts, dump)
    report.ops_after, report.code = op_histogram(final), final.code
    # "auto": by where the graph's tensors live, and whether a target's tools work here
    target, report.target_notes = resolve_target(opts.target, graph_devices(final))
    report.target = target.name
    schedule, plan = _schedule_and_plan(final, target)
    replay_refused = replay_refusal(final) if opts.cuda_graphs else None
    report.cuda_graphs = "" if not opts.cuda_graphs else f"off: {replay_refused}" if replay_refused else "on"
    program = WrapperProgram(final, schedule, plan, captured.runtime_inputs, f"graph {report.index}", target,
                             cuda_graphs=opts.cuda_graphs and replay_refused is None)
    report.kernels = [(k.name, k.kind, k.nodes) for k in schedule.kernels]
    report.plan = plan.figures() | {"order": plan.order_chosen}
    report.memory_plan = plan
    report.wrapper = program.source
    kernel_log.debug("wrapper of graph %d:\n%s", report.index, program.source)
    report.generated = {name: k.source for name, k in program.generated.items()}
    report.not_generated = program.not_generated
    if dump is not None:
        (dump / "options.txt").write_text(repr(opts) + "\n")
        (dump / "wrapper.py").write_text(program.source)
        (dump / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
    return Lowered(program, final, schedule, plan)


def regenerate_wrapper(final: fx.GraphModule, target: str, title: str) -> str:
    """The wrapper source ``lower_captured`` made from this final graph: the same schedule, plan and
    kernels, decided again (an artifact's load checks it against the recorded one)."""
    chosen = get_target(target)
    schedule, plan = _schedule_and_plan(final, chosen)
    source, _, _ = wrapper_source(final, schedule, plan, title, chosen)
    return source


def _schedule_and_plan(final: fx.GraphModule, target: Target) -> tuple[Schedule, MemoryPlan]:
    target.prepare_graph(final)  # the target's form of the graph: what is scheduled, run and saved
    schedule = build_schedule(final)
    return schedule, plan_memory(schedule, hints=size_hints(final))
