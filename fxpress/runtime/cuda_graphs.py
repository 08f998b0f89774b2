"""Replaying a compiled graph as a CUDA graph, so a call costs one launch instead of one per kernel.

A small model on a fast GPU is bound by its launches: MiniLM's integer-only forward issues 268
kernels per call and the GPU waits on Python between them. ``Options(cuda_graphs=True)`` (or
``torch.compile(..., mode="reduce-overhead")``) records the wrapper's launches once per input layout
and replays them.

What a replay needs, and how it is kept safe:

- **Fixed addresses.** The runner owns a static copy of every input (copied in before each replay)
  and the arena the captured call took: that arena is allocated during capture, in the graph's
  private memory pool, and never enters the wrapper's shared arena pool, so no other call (another
  thread, another layout) writes into memory a replay uses.
- **Results that outlive the next call.** Replays write the same output buffers, so each call gets
  clones of them.
- **One replay at a time.** Replays, and the copies into the static inputs, hold a lock and wait for
  the previous replay's event, so callers on different threads or streams never interleave.
- **First seen, then captured.** The first call with a layout runs plainly (Triton compiles, cuBLAS
  initialises); the second warms up on the static inputs and captures. A capture that fails (a
  kernel that synchronises with the host, say) leaves that layout running plainly, with one warning.

Graphs that write their inputs or keep state on the host are never captured (``fxpress.ir.replay``
says which, at compile time).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fxpress.core.counters import counters

MAX_LAYOUTS = 8  # captured input layouts per graph; a ninth runs plainly (each holds its own arena)


class CudaGraphWarning(UserWarning):
    """A layout of a compiled graph runs without CUDA graph replay."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    device: torch.device
    inputs: list[Any]  # the static inputs the graph reads (non-tensors as they were)
    outputs: Any  # what the captured call returned: buffers each replay rewrites


def _layout(inputs: Sequence[Any]) -> tuple[Any, ...] | None:
    """What a captured graph is specific to; None when a tensor input is not a dense tensor on a CUDA
    device."""
    key = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            if x.device.type != "cuda" or not _dense(x):
                return None  # (a static copy of an expanded tensor could not be written)
            key.append((x.dtype, x.device, tuple(x.shape), x.stride(), x.storage_offset() % 16))
        else:
            key.append((type(x), x))
    return tuple(key)


def _dense(x: torch.Tensor) -> bool:
    """Every element at an address of its own, with no gaps: some order of its dimensions is contiguous."""
    return x.permute(sorted(range(x.dim()), key=lambda d: -x.stride(d))).is_contiguous()


def _static_copy(x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(v) for v in value)
    return value


class CudaGraphRunner:
    """``call(inputs)`` of a generated wrapper, replayed as CUDA graphs, one per input layout.

    ``arenas`` is the wrapper's ``ArenaPool``: the capture takes its arena apart from it."""

    def __init__(self, call: Callable[[list[Any]], Any], arenas: Any, title: str) -> None:
        self._call, self._arenas, self.title = call, arenas, title
        self._lock = threading.Lock()
        self._seen: set[tuple[Any, ...]] = set()
        self._captured: dict[tuple[Any, ...], _Captured | str] = {}  # a str: why it runs plainly
        self._done: torch.cuda.Event | None = None  # the last replay's end

    def __call__(self, inputs: list[Any]) -> Any:
        key = _layout(inputs)
        if key is None:
            return self._call(inputs)
        with self._lock:
            entry = self._captured.get(key)
            if entry is None and key in self._seen:
                entry = self._captured[key] = self._capture(key, inputs)
            self._seen.add(key)
            if isinstance(entry, _Captured):
                return self._replay(entry, inputs)
        return self._call(inputs)

    def _capture(self, key: tuple[Any, ...], inputs: list[Any]) -> _Captured | str:
        if len(self._captured) >= MAX_LAYOUTS:
            return self._refuse(f"more than {MAX_LAYOUTS} input layouts captured")
        static = [_static_copy(x) for x in inputs]
        device = next(x.device for x in static if isinstance(x, torch.Tensor))
        try:
            with torch.cuda.device(device):
                caller = torch.cuda.current_stream()
                side = torch.cuda.Stream()
                side.wait_stream(caller)
                with torch.cuda.stream(side):  # warm up at the static addresses (Triton specialises on them)
                    self._call(list(static))
                caller.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with self._arenas.kept_apart(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = self._call(list(static))
        except Exception as e:  # noqa: BLE001  (whatever stopped the capture, the layout runs plainly)
            return self._refuse(f"capture failed with {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        counters["cuda_graphs"]["captured"] += 1
        return _Captured(graph, device, static, outputs)

    def _refuse(self, reason: str) -> str:
        counters["cuda_graphs"][reason.split(" with ")[0]] += 1
        warnings.warn(f"fxpress: {self.title} runs without CUDA graph replay for this input layout: {reason}",
                      CudaGraphWarning, stacklevel=4)
        return reason

    def _replay(self, captured: _Captured, inputs: list[Any]) -> Any:
        with torch.cuda.device(captured.device):
            stream = torch.cuda.current_stream()
            if self._done is not None:
                stream.wait_event(self._done)  # the previous replay (maybe on another stream) is over
            for static, x in zip(captured.inputs, inputs):
                if isinstance(static, torch.Tensor) and static.data_ptr() != x.data_ptr():
                    static.copy_(x)
            captured.graph.replay()
            result = _cloned(captured.outputs)
            self._done = torch.cuda.Event()
            self._done.record(stream)
        counters["cuda_graphs"]["replays"] += 1
        return result
