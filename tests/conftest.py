"""Shared fixtures: Dynamo state reset per test, tiny random HF models, the real models."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress import workloads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    fxpress.counters.clear()
    yield
    torch._dynamo.reset()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="session")
def minilm():
    try:
        return workloads.load_minilm()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    try:
        return workloads.load_smollm2()
    except FileNotFoundError as e:
        pytest.skip(str(e))
