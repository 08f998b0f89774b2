"""KV policies refuse wrong values when they are made; caches refuse a head size their policy
cannot take when they are made; compiled programs do not keep a deleted model's weights alive."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import LlamaConfig, LlamaForCausalLM

import fxpress
from fxpress.core.errors import KVCacheError, OptionError
from fxpress.hf.cache_argument import cache_argument
from fxpress.kv.registry import make_store
from fxpress.kv.stores import FullStore


@pytest.mark.parametrize("make", [
    lambda: fxpress.KIVI(bits=4.0),
    lambda: fxpress.KIVI(bits=True),
    lambda: fxpress.KIVI(group_size=32.0),
    lambda: fxpress.StreamingKV(bits=4.0),
    lambda: fxpress.HeavyHitterKV(budget=1e9),
    lambda: fxpress.HeavyHitterKV(budget=512, recent=256, bits="4"),
])
def test_policies_refuse_values_of_the_wrong_type(make):
    with pytest.raises(OptionError, match="must be"):
        make()


def test_a_budget_past_the_cache_length_allocates_only_the_cache_length():
    store = make_store(fxpress.HeavyHitterKV(budget=10**9, recent=4), 0, batch=1, kv_heads=2, head_dim=8,
                       max_len=16, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(store, FullStore) and store.nbytes() <= 2 * 2 * 16 * 8 * 4
    store = make_store(fxpress.StreamingKV(sink=4, recent=10**9), 0, batch=1, kv_heads=2, head_dim=8,
                       max_len=16, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(store, FullStore)


def _llama_with_head_dim(head_dim):
    cfg = LlamaConfig(vocab_size=64, hidden_size=2 * head_dim, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def test_kv_cache_refuses_a_head_dim_its_groups_do_not_divide_when_made():
    model = _llama_with_head_dim(24)
    with pytest.raises(KVCacheError, match="head_dim 24 is not a multiple.*group_size in \\[8\\]"):
        fxpress.kv_cache(model, max_len=64, policy=fxpress.KIVI(bits=4))
    fxpress.kv_cache(model, max_len=64, policy=fxpress.KIVI(bits=4, group_size=8))  # a divisor works


def test_compress_kv_cache_refuses_such_a_head_dim_at_compile_time():
    from transformers import StaticCache

    model = _llama_with_head_dim(24)
    cache = StaticCache(config=model.config, max_cache_len=16)
    compiled = torch.compile(model, backend=fxpress.backend(kv=fxpress.KIVI(bits=4)))
    with pytest.raises(Exception, match="head_dim 24 is not a multiple"):
        with torch.no_grad():
            compiled(torch.ones(1, 4, dtype=torch.long), **cache_argument(cache), cache_position=torch.arange(4))


def test_compiled_programs_release_a_deleted_models_weights():
    backend = fxpress.backend()
    weights = []
    for _ in range(6):
        model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 512)).eval()
        weights.append(StorageWeakRef(model[0].weight.untyped_storage()))
        with torch.no_grad():
            torch.compile(model, backend=backend)(torch.randn(2, 512))
        del model
    gc.collect()
    assert all(w.expired() for w in weights), f"{sum(not w.expired() for w in weights)} of 6 models still held"


def test_a_new_model_after_a_freed_one_gets_its_own_weights():
    backend = fxpress.backend()
    x = torch.randn(2, 64)
    for seed in range(4):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh()).eval()
        with torch.no_grad():
            assert torch.allclose(torch.compile(model, backend=backend)(x), model(x), atol=1e-6)
        del model
        gc.collect()
