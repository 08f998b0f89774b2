"""Shared fixtures: Dynamo state reset per test, tiny random HF models, the real models."""

from __future__ import annotations

import os

# Triton's interpreter must be chosen before triton is imported (its own @jit helpers such as
# tl.sum are made then). On a GPU machine, run with TRITON_INTERPRET=0 to compile for the device.
os.environ.setdefault("TRITON_INTERPRET", "1")

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


def _load_or_skip(loader):
    """Skip where the model packages are not installed, except in CI, where that is a failure."""
    try:
        return loader()
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm():
    return _load_or_skip(workloads.load_minilm)


@pytest.fixture(scope="session")
def smollm2():
    return _load_or_skip(workloads.load_smollm2)


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    """Where Triton kernels run: Triton's interpreter on CPU, and a CUDA device when there is one."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
