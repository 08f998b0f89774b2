"""``fxpress::cache_bind`` and ``fxpress::cache_attend``: the two halves of a ``fxpress.kv_cache``
layer step, as ops, so that torch.compile traces a compressed-cache model with no graph break.

    cache_bind(k [B, Hkv, T, d], handle [1] int64) -> k (a copy)
    cache_attend(q [B, Hq, T, d], k, v [B, Hkv, T, d], mask?, layer, scale, softcap?, window?)
        -> [B, T, Hq, d]

The cache layer's ``update()`` calls ``cache_bind`` with the handle tensor it owns: at run time the
op names that layer as the one whose chunk the next attention call of ``layer`` takes (per thread).
The attention then attends the queries to the layer's compressed store plus the chunk and appends
the chunk. Both are stateful: the data dependence through ``k`` keeps them in order, and the copy
``cache_bind`` returns is what keeps it from being dropped. ``mask`` is the user's 2-D padding mask;
causality, the sliding window and soft-capping are applied by the attention itself.
"""

from __future__ import annotations

import torch

from fxpress.kv.bound_layers import attend_bound, bind
from fxpress.ops._define import define_op


def _cache_bind(k: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    bind(int(handle.reshape(-1)[0]))
    return k.clone()


def _cache_bind_fake(k, handle):
    return torch.empty_like(k)


def _cache_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, layer: int,
                  scale: float, softcap: float | None, window: int | None) -> torch.Tensor:
    return attend_bound(q, k, v, mask, layer, scale, softcap, window)


def _cache_attend_fake(q, k, v, mask, layer, scale, softcap, window):
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d)


cache_bind = define_op("cache_bind", _cache_bind, _cache_bind_fake)
cache_attend = define_op("cache_attend", _cache_attend, _cache_attend_fake)
