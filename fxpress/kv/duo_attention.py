"""``DuoAttentionKV``: every token for retrieval heads, sink + recent for the others; the head
pattern is data (``fxpress.kv.duo_heads`` scores heads for it). Its store is two stores of their
own sizes, and attention splits the heads between them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fxpress.kv.attention import ScoreRule
from fxpress.kv.policy_checks import check_bits, check_positive, check_sink, describe_bits, require
from fxpress.kv.registry import StoreShape, register_policy
from fxpress.kv.stores import FullStore, Store, streaming_store


@dataclass(frozen=True)
class DuoAttentionKV:
    """``retrieval_heads[layer]`` lists the KV heads of that layer that keep every token."""

    retrieval_heads: tuple[tuple[int, ...], ...]
    sink: int = 64
    recent: int = 256
    bits: int | None = None
    group_size: int = 32

    def __post_init__(self) -> None:
        heads = self.retrieval_heads
        require(isinstance(heads, (tuple, list)) and all(isinstance(h, (tuple, list, set, frozenset)) for h in heads),
                "DuoAttentionKV", "retrieval_heads must be a sequence (one entry per layer) of KV-head index "
                f"sequences, got {heads!r}")
        normalised = tuple(tuple(sorted(set(layer))) for layer in heads)
        for i, layer in enumerate(normalised):
            require(all(isinstance(h, int) and h >= 0 for h in layer), "DuoAttentionKV",
                    f"retrieval_heads[{i}] must hold KV-head indices >= 0, got {layer!r}")
        object.__setattr__(self, "retrieval_heads", normalised)
        check_sink("DuoAttentionKV", self.sink)
        check_positive("DuoAttentionKV", recent=self.recent)
        check_bits("DuoAttentionKV", self.bits, self.group_size)

    @classmethod
    def from_scores(cls, scores: Sequence[Sequence[float]], fraction: float, **kwargs) -> DuoAttentionKV:
        """Retrieval heads = the ``fraction`` of (layer, KV head) pairs with the highest scores,
        chosen over the whole model as DuoAttention's deploy step does."""
        require(0.0 <= fraction <= 1.0, "DuoAttentionKV", f"fraction must lie in [0, 1], got {fraction!r}")
        flat = [(float(s), layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row)]
        keep = {(layer, head) for _, layer, head in sorted(flat, reverse=True)[: round(fraction * len(flat))]}
        heads = tuple(tuple(h for h in range(len(row)) if (layer, h) in keep) for layer, row in enumerate(scores))
        return cls(retrieval_heads=heads, **kwargs)

    def describe(self) -> str:
        n = sum(len(h) for h in self.retrieval_heads)
        return f"DuoAttentionKV({n} retrieval heads, sink={self.sink}, recent={self.recent}){describe_bits(self.bits)}"


class DuoStore(Store):
    """Retrieval heads keep every token; streaming heads keep sink + recent. Two stores of their
    own sizes, not one full-size cache with a mask."""

    def __init__(self, policy: DuoAttentionKV, retrieval: tuple[int, ...], max_len: int, **kw) -> None:
        super().__init__(**kw)
        heads = kw.pop("heads")
        self.retrieval = torch.tensor(retrieval, dtype=torch.long, device=self.device)
        self.streaming = torch.tensor([h for h in range(heads) if h not in retrieval], dtype=torch.long, device=self.device)
        q = dict(bits=policy.bits, group_size=policy.group_size)
        self.parts = []
        if len(retrieval):
            self.parts.append((self.retrieval, FullStore(max_len, heads=len(retrieval), **q, **kw)))
        if len(self.streaming):
            self.parts.append((self.streaming, streaming_store(policy.sink, policy.recent, max_len,
                                                               heads=len(self.streaming), **q, **kw)))

    def nbytes(self) -> int:
        return sum(store.nbytes() for _, store in self.parts)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rule: ScoreRule
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each part attends its own heads' queries (the query heads of its KV heads)."""
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        grouped = q.reshape(b, hkv, hq // hkv, t, d)
        out = torch.empty(b, hkv, hq // hkv, t, d, dtype=torch.float32, device=q.device)
        for heads, part in self.parts:
            sub_q = grouped.index_select(1, heads).flatten(1, 2)
            sub_out, _ = part.attend(sub_q, k.index_select(1, heads), v.index_select(1, heads), scale, rule)
            out.index_copy_(1, heads, sub_out.unflatten(1, (len(heads), -1)))
        return out.reshape(b, hq, t, d), None

    def append(self, k, v, seen, mass=None) -> None:
        for heads, store in self.parts:
            store.append(k.index_select(1, heads), v.index_select(1, heads), seen)
        self.filled += k.shape[2]


def _store(policy: DuoAttentionKV, layer: int, shape: StoreShape) -> Store:
    if layer >= len(policy.retrieval_heads):
        raise ValueError(f"DuoAttentionKV has a head pattern for {len(policy.retrieval_heads)} layers; "
                         f"the model has a layer {layer}")
    heads = policy.retrieval_heads[layer]
    if heads and heads[-1] >= shape.kv_heads:
        raise ValueError(f"DuoAttentionKV.retrieval_heads[{layer}] names KV head {heads[-1]}; "
                         f"layer {layer} has {shape.kv_heads} KV heads")
    return DuoStore(policy, heads, shape.max_len, **shape.store_args())


register_policy(DuoAttentionKV, _store)
