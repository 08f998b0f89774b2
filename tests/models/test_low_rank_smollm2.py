"""SmolLM2 with activation-aware SVD on its attention and MLP (a quarter of its parameters gone),
through fuse_low_rank: every rotary attention and every gated MLP becomes one fused op, and the
compiled model computes what the unfused compressed model computes in eager."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress import workloads
from fxpress.compress import svd
from fxpress.passes.fuse_low_rank import RULES
from tests.conftest import max_diff

pytestmark = pytest.mark.real_model

KEPT = 0.75  # of all the model's parameters, embeddings included


def test_svd_smollm2_fuses_every_attention_and_matches_the_unfused_model(smollm2):
    model, tokenizer = smollm2
    sentences = [line[:160] for line in workloads.lee_background().splitlines()[:4]]
    calibration = [dict(tokenizer(s, return_tensors="pt"), use_cache=False) for s in sentences[:2]]
    result = svd(model, params_kept=KEPT, targets="*layers*", calibration=calibration, allocation="uniform")
    assert KEPT - 0.01 < result.kept <= KEPT and all(layer.output_error is not None for layer in result.layers)
    batch = tokenizer(sentences[2:], padding=True, return_tensors="pt")  # two lengths: a padding mask
    reports = []
    backend = fxpress.Backend(fxpress.Options(), on_report=reports.append)
    with torch.no_grad():
        expected = result.model(**batch, use_cache=False).logits
        actual = torch.compile(result.model, backend=backend)(**batch, use_cache=False).logits
    ffn, rotary_attention = RULES[0].name, RULES[1].name
    fired = {k: v for k, v in fxpress.counters["fuse_low_rank"].items() if "not applied" not in k}
    assert fired == {rotary_attention: 30, ffn: 30}
    assert not any("scaled_dot_product" in op for op in reports[-1].ops_after)
    # Float tolerance relative to the logits' size, as the dense model's own comparison uses.
    assert max_diff(actual, expected) <= 4e-6 * expected.abs().max().item()
