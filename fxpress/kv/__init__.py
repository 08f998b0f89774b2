"""Compressed KV caches: policies, their storage and the reference attention over it.

    cache = fxpress.kv_cache(model, max_len=4096, policy=fxpress.KIVI(bits=2))   # fxpress.hf.kv_cache
    model.generate(ids, cache=cache, max_new_tokens=64)   # past_key_values= before transformers renamed it
    cache.nbytes()          # every byte of KV state: codes, scales, residual, positions, scores

Nothing here imports transformers or the compiler. A policy is a plug-in (``fxpress.kv.registry``).
"""

from fxpress.core.errors import KVCacheError
from fxpress.kv.policies import KIVI, DuoAttentionKV, FullKV, HeavyHitterKV, StreamingKV, ThinKV

__all__ = ["KIVI", "DuoAttentionKV", "FullKV", "HeavyHitterKV", "KVCacheError", "StreamingKV", "ThinKV"]
