"""Named event counters that passes bump instead of printing.

``counters["fuse_rms_norm"]["pow -> mean -> rsqrt -> mul => rms_norm"] += 1``. The pipeline runner
attributes the increments made during each pass to that pass (see ``pipeline.run_pipeline``), so
explain() and tests can read what fired without parsing logs.
"""

from __future__ import annotations

import collections

counters: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
    collections.Counter
)


def snapshot() -> dict[str, dict[str, int]]:
    return {group: dict(c) for group, c in counters.items()}


def delta(before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Increments made since ``before`` was taken, empty groups left out."""
    out: dict[str, dict[str, int]] = {}
    for group, c in counters.items():
        old = before.get(group, {})
        diff = {k: v - old.get(k, 0) for k, v in c.items() if v != old.get(k, 0)}
        if diff:
            out[group] = diff
    return out
