"""``fxpress.kv_cache`` on model families beyond Llama: models whose attention it cannot reach are
refused naming the class; sliding windows and logit soft-capping are honoured (or refused) so
greedy tokens equal eager's for 32 steps."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fxpress
from fxpress.core.errors import KVCacheError
from fxpress.hf.cache_argument import cache_argument

NEW = 32


def _generate(model, ids, cache=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_argument(cache),
                              max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0)


def _ids(length=12):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(3))


def _gpt_neo():
    cfg = T.GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                         attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=128)
    return T.GPTNeoForCausalLM._from_config(cfg)


def _falcon_alibi():
    cfg = T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                         new_decoder_architecture=False, multi_query=False)
    return T.FalconForCausalLM._from_config(cfg)


def _bloom():
    return T.BloomForCausalLM._from_config(T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4))


@pytest.mark.parametrize("make, name", [(_gpt_neo, "GPTNeoForCausalLM"), (_bloom, "BloomForCausalLM")])
def test_models_the_switch_cannot_reach_are_refused_by_name(make, name):
    torch.manual_seed(0)
    model = make().eval()
    cache = fxpress.kv_cache(model, max_len=64, policy=fxpress.FullKV())
    with pytest.raises(KVCacheError, match=f"{name} does not compute attention through transformers' AttentionInterface"):
        _generate(model, _ids(), cache)


def test_alibi_models_are_refused_when_the_cache_is_made():
    torch.manual_seed(0)
    with pytest.raises(KVCacheError, match="FalconForCausalLM.*ALiBi"):
        fxpress.kv_cache(_falcon_alibi().eval(), max_len=64, policy=fxpress.FullKV())


def _mistral(window):
    cfg = T.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                          max_position_embeddings=256)
    return T.MistralForCausalLM._from_config(cfg, attn_implementation="sdpa")


def _gemma2(window):
    # Gemma 2 caps its attention logits; transformers' sdpa refuses that, so eager is the reference.
    cfg = T.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
                         max_position_embeddings=256, attn_logit_softcapping=5.0)
    return T.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")


def _gemma3(window):
    cfg = T.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
                             max_position_embeddings=256, sliding_window_pattern=2)
    return T.Gemma3ForCausalLM._from_config(cfg, attn_implementation="sdpa")


SLIDING = [_mistral, _gemma2, _gemma3]


@pytest.mark.parametrize("make", SLIDING)
@pytest.mark.parametrize("policy", [fxpress.FullKV(), fxpress.KIVI(bits=8, group_size=16, residual=16, sink=0)],
                         ids=["full", "kivi8"])
def test_sliding_window_and_softcap_models_generate_eagers_tokens(make, policy):
    torch.manual_seed(0)
    model = make(window=8).eval()  # 12 prompt tokens + 32 new: the window binds from the start
    ids = _ids()
    expected = _generate(model, ids)
    got = _generate(model, ids, fxpress.kv_cache(model, max_len=64, policy=policy, dtype=None))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("make", SLIDING)
def test_evicting_policies_refuse_a_binding_window(make):
    torch.manual_seed(0)
    model = make(window=8).eval()
    cache = fxpress.kv_cache(model, max_len=64, policy=fxpress.StreamingKV(sink=2, recent=12))
    with pytest.raises(KVCacheError, match="sliding-window layer \\(window 8\\)"):
        _generate(model, _ids(), cache)


def _static_generate(model, ids, backend=None):
    from transformers import StaticCache

    torch._dynamo.reset()
    cache = StaticCache(config=model.config, max_cache_len=64)
    forward = model.forward
    if backend is not None:
        model.forward = torch.compile(forward, backend=backend)
    try:
        return _generate(model, ids, cache)
    finally:
        model.forward = forward


STAYS_DENSE = "roll + index_put"


@pytest.mark.parametrize("make, compressed", [(_gemma3, True), (_mistral, False)])
def test_the_pass_route_compresses_full_layers_and_leaves_sliding_ones_dense_saying_why(make, compressed):
    torch.manual_seed(0)
    model = make(window=8).eval()  # a StaticCache of 64 tokens, longer than the window
    ids = _ids()
    expected = _static_generate(model, ids)
    got = _static_generate(model, ids, fxpress.backend(kv=fxpress.FullKV()))
    assert torch.equal(got, expected)
    fired = fxpress.counters["compress_kv_cache"]
    assert (fired["cache update -> sdpa => kv_attend"] > 0) == compressed
    assert any(STAYS_DENSE in reason for reason in fired)


def test_the_pass_route_says_when_it_finds_no_attention_to_compress():
    torch.manual_seed(0)
    model = _gemma2(window=8).eval()  # eager attention: no SDPA to rewrite
    with pytest.warns(UserWarning, match="found no scaled_dot_product_attention"):
        got = _static_generate(model, _ids(), fxpress.backend(kv=fxpress.FullKV()))
    assert torch.equal(got, _static_generate(model, _ids()))
