"""Which compressed cache layer each attention call of a ``fxpress.kv_cache`` forward takes, at run
time and per thread: the run-time half of ``fxpress::cache_bind`` / ``fxpress::cache_attend``.

A cache layer registers itself and gets an int handle (its cache keeps it in a tensor, so one
compiled graph serves every cache). ``cache_bind`` names the layer whose chunk the next attention
call of its index takes; ``cache_attend`` takes it. A layer's bind and attend run back to back on
one thread, so one slot per layer index is enough, and threads generating with caches of their own
never meet. The layer is anything with ``layer_idx`` and ``step(q, k, v, scale, rule)``
(``fxpress.hf.kv_cache.CompressedLayer``).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any, Iterable

import torch

from fxpress.core.errors import KVCacheError
from fxpress.kv.attention import ScoreRule

# Every live compressed layer by handle: what ``cache_bind`` names at run time.
_LAYERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.bound: dict[int, Any] = {}  # layer index -> the layer whose chunk its next attention takes


_THREAD = _PerThread()


def register(layer: Any) -> int:
    """A handle for ``layer``, valid while the layer lives."""
    handle = next(_HANDLES)
    _LAYERS[handle] = layer
    return handle


def bind(handle: int) -> None:
    """``cache_bind`` at run time: the layer ``handle`` owns the next attention call of its index."""
    layer = _LAYERS.get(handle)
    if layer is None:
        raise KVCacheError(f"fxpress KV cache layer handle {handle} belongs to a cache that no longer exists")
    _THREAD.bound[layer.layer_idx] = layer


def attend_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, layer_idx: int,
                 scale: float, softcap: float | None, window: int | None) -> torch.Tensor:
    """``cache_attend`` at run time: the bound layer's step, output ``[B, T, Hq, d]``."""
    layer = _THREAD.bound.pop(layer_idx, None)
    if layer is None:
        raise KVCacheError(f"fxpress KV cache: the attention of layer {layer_idx} came without its cache update")
    _check_padding(mask)
    return layer.step(q, k, v, scale, ScoreRule(softcap=softcap, window=window)).transpose(1, 2).contiguous()


def unread(layers: Iterable[Any]) -> list[int]:
    """Indices of ``layers`` bound on this thread whose attention never came."""
    mine = set(map(id, layers))
    return sorted(i for i, layer in _THREAD.bound.items() if id(layer) in mine)


def clear() -> None:
    """Forget this thread's bindings (after a refused forward)."""
    _THREAD.bound.clear()


def _check_padding(mask: torch.Tensor | None) -> None:
    if mask is not None and not bool(mask.all()):
        raise KVCacheError("fxpress KV caches do not support padded batches yet: the attention mask hides some "
                           "tokens. Use prompts of equal length.")
