"""MiniLM compressed with fxpress.compress.svd, through fuse_low_rank: which rules fire, and that
the fused model computes what the unfused compressed model computes in eager."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress import workloads
from fxpress.compress import svd
from fxpress.passes.fuse_low_rank import RULES
from tests.conftest import max_diff

pytestmark = pytest.mark.real_model


def test_compressed_minilm_fuses_every_layer_and_matches_the_unfused_model(minilm):
    model, tokenizer = minilm
    compressed = svd(model, rank_ratio=0.5).model  # every Linear, the pooler's too
    sentences = [line[:200] for line in workloads.lee_background().splitlines()[:3]]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=48, return_tensors="pt")
    reports = []
    backend = fxpress.Backend(fxpress.Options(), on_report=reports.append)
    with torch.no_grad():
        expected = compressed(**batch)
        actual = torch.compile(compressed, backend=backend)(**batch)
    ffn, _, attention, linear = (r.name for r in RULES)  # the second: rotary attention
    fired = {k: v for k, v in fxpress.counters["fuse_low_rank"].items() if "not applied" not in k}
    # Per layer: Q, K, V and the output projection's first factor join the attention; the FFN is
    # one op. The pooler's dense layer is a lone factored Linear.
    assert fired == {attention: 6, ffn: 6, linear: 1}
    assert max_diff(actual.last_hidden_state, expected.last_hidden_state) <= 1e-5
    assert max_diff(actual.pooler_output, expected.pooler_output) <= 1e-5
    assert not any("scaled_dot_product" in op for op in reports[-1].ops_after)
