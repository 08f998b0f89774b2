"""The torch.compile backend: capture, run the pipeline, build the target's program.

``torch.compile(model, backend="fxpress")`` finds :func:`fxpress_backend` through the
``torch_dynamo_backends`` entry point; ``fxpress.backend(**options)`` builds a :class:`Backend` with
validated options. A graph fxpress cannot handle runs eagerly with one warning naming the op and
the user's source line (``strict=True`` raises instead). A pass that fails is a bug and raises,
naming the pass.
"""

from __future__ import annotations

import itertools
import operator
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch._dynamo.exc import RestartAnalysis, SkipFrame

import fxpress.ops  # noqa: F401  (registers torch.ops.fxpress before any graph uses them)
from fxpress.compiler.capture import CapturedGraph, capture_and_compile
from fxpress.core.counters import counters
from fxpress.core.logs import compile_log, configure_from_flags
from fxpress.core.errors import OptionError, PassError, UnsupportedGraphError
from fxpress.compiler.lower import lower_captured
from fxpress.codegen.targets import get_target
from fxpress.ir.options import Options
from fxpress.compiler.pipeline import PassFn, build_pipeline
from fxpress.compiler.report import GraphReport
from fxpress.integer.measure import has_sites, measure_sites

_graph_ids = itertools.count()


class FallbackWarning(UserWarning):
    """A graph (or part of one) runs eagerly instead of through fxpress."""


class Backend:
    """A torch.compile backend built from frozen :class:`Options`.

    ``on_report`` receives a :class:`GraphReport` per compiled graph (explain() uses it).
    """

    def __init__(self, opts: Options, on_report: Callable[[GraphReport], None] | None = None):
        self.opts = opts
        get_target(opts.target)  # refuses an unknown target now, not at first compile
        self.passes = build_pipeline(opts)  # validates pass names now, not at first compile
        self.on_report = on_report

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        report = GraphReport(index=next(_graph_ids), target=self.opts.target)  # lowering resolves "auto"
        start = time.perf_counter()
        frozen: list[int] = []
        try:
            compiled = _compile(gm, example_inputs, self.opts, self.passes, report, frozen,
                                measure=self.on_report is not None)
        except UnsupportedGraphError as e:
            if self.opts.strict:
                raise
            report.fallback_reason = str(e)
            counters["fallbacks"]["graph needs gradients" if isinstance(e, GradientsNeeded) else
                                  "graph fxpress cannot compile"] += 1
            # One text for every training graph: Python's warning filter shows it once, not per graph.
            message = GradientsNeeded.WARNING if isinstance(e, GradientsNeeded) else \
                f"fxpress: running graph {report.index} eagerly: {e}"
            warnings.warn(message, FallbackWarning, stacklevel=2)
            compiled = gm.forward
        report.compile_seconds = time.perf_counter() - start
        compile_log.info("fxpress: %s", report.summary())
        if self.on_report is not None:
            self.on_report(report)
        if not frozen:
            return compiled
        return _WeightGuard(compiled, frozen, example_inputs, lambda args: self(gm, args))


class _WeightGuard:
    """Runs the graph compiled for the weights it froze, and compiles another for other weights.

    Dynamo hands one graph the weights of whichever module instance runs it: after a graph break
    inside a decoder layer, every layer resumes into the same graph with its own parameters as
    inputs. fxpress freezes the weights it saw at compile time into the program, so a call with
    other weight tensors gets (and caches) a program compiled for those.

    A program holds its weights; it is dropped as soon as the weight tensors it was compiled for
    are freed (the model is gone), so no compiled program keeps a deleted model's memory alive,
    and a later model whose weights land at the same addresses gets a program of its own.
    """

    def __init__(self, compiled: Callable[..., Any], frozen: list[int], example_inputs: Sequence[Any],
                 compile_for: Callable[[list[Any]], Callable[..., Any]]) -> None:
        self.frozen, self.compile_for = frozen, compile_for
        # Runs on every call: the weights' addresses, fetched in C loops (their shapes are fixed by
        # Dynamo's guards on this graph, so the address alone tells weight sets apart).
        picked = operator.itemgetter(*frozen)
        self._weights = (lambda args: (picked(args),)) if len(frozen) == 1 else picked
        self.variants: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._add(example_inputs, compiled)

    def _key(self, args: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(map(torch.Tensor.data_ptr, self._weights(args)))

    def _add(self, args: Sequence[Any], compiled: Callable[..., Any]) -> Callable[..., Any]:
        key = self._key(args)
        self.variants[key] = compiled
        # The model's own weight tensors: when one is freed, the model is gone.
        weakref.finalize(args[self.frozen[0]], self.variants.pop, key, None)
        return compiled

    def __call__(self, *args: Any) -> Any:
        compiled = self.variants.get(self._key(args))
        if compiled is None:
            compile_log.info("fxpress: graph reused with other weights; compiling a variant for them")
            compiled = self._add(args, self.compile_for(list(args)))
        return compiled(*args)


def backend(**options: Any) -> Backend:
    """``torch.compile(model, backend=fxpress.backend(target="cpu", passes=[...]))``."""
    return Backend(Options.create(**options))


def fxpress_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Entry point for ``torch.compile(model, backend="fxpress", options={...})``; ``mode="reduce-overhead"``
    is ``options={"cuda_graphs": True}``."""
    if mode not in (None, "default", "reduce-overhead"):
        raise OptionError(f"fxpress knows the compile modes 'default' and 'reduce-overhead' (CUDA graphs), "
                          f"not mode={mode!r}; pass options={{...}}")
    if mode == "reduce-overhead":
        options = {"cuda_graphs": True, **(options or {})}
    return Backend(Options.create(options))(gm, example_inputs)


class GradientsNeeded(UnsupportedGraphError):
    """A graph called with grad mode on and a tensor that requires grad: fxpress compiles inference
    graphs, so it runs eagerly (gradients intact) or, with ``strict=True``, this is raised."""

    WARNING = ("fxpress: graphs that need gradients (grad mode on, and a parameter or input requires grad) "
               "run eagerly, gradients intact (each graph's report says why). Call the model under "
               "torch.no_grad() or torch.inference_mode() to compile it")


def _refuse_autograd(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """A graph that autograd would record is never compiled: fxpress freezes weights and runs
    without autograd, which would silently drop every gradient."""
    if not torch.is_grad_enabled():
        return
    for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            kind = "parameter" if isinstance(value, torch.nn.Parameter) else "input"
            raise GradientsNeeded(
                f"{kind} {node.name} requires grad and grad mode is on, so this graph needs gradients: "
                "fxpress compiles inference graphs (weights frozen, no autograd). It runs eagerly, "
                "gradients intact; to compile it, call the model under torch.no_grad() or "
                "torch.inference_mode()")


def _dump_dir(opts: Options, index: int) -> Path | None:
    if not opts.dump_dir:
        return None
    path = Path(opts.dump_dir) / f"graph_{index:03d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _MeasureFirstCall:
    """The program, which on its first call also measures each integer-only rewrite's error on
    that call's inputs into ``report.integer_errors`` (explain() asks for this)."""

    _boxed_call = True  # AOTAutograd hands it the flat argument list, as it does the program

    def __init__(self, program: Callable[[list[Any]], Any], final: fx.GraphModule, runtime: tuple[int, ...],
                 report: GraphReport) -> None:
        self.program, self.final, self.runtime, self.report = program, final, runtime, report

    def __call__(self, args: list[Any]) -> Any:
        if self.final is None:
            return self.program(args)
        inputs = [args[i] for i in self.runtime]
        out = self.program(args)
        self.report.integer_errors = measure_sites(self.final, inputs)
        self.final = None
        return out


def _compile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    opts: Options,
    passes: tuple[tuple[str, PassFn], ...],
    report: GraphReport,
    frozen: list[int],
    measure: bool = False,
) -> Callable[..., Any]:
    """``frozen`` receives the indices of the inputs frozen into the program; with ``measure`` the
    first call records the error of each approximate (integer-only) rewrite in ``report``."""
    _refuse_autograd(gm, example_inputs)
    lowering_started = False

    def lower(captured: CapturedGraph) -> Callable[[list[Any]], Any]:
        nonlocal lowering_started
        lowering_started = True
        frozen[:] = [i for i in range(len(example_inputs)) if i not in set(captured.runtime_inputs)
                     and isinstance(example_inputs[i], torch.Tensor)]
        lowered = lower_captured(captured, opts, passes, report, _dump_dir(opts, report.index))
        if measure and has_sites(lowered.final):
            return _MeasureFirstCall(lowered.program, lowered.final, captured.runtime_inputs, report)
        return lowered.program

    try:
        return capture_and_compile(gm, example_inputs, lower)
    except (PassError, UnsupportedGraphError, RestartAnalysis, SkipFrame):
        raise  # ours, or Dynamo's signals to re-trace the frame (e.g. specialise a float)
    except Exception as e:
        if lowering_started:
            raise  # our own code failed after capture: a bug, not an unsupported graph
        raise UnsupportedGraphError(f"capture failed with {type(e).__name__}: {e}") from e


configure_from_flags()
