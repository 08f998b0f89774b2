"""The pass pipeline: one ordered tuple of plain functions, and the short runner that drives it.

Cleanups come first so rewrites see canonical graphs; ``reinplace_input_updates`` comes last
because every rewrite before it may assume a functional graph. User passes join by name
(``fxpress.Pass(fn, before="fuse_rms_norm")``) or run at the end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpress.core import counters as counters_mod
from fxpress.core.errors import FxpressError, OptionError, PassError
from fxpress.core.logs import graph_log
from fxpress.ir.options import Options
from fxpress.ir.verify import verify_graph
from fxpress.passes.compress_kv_cache import compress_kv_cache
from fxpress.passes.cse import cse
from fxpress.passes.fuse_low_rank import fuse_low_rank
from fxpress.passes.fuse_rms_norm import fuse_rms_norm
from fxpress.passes.integer_only import integer_only
from fxpress.passes.lut_matmul import lut_matmul
from fxpress.passes.reinplace_input_updates import reinplace_input_updates
from fxpress.passes.remove_dead_code import remove_dead_code
from fxpress.passes.remove_noop_views import remove_noop_views

PassFn = Callable[..., PassResult]

PIPELINE: tuple[PassFn, ...] = (
    compress_kv_cache,  # first: it leaves the replaced cache updates to remove_dead_code
    remove_dead_code,
    remove_noop_views,
    cse,
    fuse_low_rank,
    lut_matmul,
    fuse_rms_norm,
    integer_only,  # after the fusions: a softmax or GELU they fold into their ops stays float there
    reinplace_input_updates,
)


@dataclass(frozen=True)
class PassRecord:
    """What one pass did to one graph: explain() prints these."""

    name: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    counters: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pass_names(passes: tuple[tuple[str, PassFn], ...]) -> list[str]:
    return [name for name, _ in passes]


def build_pipeline(opts: Options) -> tuple[tuple[str, PassFn], ...]:
    """PIPELINE with disabled passes dropped and user passes inserted; names are checked here."""
    passes: list[tuple[str, PassFn]] = [(p.__name__, p) for p in PIPELINE]
    known = set(pass_names(tuple(passes))) | {p.name for p in opts.passes}
    for name in opts.disable:
        if name not in known:
            raise OptionError(f"disable={name!r} names no pass; passes are {sorted(known)}")
    for user in opts.passes:
        anchor = user.before or user.after
        if anchor is None:
            passes.append((user.name, user.fn))
            continue
        names = pass_names(tuple(passes))
        if anchor not in names:
            raise OptionError(
                f"pass {user.name!r} asks to run {'before' if user.before else 'after'} "
                f"{anchor!r}, which is not (yet) in the pipeline {names}"
            )
        at = names.index(anchor) + (0 if user.before else 1)
        passes.insert(at, (user.name, user.fn))
    return tuple((name, fn) for name, fn in passes if name not in opts.disable)


def _dump(dump_dir: Path | None, index: int, name: str, gm: fx.GraphModule) -> None:
    if dump_dir is not None:
        (dump_dir / f"{index:03d}_{name}.txt").write_text(gm.print_readable(print_output=False))


def run_pipeline(
    gm: fx.GraphModule,
    passes: tuple[tuple[str, PassFn], ...],
    opts: Options,
    dump_dir: Path | None = None,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run each pass in order: time it, attribute its counters, dump and check when asked."""
    records: list[PassRecord] = []
    _dump(dump_dir, 0, "captured", gm)
    for index, (name, fn) in enumerate(passes, start=1):
        before_counts, nodes_before = counters_mod.snapshot(), len(gm.graph.nodes)
        done = pass_names(passes)[: index - 1]
        start = time.perf_counter()
        try:
            result = fn(gm, opts=opts)
        except FxpressError:
            raise  # a refusal with its own message (a KV policy the model's heads cannot take)
        except Exception as e:
            raise PassError(
                f"fxpress pass {name!r} failed with {type(e).__name__}: {e}\n"
                f"(pass {index} of {len(passes)}; ran before it: {done}; rerun with "
                f"disable=[{name!r}] to bisect)"
            ) from e
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            kind = "a GraphModule" if isinstance(result, fx.GraphModule) else type(result).__name__
            raise PassError(
                f"fxpress pass {name!r} returned {kind}; a pass returns "
                "torch.fx.passes.infra.pass_base.PassResult(graph_module, modified)"
            )
        gm = result.graph_module
        if opts.check:
            try:
                verify_graph(gm)
            except Exception as e:
                raise PassError(f"fxpress pass {name!r} left a broken graph: {e}") from e
        if result.modified:
            _dump(dump_dir, index, name, gm)
            if graph_log.isEnabledFor(logging.DEBUG):
                graph_log.debug("after %s:\n%s", name, gm.print_readable(print_output=False))
        records.append(
            PassRecord(name, seconds, bool(result.modified), nodes_before, len(gm.graph.nodes),
                       counters_mod.delta(before_counts))
        )
    return gm, records
