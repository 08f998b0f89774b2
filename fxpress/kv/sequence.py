"""One attention layer's compressed KV for one batch of sequences, and the step every way in
shares: attend the chunk's queries to the stored tokens plus the chunk, then store the chunk.

Both the transformers cache (``fxpress.hf.kv_cache``) and the compiled graphs' state (``graph_state``) are
this plus their own way of being reached.
"""

from __future__ import annotations

import torch

from fxpress.core.errors import KVCacheError
from fxpress.kv.attention import PLAIN, ScoreRule, attend
from fxpress.kv.registry import Policy, make_store
from fxpress.kv.stores import Store


class KVSequence:
    def __init__(self, policy: Policy, layer: int, max_len: int, where: str) -> None:
        self.policy, self.layer, self.max_len, self.where = policy, layer, max_len, where
        self.store: Store | None = None
        self.seen = 0  # tokens seen, evicted ones included: the next token's position

    def start(self, k: torch.Tensor, dtype: torch.dtype) -> None:
        """A fresh store shaped for chunks like ``k [B, Hkv, T, d]``, keeping ``dtype``."""
        b, h, _, d = k.shape
        self.store = make_store(self.policy, self.layer, batch=b, kv_heads=h, head_dim=d, max_len=self.max_len,
                                dtype=dtype, device=k.device)
        self.seen = 0

    def check(self, k: torch.Tensor) -> None:
        """Refuse a chunk the store was not built for, before anything is computed."""
        store, t = self.store, k.shape[2]
        if (k.shape[0], k.shape[1]) != (store.batch, store.heads):
            raise KVCacheError(f"{self.where} was built for batch {store.batch} with {store.heads} KV heads; "
                               f"got keys of shape {tuple(k.shape)}")
        if self.seen + t > self.max_len:
            raise KVCacheError(f"{self.where}: {self.seen + t} tokens do not fit the cache's {self.max_len}: it "
                               f"holds at most {self.max_len} tokens. Build the cache with a larger max_len.")

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             rule: ScoreRule = PLAIN) -> torch.Tensor:
        if self.store.wants_queries:
            self.store.observe_queries(q)
        out, mass = attend(self.store, q, k, v, scale, rule)
        self.store.append(k, v, self.seen, mass)
        self.seen += k.shape[2]
        return out.to(q.dtype)

    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes()
