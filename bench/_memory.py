"""Tensor memory as torch's profiler sees it: the bytes one piece of work allocates and frees."""

from __future__ import annotations

from typing import Any, Callable


def live_bytes(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run ``fn`` under torch's profiler (``profile_memory=True``, its public event list): (its
    result, the most tensor bytes it held at once, the bytes it still holds at the end). Each op's
    own allocations minus frees are applied in the order the ops started, as
    ``torch.cuda.max_memory_allocated`` counts on a GPU; memory held before ``fn`` is not counted.
    A temporary that one op allocates and frees itself nets out inside that op: on MiniLM the
    compiled model's peak reads 0.07 MiB (5 %) lower than counting every allocation one by one."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return result, peak, live
