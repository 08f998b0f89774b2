"""Compressed KV caches: policies, their storage, and a transformers cache that uses them.

    cache = fxpress.kv_cache(model, max_len=4096, policy=fxpress.KIVI(bits=2))
    model.generate(ids, past_key_values=cache, max_new_tokens=64)
    cache.nbytes()          # every byte of KV state: codes, scales, residual, positions, scores

The policies import nothing heavy; the cache imports transformers when it is first asked for.
"""

from typing import Any

from fxpress.kv.policies import KIVI, DuoAttentionKV, FullKV, HeavyHitterKV, StreamingKV

__all__ = ["KIVI", "CompressedKVCache", "DuoAttentionKV", "FullKV", "HeavyHitterKV", "KVCacheError",
           "StreamingKV", "kv_cache"]


def __getattr__(name: str) -> Any:
    if name in ("CompressedKVCache", "KVCacheError", "kv_cache"):
        from fxpress.kv import hf_cache

        return getattr(hf_cache, name)
    raise AttributeError(f"module 'fxpress.kv' has no attribute {name!r}")
