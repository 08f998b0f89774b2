"""A KV policy registered from this file alone, with a store of its own: chunks kept as a list, in
float32, allocated as they come. It plugs into fxpress.kv_cache and into the compress_kv_cache pass
of a compiled StaticCache model, and being lossless it gives transformers' tokens in both."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fxpress
from fxpress.hf.cache_argument import cache_argument
from fxpress.kv.registry import StoreShape, register_policy, registered_policies
from fxpress.kv.stores import Store
from tests.passes.test_compress_kv_cache import RULE, _generate as generate_static
from tests.tiny_models import tiny_llama, token_ids

NEW = 6


class ChunkListStore(Store):
    keeps_positions = True  # chunks in arrival order: stored token i is position i

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.appended = 0

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.chunks)

    def segments(self):
        yield from self.chunks

    def append(self, k, v, seen, mass=None) -> None:
        # The caller reuses k and v's memory (a compiled graph's arena): keep copies.
        self.chunks.append((k.to(torch.float32, copy=True), v.to(torch.float32, copy=True)))
        self.filled += k.shape[2]
        self.appended += 1


@dataclass(frozen=True)
class ChunkListKV:
    def describe(self) -> str:
        return "ChunkListKV"


STORES: list[ChunkListStore] = []


def _build(policy: ChunkListKV, layer: int, shape: StoreShape) -> Store:
    STORES.append(ChunkListStore(**shape.store_args()))
    return STORES[-1]


register_policy(ChunkListKV, _build)


def _generate(model, ids, cache=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_argument(cache), max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, pad_token_id=0)


@pytest.fixture(autouse=True)
def _fresh_stores():
    STORES.clear()
    yield
    STORES.clear()


def test_registered_policy_is_known():
    assert ChunkListKV in registered_policies()
    fxpress.Options(kv=ChunkListKV())  # accepted as an option
    with pytest.raises(fxpress.OptionError, match="option kv="):
        fxpress.Options(kv=object())
    with pytest.raises(fxpress.OptionError, match="ChunkListKV"):  # the refusal lists the registered ones
        fxpress.kv_cache(tiny_llama(), 16, object())


def test_kv_cache_with_the_toy_policy_generates_transformers_tokens():
    model = tiny_llama()
    ids = token_ids(batch=2, length=10)
    expected = _generate(model, ids)
    cache = fxpress.kv_cache(model, 10 + NEW, ChunkListKV(), dtype=None)
    assert torch.equal(_generate(model, ids, cache), expected)
    layers = model.config.num_hidden_layers
    assert len(STORES) == layers and all(s.appended == NEW for s in STORES)  # prefill + NEW - 1 steps
    assert cache.nbytes() == sum(s.nbytes() for s in STORES) > 0


def test_compiled_static_cache_with_the_toy_policy_equals_eager():
    model = tiny_llama()
    ids = token_ids(batch=2, length=6)
    expected = generate_static(model, ids)
    got = generate_static(model, ids, fxpress.backend(kv=ChunkListKV()))
    assert torch.equal(got, expected)
    assert fxpress.counters["compress_kv_cache"][RULE] == 2 * model.config.num_hidden_layers
    assert STORES and all(isinstance(s, ChunkListStore) for s in STORES)
