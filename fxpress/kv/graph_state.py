"""Compressed KV state that a compiled graph owns, for caches the model keeps in fixed buffers.

``compress_kv_cache`` rewrites a StaticCache-style update (``index_copy`` / ``index_put`` into a
fixed buffer) and the attention reading it into ``fxpress::kv_attend``, which reaches its state
here by handle. The state lives across calls, keyed to the graph node it replaced, and starts over
whenever a call writes position 0 (a new sequence in the same buffers). The model's own buffers
are no longer written or read, but they stay allocated: only ``fxpress.kv_cache`` avoids them.
"""

from __future__ import annotations

import itertools

import torch

from fxpress.compiler.errors import KVCacheError
from fxpress.kv.policies import Policy
from fxpress.kv.sequence import KVSequence

_STATES: dict[int, GraphKVState] = {}
_HANDLES = itertools.count()


class GraphKVState(KVSequence):
    """A :class:`KVSequence` that ``fxpress::kv_attend`` finds by ``handle``."""

    def __init__(self, policy: Policy, layer: int, max_len: int, where: str) -> None:
        super().__init__(policy, layer, max_len, where)
        self.handle = next(_HANDLES)
        _STATES[self.handle] = self

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        first = int(positions.reshape(-1)[0])
        if first == 0 or self.store is None:
            self.start(k, k.dtype)
        if first != self.seen:
            raise KVCacheError(f"{self.where}: the cache is written at position {first}, but the compressed state "
                               f"holds {self.seen} tokens; positions must continue the sequence (or restart at 0)")
        self.check(k)
        if mask is not None:
            last = mask[..., -1, : self.seen + k.shape[2]]
            visible = last if mask.dtype == torch.bool else last == 0
            if not bool(visible.all()):
                raise KVCacheError(f"{self.where}: the attention mask hides earlier tokens (a padded batch?); "
                                   "compressed KV state supports unpadded sequences only")
        return self.step(q, k, v, scale)


def state(handle: int) -> GraphKVState:
    return _STATES[handle]


def release(handles: list[int]) -> None:
    """Free the state of a backend that is gone."""
    for handle in handles:
        _STATES.pop(handle, None)
