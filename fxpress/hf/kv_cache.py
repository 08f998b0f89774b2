"""A transformers ``Cache`` that keeps K/V compressed, for ``model.generate(cache=...)``
(``past_key_values=`` in transformers releases before the rename; ``fxpress.hf.cache_argument``
spells it for the installed one).

    cache = fxpress.kv_cache(model, max_len=4096, policy=fxpress.KIVI(bits=2))
    out = model.generate(ids, **cache_argument(cache), max_new_tokens=64)

How it plugs in without touching the model's code, through two public transformers registries:

- each layer's ``update(k, v)`` binds the new chunk to the layer (``fxpress::cache_bind``) and
  returns it; no full-precision copy of the past is ever made;
- the model's attention implementation becomes ``"fxpress_kv"`` (registered with
  ``AttentionInterface``): ``fxpress::cache_attend`` attends the queries to the layer's compressed
  store plus the chunk, then appends the chunk to the store (H2O stores also receive the
  attention each key got). Attention calls that do not come from a compressed cache (a
  ``DynamicCache``, no cache) go to transformers' own SDPA path with its usual mask.

Both halves are ops, and nothing on the way reads a token count, so ``torch.compile`` traces the
whole forward as one graph for the prefill and one for the decode step, whatever the number of
tokens seen. Which attention call is compressed is known when tracing (``update`` marks its layer
for the attention call that follows); which cache it belongs to is known at run time, per thread,
through the handle tensor the layer owns.

Token positions continue from the tokens *seen*, not the tokens kept, so rotary embeddings stay
right after eviction. Padded batches are refused: the stores keep no per-token padding mask.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import fxpress.ops  # noqa: F401  (registers fxpress::cache_bind and fxpress::cache_attend)
from fxpress.core.errors import KVCacheError
from fxpress.kv import bound_layers
from fxpress.kv.attention import ScoreRule
from fxpress.kv.policy_checks import check_head_dim
from fxpress.kv.registry import Policy, check_policy
from fxpress.kv.sequence import KVSequence
from fxpress.kv.stores import Store

ATTENTION = "fxpress_kv"

class _PerThread(threading.local):
    def __init__(self) -> None:
        # Eager forwards: from a layer's update() to the attention and mask calls that follow,
        # which layers' attention is compressed, and whether the next mask is for such a cache.
        self.marks: dict[object, bool] = {}


_THREAD = _PerThread()
# The same marks while torch.compile traces: a plain dict, whose updates it traces as side effects
# (reading a thread-local would break the graph). The decisions are baked into the graph.
_TRACE_MARKS: dict[object, bool] = {}


def _marks() -> dict[object, bool]:
    return _TRACE_MARKS if torch.compiler.is_compiling() else _THREAD.marks


_MASK = "mask"  # the mark's key for "the next mask is for a compressed cache"


class CompressedLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, policy: Policy, layer_idx: int, max_len: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.layer_idx, self.storage_dtype = layer_idx, dtype
        self.sequence = KVSequence(policy, layer_idx, max_len, f"fxpress KV cache layer {layer_idx}")
        handle = bound_layers.register(self)
        # A tensor, so a compiled graph takes it as an input: one graph serves every cache.
        self.handle = torch.tensor([handle], dtype=torch.int64)

    @property
    def store(self) -> Store | None:
        return self.sequence.store

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.sequence.start(key_states, self.storage_dtype or key_states.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        _marks()[self.layer_idx] = True
        return torch.ops.fxpress.cache_bind(key_states, self.handle), value_states

    def step(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rule: ScoreRule
             ) -> torch.Tensor:
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        self.sequence.check(k)
        return self.sequence.step(query, k, v, scale, rule)

    def get_seq_length(self) -> int:
        return self.sequence.seen

    def get_max_length(self) -> int:
        return self.sequence.max_len

    get_max_cache_shape = get_max_length  # its name before transformers 5.2x

    def get_mask_sizes(self, query: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        # The compressed attention takes the 2-D padding mask as it is (``fxpress_kv_mask``); these
        # sizes only have to exist, and must not read the token count (a compiled forward would
        # specialise on it). Older transformers pass cache_position.
        _marks()[_MASK] = True
        t = query if isinstance(query, int) else query.shape[0]
        return t, 0

    def nbytes(self) -> int:
        return self.sequence.nbytes()

    def reset(self) -> None:
        self.sequence.store, self.sequence.seen, self.is_initialized = None, 0, False


class CompressedKVCache(Cache):
    """One :class:`CompressedLayer` per decoder layer; ``nbytes()`` is every byte of KV state."""

    def __init__(self, num_layers: int, policy: Policy, max_len: int, dtype: torch.dtype | None) -> None:
        super().__init__(layers=[CompressedLayer(policy, i, max_len, dtype) for i in range(num_layers)])
        self.policy, self.max_len = policy, max_len

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0  # see CompressedLayer.get_mask_sizes: the mask is the padding mask as it is

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def stored_tokens(self) -> list[int]:
        return [0 if layer.store is None else layer.store.filled for layer in self.layers]


def fxpress_kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    if not _marks().pop(getattr(module, "layer_idx", None), False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.fxpress.cache_attend(query, key, value, attention_mask, module.layer_idx, float(scale),
                                         kwargs.get("softcap"), kwargs.get("sliding_window"))
    return out, None


def fxpress_kv_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """For a compressed cache, the user's 2-D padding mask as it is (the attention applies
    causality and windows itself, and refuses padding); for any other cache, SDPA's mask."""
    if _marks().pop(_MASK, False):
        mask = kwargs.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION, fxpress_kv_attention)
AttentionMaskInterface.register(ATTENTION, fxpress_kv_mask)


def kv_cache(model: torch.nn.Module, max_len: int, policy: Policy, *, dtype: torch.dtype | None = torch.float16
             ) -> CompressedKVCache:
    """A compressed KV cache for ``model`` holding up to ``max_len`` tokens per sequence.

    ``dtype`` is the storage type of what stays at full precision (residual windows, kept tokens,
    scales); ``None`` keeps the model's own. Switches the model's attention implementation to
    ``"fxpress_kv"``, which behaves exactly like ``"sdpa"`` for other caches.
    """
    check_policy(policy, "fxpress.kv_cache")
    if not isinstance(max_len, int) or max_len <= 0:
        raise KVCacheError(f"fxpress.kv_cache: max_len must be a positive int, got {max_len!r}")
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    num_layers = getattr(text, "num_hidden_layers", None)
    if num_layers is None:
        raise KVCacheError(f"fxpress.kv_cache needs a transformers model with config.num_hidden_layers; "
                           f"got {type(model).__name__}")
    if getattr(text, "alibi", False):
        raise KVCacheError(f"fxpress.kv_cache({type(model).__name__}): the model adds an ALiBi position bias to "
                           "its attention scores, which compressed KV caches do not apply to stored tokens")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    check_head_dim(policy, head_dim, f"fxpress.kv_cache({type(model).__name__})")
    if config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)
    _probe_first_forward(model)
    return CompressedKVCache(num_layers, policy, max_len, dtype)


def _probe_first_forward(model: torch.nn.Module) -> None:
    """Check, after the first forward that uses a compressed cache, that the switch to
    ``"fxpress_kv"`` took effect: every chunk a layer stored was read by fxpress's attention. Models
    that compute attention themselves (GPT-Neo, BLOOM) would otherwise run uncompressed or wrong."""
    if getattr(model, "_fxpress_kv_probe", None) is not None:
        return
    model_ref = weakref.ref(model)

    def probe(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if not isinstance(cache, CompressedKVCache):
            cache = next((a for a in args if isinstance(a, CompressedKVCache)), None)
        if cache is None:
            return
        unread = bound_layers.unread(cache.layers)
        written = any(layer.is_initialized for layer in cache.layers)
        if unread or not written:
            bound_layers.clear()
            _THREAD.marks.clear()
            what = f"layers {unread} stored keys that no attention read" if unread else "it never wrote the cache"
            raise KVCacheError(f"fxpress.kv_cache: {type(module).__name__} does not compute attention through "
                               f"transformers' AttentionInterface, so switching it to {ATTENTION!r} has no effect "
                               f"({what}); this model cannot use a compressed KV cache")
        handle.remove()
        if model_ref() is not None:
            model_ref()._fxpress_kv_probe = "verified"

    handle = model.register_forward_hook(probe, with_kwargs=True)
    model._fxpress_kv_probe = handle
