"""Tensor memory as torch's profiler sees it: the bytes one piece of work allocates and frees."""

from __future__ import annotations

from typing import Any, Callable


def live_bytes(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run ``fn`` under torch's profiler: (its result, the most tensor bytes it held at once, the
    bytes it still holds at the end). Allocations minus frees in order, as
    ``torch.cuda.max_memory_allocated`` counts on a GPU; memory held before ``fn`` is not counted."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return result, peak, live
