"""Layouts C++ kernels read instead of a weight's own (re-laid-out panels, shuffle blocks), made
once per weight and kept while the weight tensors live unchanged.

A layout is keyed by the identity of the tensors it was made from and stamped with their
``_version`` counters and data pointers, so an in-place update (``weight.mul_``), a swapped
storage (``weight.data = ...``), or a new tensor at a freed one's address makes it again. It is
forgotten when any of its tensors is freed. The hit path is one dict read (atomic under the GIL),
so threads running the same compiled model take no lock. Threads that make the same layout at
once all get the first one stored: a layout is replaced only when its tensors changed. Callers keep
the layout itself (not only its data pointer) until their kernel returns.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Generic, TypeVar

import torch

Layout = TypeVar("Layout")


def _stamp(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple(t._version for t in tensors) + tuple(t.data_ptr() for t in tensors)


class DerivedLayouts(Generic[Layout]):
    def __init__(self, make: Callable[..., Layout]):
        self._make = make
        self._lock = threading.Lock()
        self._made: dict[tuple, tuple[tuple, Layout]] = {}

    def __call__(self, *tensors: torch.Tensor, **params: int) -> Layout:
        """The layout ``make(*tensors, **params)``; the int ``params`` are part of its key."""
        key = (*map(id, tensors), *sorted(params.items()))
        stamp = _stamp(tensors)
        hit = self._made.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        made = self._make(*tensors, **params)
        with self._lock:
            hit = self._made.get(key)
            if hit is not None and hit[0] == stamp:  # another thread made it meanwhile: theirs stays,
                return hit[1]                        # so a pointer it handed out stays valid
            if hit is None:
                for t in tensors:
                    weakref.finalize(t, self._made.pop, key, None)
            self._made[key] = (stamp, made)
        return made

    def __len__(self) -> int:
        return len(self._made)

    def clear(self) -> None:
        """Forget every layout (each is made again on its next use)."""
        self._made.clear()
