"""What generated wrapper modules call at run time: input checks, the arena, out= lookups."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import torch

from fxpress.core.errors import FxpressError


class InputError(FxpressError, ValueError):
    """A compiled graph was called with an input of the wrong kind, dtype, rank or size."""


def check_input(value: Any, name: str, dtype: torch.dtype, sizes: tuple[int | None, ...], where: str) -> None:
    """``sizes`` holds the static sizes and None where a size is symbolic."""
    if (
        not isinstance(value, torch.Tensor)
        or value.dtype != dtype
        or value.dim() != len(sizes)
        or any(s is not None and s != v for s, v in zip(sizes, value.shape))
    ):
        expected = f"{dtype}[{', '.join('?' if s is None else str(s) for s in sizes)}]"
        got = f"{value.dtype}{list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"{where}: input {name} must be {expected}, got {got}")


class ArenaPool:
    """The idle arenas of one generated wrapper, by size key. A call takes one (None: make one) and
    gives it back when done, so calls from several threads never share buffers, and a single
    thread reuses one arena call after call. A new size key drops the arenas of the old ones (the
    sizes moved on); at most ``max_idle`` arenas per key are kept between calls."""

    def __init__(self, max_idle: int = 8) -> None:
        self._idle: dict[Any, list[Any]] = {}
        self._lock = threading.Lock()
        self._apart = threading.local()
        self.max_idle = max_idle

    @contextlib.contextmanager
    def kept_apart(self):
        """Within it, this thread's calls make arenas of their own and never give them back: a CUDA
        graph being captured bakes its arena's address in, so no other call may ever use it."""
        self._apart.on = True
        try:
            yield
        finally:
            self._apart.on = False

    def take(self, key: Any) -> Any:
        if getattr(self._apart, "on", False):
            return None
        with self._lock:
            idle = self._idle.get(key)
            if idle is None:
                self._idle = {key: []}
                return None
            return idle.pop() if idle else None

    def give_back(self, key: Any, slots: Any) -> None:
        if getattr(self._apart, "on", False):
            return
        with self._lock:
            idle = self._idle.get(key)
            if idle is not None and len(idle) < self.max_idle:
                idle.append(slots)


def allocate_arena(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(max(int(nbytes), 64), dtype=torch.uint8, device=device)


def slot(arena: torch.Tensor, offset: int, dtype: torch.dtype, size: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """The buffer at byte ``offset`` of the arena, with the given layout."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return arena.view(dtype).as_strided(size, stride, offset // itemsize)


@functools.lru_cache(maxsize=None)
def out_variant(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The ``.out`` overload taking exactly ``op``'s arguments plus one ``out`` tensor, if any."""
    if not isinstance(op, torch._ops.OpOverload) or len(op._schema.returns) != 1:
        return None
    args = [(a.name, str(a.type), a.kwarg_only) for a in op._schema.arguments]
    packet = op.overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)
        outs = [a for a in candidate._schema.arguments if a.is_out]
        rest = [(a.name, str(a.type), a.kwarg_only) for a in candidate._schema.arguments if not a.is_out]
        if len(outs) == 1 and outs[0].name == "out" and rest == args:
            return candidate
    return None
