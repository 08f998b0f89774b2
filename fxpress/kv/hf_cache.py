"""A transformers ``Cache`` that keeps K/V compressed, for ``model.generate(past_key_values=...)``.

    cache = fxpress.kv_cache(model, max_len=4096, policy=fxpress.KIVI(bits=2))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

How it plugs in without touching the model's code, through two public transformers registries:

- each layer's ``update(k, v)`` holds the new chunk back and returns it unchanged; no
  full-precision copy of the past is ever made;
- the model's attention implementation becomes ``"fxpress_kv"`` (registered with
  ``AttentionInterface``): it attends the queries to the layer's compressed store plus the chunk,
  then appends the chunk to the store (H2O stores also receive the attention each key got).
  Attention calls that do not come from a compressed cache (a ``DynamicCache``, no cache) go to
  transformers' own SDPA path with its usual mask, so the model keeps working for them.

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

from fxpress.compiler.errors import KVCacheError
from fxpress.kv.attention import ScoreRule
from fxpress.kv.policies import Policy, check_head_dim, check_policy
from fxpress.kv.sequence import KVSequence
from fxpress.kv.stores import Store

ATTENTION = "fxpress_kv"

class _Waiting(threading.local):
    """Per thread: layer index -> the compressed layer whose chunk waits for its attention call.
    update() and the attention call of one layer run back to back on one thread, so one slot per
    layer index is enough; threads generating with caches of their own never meet."""

    def __init__(self) -> None:
        self.layers: dict[int, CompressedLayer] = {}


_WAITING = _Waiting()


class CompressedLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, policy: Policy, layer_idx: int, max_len: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.layer_idx, self.storage_dtype = layer_idx, dtype
        self.sequence = KVSequence(policy, layer_idx, max_len, f"fxpress KV cache layer {layer_idx}")
        self.chunk: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def store(self) -> Store | None:
        return self.sequence.store

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.sequence.start(key_states, self.storage_dtype or key_states.dtype)
        self.is_initialized = True

    # update() and the attention call are opaque to torch.compile: the handshake between them and
    # the stores' bookkeeping (token counts, eviction) are host code that must run for real. A
    # compiled model breaks its graph around them and stays correct.
    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.chunk is not None:
            raise KVCacheError(f"layer {self.layer_idx}: the previous chunk never reached fxpress's attention; "
                               "this model's attention does not go through transformers' AttentionInterface")
        self.sequence.check(key_states)
        self.chunk = (key_states, value_states)
        _WAITING.layers[self.layer_idx] = self
        return key_states, value_states

    def attend_and_append(self, query: torch.Tensor, scale: float, rule: ScoreRule) -> torch.Tensor:
        (k, v), self.chunk = self.chunk, None
        return self.sequence.step(query, k, v, scale, rule)

    def get_seq_length(self) -> int:
        return self.sequence.seen

    def get_max_length(self) -> int:
        return self.sequence.max_len

    def get_mask_sizes(self, query: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        # The mask transformers builds covers the new chunk only (kv offset = tokens seen); the
        # stored tokens are all in the past and need none. Older transformers pass cache_position.
        t = query if isinstance(query, int) else query.shape[0]
        return t, self.sequence.seen

    def nbytes(self) -> int:
        return self.sequence.nbytes()

    def reset(self) -> None:
        self.sequence.store, self.sequence.seen, self.chunk, self.is_initialized = None, 0, None, False


class CompressedKVCache(Cache):
    """One :class:`CompressedLayer` per decoder layer; ``nbytes()`` is every byte of KV state."""

    def __init__(self, num_layers: int, policy: Policy, max_len: int, dtype: torch.dtype | None) -> None:
        super().__init__(layers=[CompressedLayer(policy, i, max_len, dtype) for i in range(num_layers)])
        self.policy, self.max_len = policy, max_len

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def stored_tokens(self) -> list[int]:
        return [0 if layer.store is None else layer.store.filled for layer in self.layers]


@torch.compiler.disable
def fxpress_kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    layer = _WAITING.layers.get(getattr(module, "layer_idx", None))
    # The keys are the chunk the layer holds back (the same memory: under torch.compile they may
    # arrive as another tensor object), or they come from some other cache.
    if layer is None or layer.chunk is None or not _same_tensor(layer.chunk[0], key):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    del _WAITING.layers[layer.layer_idx]
    rule = ScoreRule(softcap=kwargs.get("softcap"), window=kwargs.get("sliding_window"))
    _check_mask(attention_mask, rule, type(module).__name__)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend_and_append(query, scale, rule).transpose(1, 2).contiguous(), None


def _check_mask(mask: torch.Tensor | None, rule: ScoreRule, where: str) -> None:
    """The attention applies causality and the window itself; a mask that says more (padding, a
    position bias such as ALiBi) would be ignored, so it is refused."""
    if mask is None:
        return
    if mask.dtype != torch.bool:
        if bool((torch.isfinite(mask) & (mask != 0)).any()):
            raise KVCacheError(f"{where}: the attention mask carries a position bias (ALiBi?) that fxpress KV "
                               "caches cannot apply to stored tokens; use a model with rotary or learned positions")
        mask = mask == 0
    last = mask[..., -1, :]
    if rule.window is not None:
        last = last[..., -min(rule.window, last.shape[-1]):]
    if not bool(last.all()):
        raise KVCacheError("fxpress KV caches do not support padded batches yet: the last query of the chunk "
                           "cannot see every key. Use prompts of equal length.")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


AttentionInterface.register(ATTENTION, fxpress_kv_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


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
        unread = [layer.layer_idx for layer in cache.layers if layer.chunk is not None]
        written = any(layer.is_initialized for layer in cache.layers)
        if unread or not written:
            for layer in cache.layers:
                layer.chunk = None
            what = f"layers {unread} stored keys that no attention read" if unread else "it never wrote the cache"
            raise KVCacheError(f"fxpress.kv_cache: {type(module).__name__} does not compute attention through "
                               f"transformers' AttentionInterface, so switching it to {ATTENTION!r} has no effect "
                               f"({what}); this model cannot use a compressed KV cache")
        handle.remove()
        if model_ref() is not None:
            model_ref()._fxpress_kv_probe = "verified"

    handle = model.register_forward_hook(probe, with_kwargs=True)
    model._fxpress_kv_probe = handle
