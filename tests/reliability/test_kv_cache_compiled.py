"""``fxpress.kv_cache`` under torch.compile: the whole forward traces with no graph break, one graph
for the prefill and one for the decode step, however many tokens are generated."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.hf.cache_argument import cache_argument
from tests.tiny_models import tiny_llama, token_ids

NEW = 256


def _generate(model, ids, cache=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_argument(cache),
                              max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("policy", [fxpress.FullKV(), fxpress.KIVI(bits=4, group_size=16, residual=16)],
                         ids=["full", "kivi4"])
def test_decode_stays_within_two_graphs_over_256_steps(policy):
    model = tiny_llama()
    ids = token_ids(batch=1, length=6)
    expected = _generate(model, ids)
    reports = []
    cache = fxpress.kv_cache(model, max_len=NEW + 8, policy=policy, dtype=None)
    forward = model.forward
    model.forward = torch.compile(forward, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append))
    try:
        got = _generate(model, ids, cache)
    finally:
        model.forward = forward
    assert len(reports) <= 2, [r.inputs for r in reports]  # the prefill graph, then the decode graph
    assert not any(r.fallback_reason for r in reports)
    assert all(r.ops_after.get("fxpress.cache_attend.default") == model.config.num_hidden_layers for r in reports)
    assert cache.layers[0].get_seq_length() == 6 + NEW - 1
    if isinstance(policy, fxpress.FullKV):
        assert torch.equal(got, expected)
