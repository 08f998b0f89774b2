"""fxpress.fit: the allocation meets the budget with the least summed error the options allow, the
fitted model fits and compiles, and a budget nothing fits is refused with the reason."""

from __future__ import annotations

import itertools

import pytest
import torch

import fxpress
from fxpress.core.errors import OptionError
from fxpress.hf.fit import Option, _allocate, _hull, kv_bytes
from tests.tiny_models import tiny_llama, token_ids

POLICIES = [fxpress.FullKV(), fxpress.KIVI(bits=4, group_size=16, residual=16),
            fxpress.KIVI(bits=2, group_size=16, residual=16)]


def _layer(*points):
    return [Option("bits", i, nbytes, error) for i, (nbytes, error) in enumerate(points)]


def test_the_hull_drops_options_that_buy_error_dearly():
    options = _layer((10, 1.0), (20, 0.9), (30, 0.2), (40, 0.25), (50, 0.0))
    assert [(o.nbytes, o.error) for o in _hull(options)] == [(10, 1.0), (30, 0.2), (50, 0.0)]


def test_greedy_allocation_meets_the_budget_with_the_least_error():
    layers = {"a": _layer((10, 1.0), (20, 0.3), (40, 0.0)), "b": _layer((10, 0.5), (30, 0.1), (50, 0.05)),
              "c": _layer((5, 0.8), (15, 0.2), (25, 0.1))}
    for budget in range(25, 140, 5):
        plan = _allocate(layers, budget)
        spent = sum(o.nbytes for o in plan.values())
        best = min(sum(o.error for o in combo) for combo in itertools.product(*layers.values())
                   if sum(o.nbytes for o in combo) <= budget)
        assert spent <= budget
        # on these options greedy over the hulls finds the exhaustive search's optimum at every budget
        assert sum(o.error for o in plan.values()) == pytest.approx(best)
    assert _allocate(layers, 24) is None


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
