"""fxpress.fit: the fitted model fits and compiles, and a budget nothing fits is refused with the reason."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.core.errors import OptionError
from fxpress.hf.fit import kv_bytes
from tests.tiny_models import tiny_llama, token_ids

POLICIES = [fxpress.FullKV(), fxpress.KIVI(bits=4, group_size=16, residual=16),
            fxpress.KIVI(bits=2, group_size=16, residual=16)]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    full = 2 * sum(p.numel() for p in model.parameters()) + kv_bytes(model, fxpress.FullKV(), 256)
    return model, [token_ids(1, 64, seed=s) for s in range(4)], full


def test_the_fitted_model_fits_its_budget_and_compiles(tiny):
    model, calibration, full = tiny
    result = fxpress.fit(model, 0.6 * full, calibration, 256, group_size=32, kv_policies=POLICIES)
    assert result.total_bytes <= 0.6 * full
    kinds = {o.kind for o in result.plan.values()}
    assert kinds - {"dense"}, "a 60 % budget needs some layer compressed"
    text = str(result)
    assert "model.layers.1.mlp.down_proj" in text and "KV policies tried:" in text
    tried = {c["policy"]: c for c in result.candidates}
    assert result.kv.describe() in tried and "perplexity" in tried[result.kv.describe()]
    assert result.calibration_perplexity == min(c["perplexity"] for c in result.candidates if "perplexity" in c)
    ids = token_ids(2, 12)
    with torch.no_grad():
        eager = result.model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(result.model, backend="fxpress")(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_a_larger_budget_never_measures_worse_on_the_layers(tiny):
    model, calibration, full = tiny
    errors = []
    for fraction in (0.45, 0.6, 0.8):
        result = fxpress.fit(model, fraction * full, calibration, 256, group_size=32, kv_policies=POLICIES[1:2])
        errors.append(sum(o.error for o in result.plan.values()))
    assert errors == sorted(errors, reverse=True)


def test_a_budget_nothing_fits_is_refused_with_what_was_tried(tiny):
    model, calibration, full = tiny
    with pytest.raises(OptionError, match=r"fits no plan: the smallest weights it can make take \d+ bytes.*full:"):
        fxpress.fit(model, 0.2 * full, calibration, 256, group_size=32, kv_policies=POLICIES)
