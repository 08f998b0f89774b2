"""Compressed KV storage of one attention layer: the base class and the stores several policies share.

A store holds what its policy keeps of the tokens seen so far, allocated once at its largest size,
so the bytes it reports are the bytes it holds. Every store offers:

- ``segments()``: the stored tokens as float32 ``(K, V)`` blocks ``[B, H, n, d]``, dequantised one
  block at a time (all of them visible to every new query: they came earlier);
- ``append(k, v, seen, mass)``: take a chunk of new tokens after attention has run over it;
  ``mass`` is the attention each stored-then-new key received in this call, given only to stores
  with ``needs_mass``. ``k`` and ``v`` may live in memory the caller reuses (a compiled graph's
  arena): a store keeps copies, never the tensors;
- ``nbytes()``: every byte of state: codes, scales, mins, residual window, positions, scores.

Stores never group numbers across batch rows or heads, so one sequence's outliers never stretch
another's quantisation range.
"""

from __future__ import annotations

from typing import Iterator

import torch

from fxpress.kv.attention import ScoreRule, reference_attend
from fxpress.kv.rows import Rows

# Stored tokens are dequantised this many at a time: bounded temporaries at any context length.
SEGMENT_TOKENS = 1024


class Store:
    needs_mass = False
    # Whether the store reads the queries of each call (``observe_queries``) before its attention:
    # ThinK chooses key channels by them.
    wants_queries = False
    # Whether stored token i is the token at position i (no eviction, no reordering): what a
    # sliding window needs to know which stored tokens it hides.
    keeps_positions = False

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.dtype, self.device = dtype, device
        self.filled = 0  # tokens held

    def nbytes(self) -> int:
        raise NotImplementedError

    def observe_queries(self, q: torch.Tensor) -> None:
        """The queries ``[B, Hq, T, d]`` of a call, before it attends (for ``wants_queries`` stores)."""

    def segments(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def append(self, k: torch.Tensor, v: torch.Tensor, seen: int, mass: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rule: ScoreRule
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``q`` over this store plus the chunk ``k, v`` (``fxpress.kv.attention.attend``).
        The reference; a store with a faster kernel, or with heads of several kinds, overrides it."""
        return reference_attend(self, q, k, v, scale, rule)


class RowStore(Store):
    """Keys and values as :class:`Rows` with ``slots`` slots, ``filled`` of them valid."""

    def __init__(self, slots: int, bits: int | None, group_size: int, **kw) -> None:
        super().__init__(**kw)
        self.slots = slots
        make = dict(dtype=self.dtype, device=self.device, bits=bits, group_size=group_size)
        self.keys = Rows(self.batch, self.heads, slots, self.head_dim, **make)
        self.values = Rows(self.batch, self.heads, slots, self.head_dim, **make)

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()

    def segments(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.filled, SEGMENT_TOKENS):
            stop = min(start + SEGMENT_TOKENS, self.filled)
            yield self.keys.read(start, stop), self.values.read(start, stop)


class FullStore(RowStore):
    """Every token, in arrival order."""

    keeps_positions = True

    def __init__(self, max_len: int, bits: int | None = None, group_size: int = 32, **kw) -> None:
        super().__init__(max_len, bits, group_size, **kw)

    def append(self, k, v, seen, mass=None) -> None:
        self.keys.write_range(self.filled, k)
        self.values.write_range(self.filled, v)
        self.filled += k.shape[2]


class StreamingStore(RowStore):
    """Token ``p`` lives in slot ``p`` while ``p < sink``, then in a ring of ``recent`` slots."""

    def __init__(self, sink: int, recent: int, bits: int | None = None, group_size: int = 32, **kw) -> None:
        super().__init__(sink + recent, bits, group_size, **kw)
        self.sink, self.recent = sink, recent

    def append(self, k, v, seen, mass=None) -> None:
        t = k.shape[2]
        positions = torch.arange(seen, seen + t, device=k.device)
        # Of a long chunk only the sinks and the last `recent` tokens survive; write just those.
        survives = (positions < self.sink) | (positions >= seen + t - self.recent)
        chosen = positions[survives]
        slots = torch.where(chosen < self.sink, chosen, self.sink + (chosen - self.sink) % self.recent)
        index = survives.nonzero().squeeze(1)
        self.keys.write_slots(slots, k.index_select(2, index))
        self.values.write_slots(slots, v.index_select(2, index))
        self.filled = min(seen + t, self.slots)


def streaming_store(sink: int, recent: int, max_len: int, **kw) -> Store:
    """Sink + recent tokens; a window as long as the cache never evicts and is a full store."""
    return FullStore(max_len, **kw) if sink + recent >= max_len else StreamingStore(sink, recent, **kw)
