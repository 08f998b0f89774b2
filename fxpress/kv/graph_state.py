"""Compressed KV state of compiled graphs, owned by the cache buffers the model passes in.

``compress_kv_cache`` rewrites a StaticCache-style update (``index_copy`` / ``index_put`` into a
fixed buffer) and the attention reading it into ``fxpress::kv_attend``. The op names two things:

- a *site* (by ``handle``): what the rewrite decided, the policy, the layer and the cache length.
  Sites are interned by those values, so the prefill and the decode graph of a model (two compiles,
  perhaps through two backend objects) name the same site for the same layer;
- the *owner*: the model's key buffer of that layer. The compressed sequence belongs to it. Two
  caches (two requests, two models) never share a sequence, however their calls interleave, and a
  sequence is dropped once its buffer's memory is freed.

A sequence starts over whenever a call writes position 0 (a new sequence in the same buffers). The
model's own buffers are no longer written or read, but they stay allocated: only
``fxpress.kv_cache`` avoids them.
"""

from __future__ import annotations

import itertools
import threading

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fxpress.core.errors import KVCacheError
from fxpress.kv.registry import Policy
from fxpress.kv.sequence import KVSequence

_SITES: dict[int, GraphKVSite] = {}
_INTERNED: dict[tuple[Policy, int, int], GraphKVSite] = {}
_HANDLES = itertools.count()
_LOCK = threading.Lock()


class GraphKVSite:
    """One rewritten attention layer: its policy and cache length, and the compressed sequence of
    every cache buffer it has attended over, keyed by that buffer's memory."""

    def __init__(self, policy: Policy, layer: int, max_len: int, where: str) -> None:
        self.policy, self.layer, self.max_len, self.where = policy, layer, max_len, where
        self.handle = next(_HANDLES)
        # buffer data_ptr -> (weak reference to the buffer's storage, its sequence)
        self._sequences: dict[int, tuple[StorageWeakRef, KVSequence]] = {}

    def sequence(self, owner: torch.Tensor) -> KVSequence:
        """The sequence of the cache whose key buffer is ``owner`` (a new, empty one for a buffer
        never seen, or one whose memory was freed and reused since)."""
        key = owner.data_ptr()
        with _LOCK:
            entry = self._sequences.get(key)
            if entry is not None and not entry[0].expired() and entry[0].cdata == owner.untyped_storage()._cdata:
                return entry[1]
            # Buffers freed since: their sequences go with them.
            for stale in [k for k, (ref, _) in self._sequences.items() if ref.expired()]:
                del self._sequences[stale]
            sequence = KVSequence(self.policy, self.layer, self.max_len, self.where)
            self._sequences[key] = (StorageWeakRef(owner.untyped_storage()), sequence)
            return sequence

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None, owner: torch.Tensor, scale: float) -> torch.Tensor:
        sequence = self.sequence(owner)
        first = int(positions.reshape(-1)[0])
        if first == 0 or sequence.store is None:
            sequence.start(k, k.dtype)
        if first != sequence.seen:
            raise KVCacheError(f"{self.where}: the cache is written at position {first}, but the compressed state "
                               f"holds {sequence.seen} tokens; positions must continue the sequence (or restart at 0)")
        sequence.check(k)
        if mask is not None:
            last = mask[..., -1, : sequence.seen + k.shape[2]]
            visible = last if mask.dtype == torch.bool else last == 0
            if not bool(visible.all()):
                raise KVCacheError(f"{self.where}: the attention mask hides earlier tokens (a padded batch?); "
                                   "compressed KV state supports unpadded sequences only")
        return sequence.step(q, k, v, scale)

    def live_sequences(self) -> int:
        return sum(not ref.expired() for ref, _ in self._sequences.values())


def site(policy: Policy, layer: int, max_len: int, where: str) -> GraphKVSite:
    """The site for these values: made once, shared by every graph that rewrites the same layer."""
    key = (policy, layer, max_len)
    with _LOCK:
        found = _INTERNED.get(key)
        if found is None:
            found = _INTERNED[key] = GraphKVSite(policy, layer, max_len, where)
            _SITES[found.handle] = found
        return found


def state(handle: int) -> GraphKVSite:
    return _SITES[handle]
