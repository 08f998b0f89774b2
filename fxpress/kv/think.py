"""``ThinKV``: ThinK (Xu et al. 2024), query-driven pruning of key channels, and its store.

A head's attention scores are ``q . k`` summed over channels, and a few channels carry most of
it. ThinK scores channel ``j`` of a KV head by ``mean_t(q_tj^2) * mean_n(k_nj^2)`` over the last
``window`` queries (every query head of the group together) and the keys seen, once, when the
first keys leave the full-precision window, and from then on stores only the best
``d - floor(ratio * d)`` channels of each older key; the newest keys keep every channel. A query
meets a pruned key on the kept channels only, which is ``q . k`` with the dropped channels taken
as zero: that is how the reference attention reads them. Values are stored whole.

Pruned keys are a real channel gather (``[B, H, n, kept]`` plus the channel index per head), not a
mask over a full-width cache. It composes with KIVI quantisation (``ThinKV(kivi=KIVI(bits=2))``:
the kept channels are quantised per channel, KIVI's residual window is the full-channel window)
and with eviction (``ThinKV(evict=StreamingKV(...))`` or ``HeavyHitterKV``: the evicting store
keeps its tokens' keys as kept channels only, chosen on the first chunk, as kvpress prunes a
prefix; ``recent`` does not apply there, the evicting policy decides what stays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from fxpress.kv.channel_pruning import ChannelPruner
from fxpress.kv.heavy_hitter import HeavyHitterKV
from fxpress.kv.kivi import KIVI, KIVIStore
from fxpress.kv.policy_checks import check_positive, require
from fxpress.kv.registry import StoreShape, make_store, register_policy
from fxpress.kv.rows import Rows
from fxpress.kv.stores import SEGMENT_TOKENS, RowStore, Store
from fxpress.kv.streaming import StreamingKV


@dataclass(frozen=True)
class ThinKV:
    """``ratio``: the fraction of each head's key channels dropped (ThinK's default 0.4).
    ``recent``: the newest keys that keep every channel (with ``kivi``, its residual window does).
    ``window``: how many of the latest queries score the channels. ``kivi`` or ``evict`` (a
    ``StreamingKV`` or ``HeavyHitterKV``): what else the cache does to the tokens it keeps."""

    ratio: float = 0.4
    recent: int = 32
    window: int = 32
    kivi: KIVI | None = None
    evict: StreamingKV | HeavyHitterKV | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool) and 0 <= self.ratio < 1,
                "ThinKV", f"ratio must be in [0, 1), got {self.ratio!r}")
        check_positive("ThinKV", recent=self.recent, window=self.window)
        require(self.kivi is None or isinstance(self.kivi, KIVI), "ThinKV",
                f"kivi must be a fxpress.KIVI or None, got {type(self.kivi).__name__}")
        require(self.evict is None or isinstance(self.evict, (StreamingKV, HeavyHitterKV)), "ThinKV",
                f"evict must be a fxpress.StreamingKV or HeavyHitterKV or None, got {type(self.evict).__name__}")
        require(self.kivi is None or self.evict is None, "ThinKV",
                "give kivi= or evict=, not both: KIVI keeps every token, an evicting policy quantises per token")
        require(self.kivi is None or not self.kivi.rotate, "ThinKV",
                "kivi=KIVI(rotate=True) spreads every channel's energy over all of them, which leaves no "
                "channel to prune")
        require(self.kivi is None or self.kivi.rope_theta is None, "ThinKV",
                "kivi=KIVI(rope_theta=...) turns each pair of channels back as the keys are read, which needs "
                "both channels of every pair kept")

    def kept_channels(self, head_dim: int) -> int:
        return head_dim - int(self.ratio * head_dim)

    def describe(self) -> str:
        inner = "".join(f" + {p.describe()}" for p in (self.kivi, self.evict) if p is not None)
        return f"ThinK(ratio={self.ratio}, recent={self.recent}, window={self.window}){inner}"


class ThinKStore(Store):
    """Full-precision ThinK: older keys as their kept channels, the newest ``recent`` whole, values whole."""

    keeps_positions = True
    wants_queries = True

    def __init__(self, policy: ThinKV, max_len: int, **kw) -> None:
        super().__init__(**kw)
        self.policy = policy
        self.pruner = ChannelPruner(policy.kept_channels(self.head_dim), policy.window, self.batch, self.heads,
                                    self.head_dim, self.device)
        b, h, d, dt, dev = self.batch, self.heads, self.head_dim, self.dtype, self.device
        pruned_slots = max(max_len - policy.recent, 0)
        self.k_pruned = torch.zeros(b, h, pruned_slots, self.pruner.kept, dtype=dt, device=dev)
        self.k_recent = torch.zeros(b, h, policy.recent, d, dtype=dt, device=dev)
        self.values = torch.zeros(b, h, max_len, d, dtype=dt, device=dev)
        self.pruned = 0  # keys stored pruned; the rest of `filled` wait whole in k_recent

    def nbytes(self) -> int:
        return self.k_pruned.nbytes + self.k_recent.nbytes + self.values.nbytes + self.pruner.nbytes()

    def observe_queries(self, q: torch.Tensor) -> None:
        self.pruner.observe(q)

    def segments(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.pruned, SEGMENT_TOKENS):
            stop = min(start + SEGMENT_TOKENS, self.pruned)
            yield (self.pruner.scatter(self.k_pruned[:, :, start:stop], self.head_dim),
                   self.values[:, :, start:stop].float())
        if self.filled > self.pruned:
            yield self.k_recent[:, :, :self.filled - self.pruned].float(), self.values[:, :, self.pruned:self.filled].float()

    def append(self, k, v, seen, mass=None) -> None:
        t = k.shape[2]
        self.values[:, :, self.filled:self.filled + t] = v
        waiting = torch.cat([self.k_recent[:, :, :self.filled - self.pruned], k.to(self.dtype)], 2)
        leaving = max(waiting.shape[2] - self.policy.recent, 0)
        if leaving:
            if self.pruner.channels is None:  # the first keys to leave: choose on everything seen
                self.pruner.choose(waiting)
            self.k_pruned[:, :, self.pruned:self.pruned + leaving] = self.pruner.gather(waiting[:, :, :leaving])
            self.pruned += leaving
        self.k_recent[:, :, :waiting.shape[2] - leaving] = waiting[:, :, leaving:]
        self.filled += t


class EvictingThinKStore(Store):
    """ThinK over an evicting store (``inner``): its keys are held as their kept channels, chosen on
    the first chunk it is given; what it keeps and evicts is its own."""

    wants_queries = True

    def __init__(self, policy: ThinKV, inner: RowStore) -> None:
        # The inner store holds the state; this one only translates keys on their way in and out.
        self.inner, self.policy = inner, policy
        self.batch, self.heads, self.head_dim = inner.batch, inner.heads, inner.head_dim
        self.dtype, self.device = inner.dtype, inner.device
        self.needs_mass, self.keeps_positions = inner.needs_mass, inner.keeps_positions
        self.pruner = ChannelPruner(policy.kept_channels(self.head_dim), policy.window, self.batch, self.heads,
                                    self.head_dim, self.device)
        keys = inner.keys
        if keys.bits is not None and self.pruner.kept % keys.group_size:
            raise ValueError(f"{policy.describe()}: {self.pruner.kept} kept key channels are not a multiple of the "
                             f"codes' group_size ({keys.group_size}); choose a ratio that keeps a multiple")
        inner.keys = Rows(self.batch, self.heads, inner.slots, self.pruner.kept, dtype=self.dtype,
                          device=self.device, bits=keys.bits, group_size=keys.group_size)

    @property
    def filled(self) -> int:
        return self.inner.filled

    def nbytes(self) -> int:
        return self.inner.nbytes() + self.pruner.nbytes()

    def observe_queries(self, q: torch.Tensor) -> None:
        self.pruner.observe(q)

    def segments(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for keys, values in self.inner.segments():
            yield self.pruner.scatter(keys, self.head_dim), values

    def append(self, k, v, seen, mass=None) -> None:
        if self.pruner.channels is None:
            self.pruner.choose(k)
        self.inner.append(self.pruner.gather(k), v, seen, mass)


def _store(policy: ThinKV, layer: int, shape: StoreShape) -> Store:
    if policy.evict is not None:
        inner = make_store(policy.evict, layer, batch=shape.batch, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                           max_len=shape.max_len, dtype=shape.dtype, device=shape.device)
        return EvictingThinKStore(policy, inner)
    if policy.kivi is not None:
        return KIVIStore(policy.kivi, shape.max_len, prune=policy, **shape.store_args())
    return ThinKStore(policy, shape.max_len, **shape.store_args())


register_policy(ThinKV, _store)
