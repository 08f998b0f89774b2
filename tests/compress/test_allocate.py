"""compress.allocate: the greedy choice over each layer's hull meets the budget with the least summed
error the options allow (fxpress.fit's bytes, compress.svd's parameters)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from fxpress.compress.allocate import allocate, lower_hull


@dataclass(frozen=True)
class Option:
    nbytes: int
    error: float


def _cost(option: Option) -> int:
    return option.nbytes


def _layer(*points):
    return [Option(nbytes, error) for nbytes, error in points]


def test_the_hull_drops_options_that_buy_error_dearly():
    options = _layer((10, 1.0), (20, 0.9), (30, 0.2), (40, 0.25), (50, 0.0))
    assert [(o.nbytes, o.error) for o in lower_hull(options, _cost)] == [(10, 1.0), (30, 0.2), (50, 0.0)]


def test_greedy_allocation_meets_the_budget_with_the_least_error():
    layers = {"a": _layer((10, 1.0), (20, 0.3), (40, 0.0)), "b": _layer((10, 0.5), (30, 0.1), (50, 0.05)),
              "c": _layer((5, 0.8), (15, 0.2), (25, 0.1))}
    for budget in range(25, 140, 5):
        plan = allocate(layers, budget, _cost)
        spent = sum(o.nbytes for o in plan.values())
        best = min(sum(o.error for o in combo) for combo in itertools.product(*layers.values())
                   if sum(o.nbytes for o in combo) <= budget)
        assert spent <= budget
        # on these options greedy over the hulls finds the exhaustive search's optimum at every budget
        assert sum(o.error for o in plan.values()) == pytest.approx(best)
    assert allocate(layers, 24, _cost) is None
