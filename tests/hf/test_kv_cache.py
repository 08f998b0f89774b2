"""fxpress.kv_cache inside transformers' generate(): exact with FullKV, every policy end to end,
clear errors for what it cannot do."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.core.errors import KVCacheError, OptionError
from fxpress.hf.cache_argument import cache_argument
from tests.tiny_models import tiny_gpt2, tiny_llama, token_ids

NEW = 10


def _generate(model, ids, cache=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_argument(cache), max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, pad_token_id=0)


POLICIES = [
    fxpress.KIVI(bits=2, group_size=16, residual=16),
    fxpress.KIVI(bits=4, group_size=16, residual=16, sink=0),
    fxpress.StreamingKV(sink=2, recent=8),
    fxpress.StreamingKV(sink=2, recent=8, bits=4, group_size=16),
    fxpress.HeavyHitterKV(budget=12, recent=4),
    fxpress.DuoAttentionKV(retrieval_heads=((0,), ()), sink=2, recent=6),
]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_full_cache_generates_the_same_tokens_as_transformers(make):
    model = make()
    ids = token_ids(batch=2, length=12)
    expected = _generate(model, ids)
    cache = fxpress.kv_cache(model, 12 + NEW, fxpress.FullKV(), dtype=None)
    assert torch.equal(_generate(model, ids, cache), expected)
    # The model still serves other caches exactly (its attention falls back to SDPA).
    assert torch.equal(_generate(model, ids), expected)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_every_policy_generates_end_to_end_in_less_memory(policy):
    model = tiny_llama()  # grouped-query attention: 4 query heads on 2 KV heads
    ids = token_ids(batch=2, length=100)
    cache = fxpress.kv_cache(model, 100 + NEW, policy)
    out = _generate(model, ids, cache)
    assert out.shape == (2, 100 + NEW)
    full = fxpress.kv_cache(model, 100 + NEW, fxpress.FullKV())
    _generate(model, ids, full)
    assert 0 < cache.nbytes() < full.nbytes()
    assert cache.get_seq_length() == 100 + NEW - 1  # positions count every token seen, not those kept


def test_context_longer_than_the_cache_is_refused():
    model = tiny_llama()
    cache = fxpress.kv_cache(model, 16, fxpress.KIVI(bits=2, group_size=16, residual=16))
    with pytest.raises(KVCacheError, match="at most 16 tokens"):
        _generate(model, token_ids(batch=1, length=12), cache)


def test_padded_batches_are_refused():
    model = tiny_llama()
    ids = token_ids(batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = fxpress.kv_cache(model, 20, fxpress.StreamingKV(sink=2, recent=4))
    with pytest.raises(KVCacheError, match="padded"), torch.no_grad():
        model(ids, attention_mask=mask, **cache_argument(cache))


@pytest.mark.parametrize("make, message", [
    (lambda: fxpress.KIVI(bits=3), "bits must be one of"),
    (lambda: fxpress.KIVI(group_size=24, bits=2), "multiple of 16"),
    (lambda: fxpress.KIVI(residual=0), "residual must be a positive int"),
    (lambda: fxpress.StreamingKV(sink=-1), "sink must be an int >= 0"),
    (lambda: fxpress.HeavyHitterKV(budget=8, recent=8), "must be smaller than budget"),
    (lambda: fxpress.DuoAttentionKV(retrieval_heads=[[0, -1]]), "KV-head indices"),
    (lambda: fxpress.DuoAttentionKV(retrieval_heads=3), "one entry per layer"),
    (lambda: fxpress.StreamingKV(bits=5), "bits must be one of"),
])
def test_bad_policy_parameters_are_refused_where_they_are_written(make, message):
    with pytest.raises(OptionError, match=message):
        make()


def test_bad_cache_arguments_name_the_problem():
    model = tiny_llama()
    with pytest.raises(OptionError, match="expected a KV policy"):
        fxpress.kv_cache(model, 16, "kivi")
    with pytest.raises(KVCacheError, match="max_len must be a positive int"):
        fxpress.kv_cache(model, 0, fxpress.FullKV())
    cache = fxpress.kv_cache(model, 32, fxpress.DuoAttentionKV(retrieval_heads=((5,), ())))
    with pytest.raises(ValueError, match="names KV head 5; layer 0 has 2 KV heads"):
        _generate(model, token_ids(batch=1, length=4), cache)


def test_duo_head_pattern_from_scores_keeps_the_top_fraction():
    policy = fxpress.DuoAttentionKV.from_scores([[0.1, 0.9], [0.5, 0.2]], 0.5, sink=4, recent=8)
    assert policy.retrieval_heads == ((1,), (0,))


def test_compressed_cache_under_torch_compile_matches_eager():
    """The store handshake runs outside the compiled graphs (graph breaks around it), and each
    layer's resumed graph runs that layer's weights."""
    model = tiny_llama()
    ids = token_ids(batch=2, length=20)
    policy = fxpress.KIVI(bits=4, group_size=16, residual=16)
    expected = _generate(model, ids, fxpress.kv_cache(model, 20 + NEW, policy))
    forward = model.forward
    model.forward = torch.compile(forward, backend="fxpress")
    try:
        got = _generate(model, ids, fxpress.kv_cache(model, 20 + NEW, policy))
    finally:
        model.forward = forward
    assert torch.equal(got, expected)


def test_multi_query_attention_is_exact_with_the_full_policy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    ids = token_ids(batch=3, length=12)
    expected = _generate(model, ids)
    assert torch.equal(_generate(model, ids, fxpress.kv_cache(model, 12 + NEW, fxpress.FullKV(), dtype=None)),
                       expected)
    heavy = fxpress.kv_cache(model, 12 + NEW, fxpress.HeavyHitterKV(budget=8, recent=4))
    assert _generate(model, ids, heavy).shape == (3, 12 + NEW)
