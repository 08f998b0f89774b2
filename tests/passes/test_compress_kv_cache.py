"""compress_kv_cache on models that keep their cache in fixed buffers: HF StaticCache (tiny Llama
with GQA, tiny GPT-2, the real SmolLM2) and a gpt-fast style ``index_put`` cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import StaticCache

import fxpress
from fxpress.core.errors import KVCacheError
from fxpress.hf.cache_argument import cache_argument
from tests.tiny_models import tiny_gpt2, tiny_llama, token_ids

RULE = "cache update -> sdpa => kv_attend"


def _generate(model, ids, backend=None, new=8, max_len=32):
    torch._dynamo.reset()
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    forward = model.forward
    if backend is not None:
        model.forward = torch.compile(forward, backend=backend)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_argument(cache),
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    finally:
        model.forward = forward


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_fires_once_per_layer_and_full_policy_equals_eager_token_for_token(make):
    model = make()
    ids = token_ids(batch=2, length=6)
    expected = _generate(model, ids)
    reports = []
    got = _generate(model, ids, fxpress.Backend(fxpress.Options(kv=fxpress.FullKV()), on_report=reports.append))
    assert torch.equal(got, expected)
    assert len(reports) == 2  # prefill, then decode
    layers = model.config.num_hidden_layers
    assert fxpress.counters["compress_kv_cache"][RULE] == 2 * layers
    for report in reports:
        assert report.ops_after["fxpress.kv_attend.default"] == layers
    # the decode graph no longer writes the model's buffers
    assert "aten.index_copy_.default" not in reports[-1].ops_after


def test_compressed_policy_runs_and_without_a_policy_nothing_changes():
    model = tiny_llama()
    ids = token_ids(batch=2, length=20)
    out = _generate(model, ids, fxpress.backend(kv=fxpress.KIVI(bits=4, group_size=16, residual=16)))
    assert out.shape == (2, 28)
    fxpress.counters.clear()
    _generate(model, ids, fxpress.backend())
    assert not fxpress.counters["compress_kv_cache"]


def test_context_longer_than_the_cache_is_refused():
    model = tiny_llama()
    with pytest.raises(Exception, match="do not fit the cache's 12"):
        _generate(model, token_ids(batch=1, length=10), fxpress.backend(kv=fxpress.FullKV()), new=6, max_len=12)


class IndexPutAttention(torch.nn.Module):
    """gpt-fast's KVCache: fixed buffers written with ``cache[:, :, pos] = k``; 4 query heads on 2 KV heads."""

    def __init__(self, max_len=16, d=8):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, 2, max_len, d))
        self.register_buffer("v_cache", torch.zeros(1, 2, max_len, d))

    def forward(self, q, k, v, pos, mask):
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)


def test_index_put_cache_is_found_and_exact():
    torch.manual_seed(0)
    eager, compiled_module = IndexPutAttention(), IndexPutAttention()
    compiled = torch.compile(compiled_module, backend=fxpress.backend(kv=fxpress.FullKV()))
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    for start, t in ((0, 5), (5, 1), (6, 1)):
        pos = torch.arange(start, start + t)
        q, k, v = torch.randn(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
        mask = causal[pos][None, None]
        with torch.no_grad():
            assert (compiled(q, k, v, pos, mask) - eager(q, k, v, pos, mask)).abs().max() <= 1e-6
    assert fxpress.counters["compress_kv_cache"][RULE] >= 1


def test_state_refuses_positions_that_skip_ahead():
    module = IndexPutAttention()
    compiled = torch.compile(module, backend=fxpress.backend(kv=fxpress.FullKV()))
    mask = torch.ones(1, 1, 1, 16, dtype=torch.bool)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    with torch.no_grad():
        compiled(q, k, v, torch.tensor([0]), mask)
        with pytest.raises(KVCacheError, match="written at position 5"):
            compiled(q, k, v, torch.tensor([5]), mask)


@pytest.mark.real_model
def test_smollm2_fires_once_per_layer_and_generates_the_same_tokens(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = _generate(model, ids, new=12)
    reports = []
    got = _generate(model, ids, fxpress.Backend(fxpress.Options(kv=fxpress.FullKV()), on_report=reports.append), new=12)
    assert torch.equal(got, expected)
    assert [r.ops_after["fxpress.kv_attend.default"] for r in reports] == [30, 30]
